"""A whole `autotransfer fit DATA` (profile + rules + search within the default budget +
adopting the winner) vs one full fine-tuning run of the chosen backbone on the same data.

Both start from the same scan (a seeded, stratified subsample of the training split, val
untouched) and from an empty feature cache, at the same image size; the full fine-tune
is `fit --strategy full` with the default epochs. The profile's calibration reference is
computed once per backbone and kept across runs in real use, so it is warmed first and
its one-time cost reported apart. Goal (issue 5): whole fit <= 3x one full fine-tune.

Without --backbone the fit chooses among the installed backbones as `autotransfer fit`
does (the others profiled only while the budget allows), and the full fine-tune it is
compared with is of the backbone it chose; each pair runs the fit first.

    python benchmarks/bench_fit_overhead.py [DATA] [--per-class 25] [--image-size 128] [--repeats 1] [--backbone NAME] [--draw-val]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytorch_lightning as pl
import timm
import torch

from autotransfer.api import quiet_frameworks
from autotransfer.bench import empty_feature_cache, run_autotransfer, subsample, warm_calibration
from autotransfer.data import scan_folder, stratified_split
from autotransfer.features import use_cache
from autotransfer.plan import Plan
from autotransfer.selector import default_backbones
from autotransfer.train import fit

from _results import machine, versions, write_result

GOAL = 3.0
DATASETS = Path(os.environ.get("AUTOTRANSFER_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=DATASETS / "hymenoptera")
    parser.add_argument("--backbone", default=None,
                        help="One backbone only [default: fit's choice among the installed backbones].")
    parser.add_argument("--per-class", type=int, default=25, help="Training images per class (seeded, stratified).")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="Alternating pairs of runs; the median ratio counts.")
    parser.add_argument("--draw-val", action="store_true",
                        help="Leave DATA's val/ and test/ out: val is drawn from the sample as fit draws it for a "
                             "folder of train images alone (issue 15's 100 images: cifar10 --per-class 10).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fit_overhead.json")
    args = parser.parse_args()
    quiet_frameworks()

    scan = subsample(scan_folder(args.data, 0.2, args.seed), args.per_class, args.seed)
    if args.draw_val:  # a folder of just these images: fit draws val from them, cross-validates, refits
        train, val = stratified_split(scan.splits["train"], 0.2, args.seed)
        scan = replace(scan, splits={"train": train, "val": val}, val_drawn=True)
    default, *optional = [args.backbone] if args.backbone else default_backbones("pretrained")
    base = Plan(default, image_size=args.image_size, seed=args.seed)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="autotransfer-fit-overhead-") as work, use_cache(Path(work) / "cache"):
        work = Path(work)
        calibration = sum(warm_calibration(replace(base, backbone=name)) for name in [default, *optional])
        for i in range(args.repeats):
            auto = run_autotransfer(scan, base, work / f"auto-{i}", trials=None, log=print, optional_backbones=optional)
            print(f"whole fit: {auto['seconds']:.1f} s (profiles of {', '.join(auto['backbones_profiled'])} "
                  f"{auto['profile_seconds']:.1f} s, {auto['trials_run']} "
                  f"trials) -> {auto['choice']}, val accuracy {auto['val_accuracy']:.4f}", flush=True)
            chosen = auto["chosen_plan"]["backbone"]
            full_plan = Plan(chosen, "full", image_size=args.image_size, seed=args.seed)
            empty_feature_cache()
            start = time.perf_counter()
            full = fit(scan, full_plan, work / f"full-{i}", progress=False, log=lambda _: None)
            full_s = time.perf_counter() - start
            print(f"one full fine-tune of {chosen}: {full_s:.1f} s, val accuracy "
                  f"{full.metrics['val']['accuracy']:.4f}", flush=True)
            pairs.append({
                "full_finetune_s": round(full_s, 2), "full_val_accuracy": full.metrics["val"]["accuracy"],
                "fit_s": auto["seconds"], "profile_s": auto["profile_seconds"], "budget_s": auto["budget_seconds"],
                "backbones_profiled": auto["backbones_profiled"], "chosen_backbone": chosen,
                "trials": auto["trials_run"], "choice": auto["choice"], "fit_val_accuracy": auto["val_accuracy"],
                "ratio": round(auto["seconds"] / full_s, 3),
            })
    ratios = sorted(p["ratio"] for p in pairs)
    ratio = ratios[len(ratios) // 2]
    result = {
        "benchmark": "whole fit (profile + search within the default budget + adopt) vs one full fine-tune, same scan",
        "command": " ".join(["python", *sys.argv]),
        "data": str(args.data), "per_class": args.per_class, "val_drawn": scan.val_drawn,
        "images": {split: len(records) for split, records in scan.splits.items()},
        "backbones": [default, *optional], "image_size": args.image_size, "full_finetune_epochs": Plan(default).epochs,
        "calibration_s_one_time": round(calibration, 2),
        "runs": pairs, "ratio": ratio, "goal": GOAL, "passed": ratio <= GOAL,
        **machine(), "versions": versions(torch, timm, pl, optuna),
    }
    write_result(args.out, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
