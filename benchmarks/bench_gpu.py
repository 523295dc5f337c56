"""Training throughput on a GPU: our `train.fit` vs a bare PyTorch loop, and the loader.

Three rates on the same model (`build_net` of a partial Plan: the lowest coarse groups
frozen, the rest fine-tuned) and the same images per step:
- bare: a plain loop on synthetic tensors already on the GPU, bf16 autocast and
  channels_last, AdamW: what the GPU can do (no loading at all);
- fit: `train.fit` on a generated folder of the same size (precision bf16-mixed), from
  its per-epoch reports: steady-state epochs, each with its (small) validation pass;
- loader: our fine-tuning loader (`train.finetune_loader`) alone, decoding and
  augmenting the folder's JPEGs with the workers it chose: what can feed the GPU.
Goal (issue 19): fit >= 0.8 x bare. When fit is short of it, loader < bare says the
loader, not the training step, is the bound.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --cpu --out /tmp/gpu.json   # a slow check at tiny sizes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import timm
import torch
from PIL import Image

from _results import machine, versions, write_result

GOAL = 0.8


def write_folder(root: Path, train: int, val: int, classes: int, px: int) -> Path:
    """root/{train,val}/<class>/<i>.jpg of noise around a colour per class."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(40, 215, (classes, 3))
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            c = i % classes
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = colours[c] + rng.normal(0, 30, (px, px, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def bare_rate(net: torch.nn.Module, batch: int, px: int, classes: int, steps: int, device: str) -> float:
    """Images/s of a plain bf16 + channels_last training loop on tensors already on the device."""
    net = net.to(device, memory_format=torch.channels_last).train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, px, px, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(3, steps // 5)):  # warm-up: kernel selection, allocator
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def loader_rate(loader) -> tuple[float, int]:
    """Images/s of one pass over `loader` after its first batch (worker start-up excluded)."""
    batches = iter(loader)
    next(batches)
    start, images = time.perf_counter(), 0
    for x, _ in batches:
        images += x.shape[0]
    return images / (time.perf_counter() - start), images


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU at tiny sizes: checks the script, not a GPU.")
    parser.add_argument("--backbone", help="Default: resnet50 (test_resnet with --cpu), random weights.")
    parser.add_argument("--image-px", type=int, help="Side of the images; default 224 (64 with --cpu).")
    parser.add_argument("--batch-size", type=int, help="Default 128 (16 with --cpu).")
    parser.add_argument("--train-images", type=int, help="Default 4096 (128 with --cpu).")
    parser.add_argument("--epochs", type=int, default=3, help="fit's epochs; the first is warm-up.")
    parser.add_argument("--cut", type=int, default=2, help="Lowest coarse groups kept frozen (partial Plan).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with an "
              "NVIDIA GPU, or pass --cpu for a slow check of the script at tiny sizes", file=sys.stderr)
        return 2
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first is warm-up), but got {args.epochs}")
    device = "cpu" if args.cpu else "cuda"
    backbone = args.backbone or ("test_resnet" if args.cpu else "resnet50")
    px = args.image_px or (64 if args.cpu else 224)
    batch = args.batch_size or (16 if args.cpu else 128)
    n_train = args.train_images or (128 if args.cpu else 4096)
    classes, n_val = 10, max(20, batch)

    from autotransfer.api import quiet_frameworks
    from autotransfer.backbones import get_backbone
    from autotransfer.data import scan_folder
    from autotransfer.features import loader_workers
    from autotransfer.plan import Compute, Plan
    from autotransfer.strategies import Preprocessing, build_net
    from autotransfer.train import finetune_loader, fit

    quiet_frameworks()
    spec = get_backbone(backbone)
    compute = Compute(accelerator="cpu" if args.cpu else "gpu", devices=1, precision="bf16-mixed")
    plan = Plan(backbone, "partial", cut=args.cut, weights="random", image_size=px, batch_size=batch,
                epochs=args.epochs, lp_init=False, compute=compute)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        scan = scan_folder(write_folder(Path(tmp) / "data", n_train, n_val, classes, px))
        torch.manual_seed(0)
        bare = bare_rate(build_net(spec, plan, classes), batch, px, classes, 10 if args.cpu else 50, device)
        loader, loaded = loader_rate(finetune_loader(scan.splits["train"], Preprocessing.for_plan(spec, plan), plan))
        ends: list[float] = []
        start = time.perf_counter()
        result = fit(scan, plan, Path(tmp) / "run", progress=False, log=lambda _: None,
                     report=lambda step, _: ends.append(time.perf_counter()), evaluate_test=False)
        seconds = time.perf_counter() - start
    steady = (ends[-1] - ends[0]) / (len(ends) - 1)  # one epoch after the first: training + validation
    fit_rate = n_train / steady
    ratio = fit_rate / bare
    result = {
        "benchmark": "train.fit (partial Plan, bf16-mixed) vs a bare bf16 + channels_last loop; loader alone",
        "command": " ".join(["python", *sys.argv]),
        "device": device, "gpu": gpu, "backbone": backbone, "weights": "random", "image_px": px,
        "batch_size": batch, "train_images": n_train, "val_images": n_val, "classes": classes,
        "plan": {"strategy": plan.strategy, "cut": plan.cut, "epochs": plan.epochs, "precision": compute.precision},
        "loader_workers": loader_workers(n_train), "pin_memory": torch.cuda.is_available(),
        "bare_images_per_s": round(bare, 1),
        "fit_images_per_s": round(fit_rate, 1),
        "loader_images_per_s": round(loader, 1), "loader_images_timed": loaded,
        "fit_epoch_s": round(steady, 3), "fit_total_s": round(seconds, 2),
        "fit_val_balanced_accuracy": result.metrics["val"]["balanced_accuracy"],
        "ratio_fit_to_bare": round(ratio, 3),
        "bound": "loader" if loader < bare else "training step",
        "goal": GOAL, "passed": ratio >= GOAL,
        **machine(), "versions": versions(torch, timm, pl),
    }
    write_result(args.out, result)
    return 0 if result["passed"] or args.cpu else 1


if __name__ == "__main__":
    sys.exit(main())
