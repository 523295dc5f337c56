"""Does refitting a fine-tuned winner on train + val help? For each seed, on a bench cell's
images (`bench.cell_data`: the same subsample, drawn val and held-out images as
`autotransfer bench`), one Plan is trained three times:

  split  trained on train, restored to its best epoch on the drawn val (`fit --no-refit`)
  refit  trained again on train + val for that many epochs, its one-cycle schedule
         squeezed into them (what `fit` shipped until the split's schedule won here)
  refit on the split's schedule  the same, on the split run's schedule (all its epochs),
         stopped after that many: where the split's best epoch stood in it (the learning
         rate not yet annealed); what `fit` ships after a split; the same model as
         `refit` when the best epoch was the last

and all are scored on the same held-out images. The verdict is the mean difference over
seeds with its standard error *across seeds*: it includes the model-to-model spread (a
refit is a new training run) that a per-image paired SE of one seed cannot see.

    python benchmarks/bench_refit.py ../shared/datasets/pneumoniamnist --per-class all \
        --seeds 0 1 2 3 4 --image-size 128 --out benchmarks/results/refit_pneumoniamnist
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from autotransfer.api import quiet_frameworks
from autotransfer.bench import (
    BenchSettings, cell_data, empty_feature_cache, heldout_predictions, heldout_split, parse_sizes, scan_datasets,
)
from autotransfer.errors import AutotransferError
from autotransfer.metrics import accuracy_gap_se
from autotransfer.train import fit, refit


def accuracy(predicted: list[int], targets: list[int]) -> float:
    return sum(p == t for p, t in zip(predicted, targets)) / len(targets)


def one_seed(data: Path, per_class: int | None, seed: int, args: argparse.Namespace, work: Path) -> dict:
    settings = BenchSettings.full_mode(seed=seed, image_size=args.image_size, epochs=args.epochs,
                                       backbone=args.backbone, weights=args.weights)
    (scan,) = scan_datasets([data], settings)
    sub, base = cell_data(scan, per_class, settings)
    plan = replace(base, strategy=args.strategy, cut=args.cut if args.strategy == "partial" else None)
    held = heldout_split(sub)
    targets = [r.label for r in sub.splits[held]]
    split_dir, refit_dir, along_dir = (work / f"s{seed}" / name for name in ("split", "refit", "refit_split_schedule"))
    for folder in (split_dir, refit_dir, along_dir):
        shutil.rmtree(folder, ignore_errors=True)
    empty_feature_cache()
    result = fit(sub, plan, split_dir, progress=False, log=lambda _: None)
    split_predicted = heldout_predictions(split_dir, result.metrics, sub.splits[held], sub.classes)
    kept = result.metrics.get("kept")
    row = {"seed": seed, "train": len(sub.splits["train"]), "val": len(sub.splits["val"]), "heldout": len(targets),
           "kept": kept, "split_accuracy": accuracy(split_predicted, targets)}
    if kept != "finetuned":  # fit refits only a fine-tuned winner
        return {**row, "epochs": None, "refit_accuracy": None, "gain_points": None, "paired_se_points": None}
    epochs = result.metrics["stages"]["finetune_best_epoch"]

    def scored(folder: Path, prefix: str, **schedule) -> dict:
        refit(sub, plan, folder, epochs, **schedule)
        predicted = heldout_predictions(folder, {}, sub.splits[held], sub.classes)
        acc = accuracy(predicted, targets)
        return {f"{prefix}accuracy": acc, f"{prefix.replace('refit_', '')}gain_points": round(100 * (acc - row["split_accuracy"]), 2),
                f"{prefix.replace('refit_', '')}paired_se_points": round(100 * accuracy_gap_se(predicted, split_predicted, targets), 2)}

    row = {**row, "epochs": epochs, **scored(refit_dir, "refit_")}
    if epochs < plan.epochs:
        row.update(scored(along_dir, "refit_split_schedule_", schedule_epochs=plan.epochs))
    else:  # the split's best epoch was its last: the two refits are one run
        row.update({"refit_split_schedule_accuracy": row["refit_accuracy"], "split_schedule_gain_points": row["gain_points"],
                    "split_schedule_paired_se_points": row["paired_se_points"]})
    return row


def summary(rows: list[dict], key: str = "gain_points") -> dict:
    gains = [r[key] for r in rows if r.get(key) is not None]
    if not gains:
        return {"seeds": 0, "mean_gain_points": None, "se_across_seeds": None}
    mean = sum(gains) / len(gains)
    spread = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) if len(gains) > 1 else None
    return {"seeds": len(gains), "mean_gain_points": round(mean, 2),
            "se_across_seeds": None if spread is None else round(spread / math.sqrt(len(gains)), 2)}


def markdown(report: dict) -> str:
    lines = ["# Refit on train + val vs the split's model", "", f"Command: `{report['command']}`", "",
             "| dataset | size | seed | train + val | held-out | kept | epochs | split acc | refit acc | gain ± paired SE (pts) "
             "| refit on the split's schedule | gain ± paired SE (pts) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    pm = lambda g, se: "-" if g is None else f"{g:+.2f} ± {se:.2f}"  # noqa: E731
    for cell in report["cells"]:
        for r in cell["seeds"]:
            lines.append(f"| {cell['dataset']} | {cell['size']} | {r['seed']} | {r['train']}+{r['val']} | {r['heldout']} | "
                         f"{r['kept']} | {r['epochs'] or '-'} | {fmt(r['split_accuracy'])} | {fmt(r['refit_accuracy'])} | "
                         f"{pm(r['gain_points'], r['paired_se_points'])} | {fmt(r.get('refit_split_schedule_accuracy'))} | "
                         f"{pm(r.get('split_schedule_gain_points'), r.get('split_schedule_paired_se_points'))} |")
    lines.append("")
    for cell in report["cells"]:
        for name, key in (("refit", "summary"), ("refit on the split's schedule", "summary_split_schedule")):
            s = cell.get(key) or {}
            lines.append(f"- {cell['dataset']} {cell['size']}: {name} gain {s.get('mean_gain_points')} points over "
                         f"{s.get('seeds')} seed(s), SE across seeds {s.get('se_across_seeds')}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--per-class", default="all", help="Images per class of train, or 'all'.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategy", choices=["full", "partial"], default="full")
    parser.add_argument("--cut", type=int, default=4, help="partial: the groups frozen (the bench's middle cut: 4).")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="pretrained")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_refit"), help="Where the runs go (models deleted).")
    parser.add_argument("--out", type=Path, required=True, help="Writes OUT.json and OUT.md (after every seed).")
    args = parser.parse_args()
    quiet_frameworks()
    (per_class,) = parse_sizes([args.per_class])
    report = {"command": "python benchmarks/bench_refit.py " + " ".join(sys.argv[1:]), "cells": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for data in args.data:
            cell = {"dataset": data.name, "size": args.per_class, "seeds": [], "summary": {}}
            report["cells"].append(cell)
            for seed in args.seeds:
                row = one_seed(data, per_class, seed, args, args.work / data.name)
                cell["seeds"].append(row)
                cell["summary"] = summary(cell["seeds"])
                cell["summary_split_schedule"] = summary(cell["seeds"], "split_schedule_gain_points")
                print(f"{data.name} seed {seed}: split {row['split_accuracy']:.4f}, refit "
                      f"{'-' if row['refit_accuracy'] is None else format(row['refit_accuracy'], '.4f')}, on the split's "
                      f"schedule {'-' if row.get('refit_split_schedule_accuracy') is None else format(row['refit_split_schedule_accuracy'], '.4f')}",
                      flush=True)
                args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
                args.out.with_suffix(".md").write_text(markdown(report))
                for model in (args.work / data.name).rglob("model.pt"):
                    model.unlink()
    except (OSError, ValueError, AutotransferError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
