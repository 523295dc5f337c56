"""Training throughput of autotransfer's Lightning fine-tuning vs a bare PyTorch loop.

Same network (a `full` Plan of the backbone: TransferNet, BN frozen as by default), same
parameter groups and AdamW + cosine schedule, same in-memory batches (decoding is left
out: this measures the training loop, not the loader). The Lightning side is
`train.ClassifierTask` under the very Trainer `train.fit` builds (CSV logger, a log call
per step, the loss kept per step); the bare side is the textbook loop that also reads the
loss each step. Both restart from the same weights, alternate, and an epoch is timed from
its start to the next one's (so per-epoch framework work counts); the first epoch of each
run is warm-up and not counted. Other jobs share the machine, so the ratio compares each
side's fastest steady epoch (like timeit's min: contention only ever adds time); the
median-based ratio is reported beside it. Goal (issue 5): Lightning >= 0.95x the bare
throughput.

    python benchmarks/bench_train_throughput.py [--image-size 128] [--batch-size 32] [--batches 4] [--epochs 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import pytorch_lightning as pl
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from autotransfer.backbones import get_backbone
from autotransfer.api import quiet_frameworks
from autotransfer.plan import Plan
from autotransfer.strategies import build_net
from autotransfer.train import ClassifierTask, _trainer, backbone_param_groups

from _results import machine, versions, write_result

GOAL = 0.95


class EpochClock(pl.Callback):
    """Start of every epoch, and the end of training: epoch k lasts until k+1 starts."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks.append(time.perf_counter())


def lightning_epochs(net, plan: Plan, loader: DataLoader, epochs: int) -> tuple[list[float], float]:
    clock = EpochClock()
    task = ClassifierTask(net, backbone_param_groups(net, plan), plan.weight_decay)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = _trainer(Path(out), "throughput", epochs, [clock], progress=False)
        trainer.fit(task, loader)
        total = time.perf_counter() - start
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])], total


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_epochs(net, plan: Plan, loader: DataLoader, epochs: int) -> tuple[list[float], float]:
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where Lightning's "auto" puts it
    net.to(device)
    optimizer = torch.optim.AdamW(backbone_param_groups(net, plan), weight_decay=plan.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    marks, losses = [], []
    for _ in range(epochs):
        _sync()
        marks.append(time.perf_counter())
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
    _sync()
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="Batches per epoch.")
    parser.add_argument("--epochs", type=int, default=3, help="Per run; the first is warm-up.")
    parser.add_argument("--repeats", type=int, default=5, help="Alternating runs of each side.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    args = parser.parse_args()
    quiet_frameworks()

    spec = get_backbone(args.backbone)
    plan = Plan(args.backbone, "full", image_size=args.image_size, batch_size=args.batch_size)
    net = build_net(spec, plan, num_classes=10)
    start_state = copy.deepcopy(net.state_dict())
    g = torch.Generator().manual_seed(0)
    n = args.batches * args.batch_size
    data = TensorDataset(torch.randn(n, 3, args.image_size, args.image_size, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)

    epochs: dict[str, list[float]] = {"lightning": [], "bare": []}
    totals: dict[str, list[float]] = {"lightning": [], "bare": []}
    for _ in range(args.repeats):
        for side, run in (("bare", bare_epochs), ("lightning", lightning_epochs)):
            net.load_state_dict(start_state)
            pl.seed_everything(0, verbose=False)
            times, total = run(net, plan, loader, args.epochs)
            epochs[side] += times[1:]  # the first epoch of a run is warm-up
            totals[side].append(total)
            print(f"{side:<9} epochs {[round(t, 2) for t in times]} s, whole run {total:.2f} s", flush=True)

    per_epoch = {side: median(times) for side, times in epochs.items()}
    best = {side: min(times) for side, times in epochs.items()}
    ratio = best["bare"] / best["lightning"]  # Lightning throughput / bare throughput
    result = {
        "benchmark": "train throughput: autotransfer's Lightning fine-tuning vs a bare PyTorch loop, same model and batches",
        "command": " ".join(["python", *sys.argv]),
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "batches_per_epoch": args.batches, "epochs_per_run": args.epochs, "repeats": args.repeats,
        "epoch_s": {side: [round(t, 3) for t in times] for side, times in epochs.items()},
        "median_epoch_s": {side: round(t, 3) for side, t in per_epoch.items()},
        "fastest_epoch_s": {side: round(t, 3) for side, t in best.items()},
        "images_per_s_fastest": {side: round(n / t, 1) for side, t in best.items()},
        "ratio": round(ratio, 3),
        "ratio_median_epochs": round(per_epoch["bare"] / per_epoch["lightning"], 3),
        "ratio_whole_runs_with_setup": round(median(totals["bare"]) / median(totals["lightning"]), 3),
        "goal": GOAL, "passed": ratio >= GOAL,
        **machine(), "versions": versions(torch, timm, pl),
    }
    write_result(args.out, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
