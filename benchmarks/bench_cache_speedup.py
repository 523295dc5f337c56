"""A head epoch on cached features vs a full fine-tuning epoch on the same images.

Both run through autotransfer's own Lightning task in the same process, so the ratio
holds on a noisy shared machine. Goal (issue 2): ratio >= 20.

    python benchmarks/bench_cache_speedup.py ../shared/datasets/hymenoptera [--image-size 224]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from autotransfer.backbones import get_backbone
from autotransfer.data import scan_folder
from autotransfer.features import cached_features, image_loader, train_transform
from autotransfer.plan import Plan
from autotransfer.strategies import Preprocessing, build_net
from autotransfer.features import weights_id
from autotransfer.train import ClassifierTask, _feature_batches, backbone_param_groups

from _results import machine, versions, write_result

GOAL = 20.0


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _epoch_seconds(task: ClassifierTask, loader, epochs: int) -> float:
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, loader)
    steady = timer.seconds[1:] or timer.seconds  # the first epoch pays for warm-up
    return sum(steady) / len(steady)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache_speedup.json")
    args = parser.parse_args()

    scan = scan_folder(args.data)
    spec = get_backbone(args.backbone)
    plan = Plan(args.backbone, "full", image_size=args.image_size)
    prep = Preprocessing.for_plan(spec, plan)
    net = build_net(spec, plan, len(scan.classes))
    feats, labels, _ = cached_features(
        net, scan, "train", prep, spec.architecture, weights_id(spec, plan.weights, plan.seed), None, progress=False
    )
    head = ClassifierTask(net.classifier, [{"params": list(net.classifier.parameters()), "lr": 1e-3}], 1e-4)
    head_epoch = _epoch_seconds(head, _feature_batches(feats, labels, 64, True, 0), 20)

    full = ClassifierTask(net, backbone_param_groups(net, plan), 1e-4)
    images = image_loader(scan.splits["train"], train_transform(prep), plan.batch_size, True)
    full_epoch = _epoch_seconds(full, images, 2)

    ratio = full_epoch / head_epoch
    result = {
        "benchmark": "cached-frozen head epoch vs full fine-tuning epoch",
        "command": " ".join(["python", *sys.argv]),
        "data": str(args.data), "train_images": len(scan.splits["train"]),
        "backbone": args.backbone, "image_size": prep.input_size,
        "head_epoch_s": round(head_epoch, 4), "full_epoch_s": round(full_epoch, 2),
        "ratio": round(ratio, 1), "goal": GOAL, "passed": ratio >= GOAL,
        **machine(), "versions": versions(torch, pl),
    }
    write_result(args.out, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
