"""Channels-last vs the default memory layout on this machine's device, same network.

`backbones.on_device` puts every network autotransfer computes with (features, profile,
fine-tuning, predict) in channels-last memory on the CPU. This measures why: one
forward pass of a batch as the feature cache runs it (eval, `forward_intermediates`) and
one training step as fine-tuning runs it (train mode, AdamW), each layout timed in
alternation from the same weights and batch; the ratio compares each side's fastest
repeat (contention only ever adds time), the median-based ratio beside it. It also
checks that both layouts compute the same network (largest output difference). Goal:
channels-last >= 1.2x on the CPU, both for inference and training.

    python benchmarks/bench_channels_last.py [--backbones efficientnet_lite0 efficientnet_lite2] [--sizes 128 224]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from statistics import median

import timm
import torch

from autotransfer.backbones import create_model, get_backbone, on_device

from _results import machine, versions, write_result

GOAL = 1.2


def timed(step, repeats: int) -> list[float]:
    step()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def measure(backbone: str, size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    spec = get_backbone(backbone)
    base = create_model(spec, "random", num_classes=10)
    images = torch.randn(batch, 3, size, size)
    targets = torch.randint(0, 10, (batch,))
    nets = {"default": copy.deepcopy(base).to("cpu"), "channels_last": on_device(copy.deepcopy(base), "cpu")}
    out: dict[str, dict] = {}
    with torch.inference_mode():
        outputs = {name: net.eval()(images) for name, net in nets.items()}
    difference = float((outputs["default"] - outputs["channels_last"]).abs().max())
    for phase in ("inference", "training"):
        times: dict[str, list[float]] = {name: [] for name in nets}
        for _ in range(repeats):  # alternate, so that load drifts hit both layouts alike
            for name, net in nets.items():
                if phase == "inference":
                    net.eval()

                    def step(net=net) -> None:
                        with torch.inference_mode():
                            net.forward_intermediates(images)
                else:
                    net.train()
                    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

                    def step(net=net, optimizer=optimizer) -> None:
                        loss = torch.nn.functional.cross_entropy(net(images), targets)
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                times[name] += timed(step, 1)
        out[phase] = {
            "default_s": round(min(times["default"]), 4),
            "channels_last_s": round(min(times["channels_last"]), 4),
            "ratio": round(min(times["default"]) / min(times["channels_last"]), 3),
            "ratio_median": round(median(times["default"]) / median(times["channels_last"]), 3),
        }
    return {"backbone": backbone, "image_size": size, "batch": batch, "max_output_difference": difference, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "channels_last.json")
    args = parser.parse_args()
    cells = [measure(b, s, args.batch_size, args.repeats) for b in args.backbones for s in args.sizes]
    worst = min(min(c["inference"]["ratio"], c["training"]["ratio"]) for c in cells)
    write_result(args.out, {
        "benchmark": "channels-last vs default memory layout on the CPU: a feature pass (eval, forward_intermediates) "
                     "and a training step (AdamW), same weights and batch, fastest of alternating repeats",
        "command": "python benchmarks/bench_channels_last.py " + " ".join(
            [f"--backbones {' '.join(args.backbones)}", f"--sizes {' '.join(map(str, args.sizes))}",
             f"--batch-size {args.batch_size}", f"--repeats {args.repeats}"]),
        "cells": cells,
        "worst_ratio": worst,
        "goal": GOAL,
        "passed": worst >= GOAL,
        **machine(),
        "versions": versions(torch, timm),
    })


if __name__ == "__main__":
    main()
