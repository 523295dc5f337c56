"""The same default `autotransfer fit`, twice: on an idle machine from an empty feature cache,
then beside CPU hogs (`python -c "while 1: pass"`, one per core) with the cache the first run
left. The decision must not move (issue 15): plan.json byte for byte, and the same trials.

The data is a seeded per-class subsample of DATA's train split, copied to a temporary folder
(`fit` skips symlinks); val/ and test/ are left out, so `fit` draws its own val and
cross-validates, as on a user's plain folder.

    python benchmarks/bench_load_independence.py DATA [--per-class 50] [--hogs 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autotransfer.bench import subsample
from autotransfer.data import scan_folder

from _results import machine, write_result

HOG = "while 1: pass"
TRIAL_FIELDS = ("trial", "state", "backbone", "strategy", "cut", "feature_level", "all_levels", "bn_mode", "epochs", "lr",
                "val_balanced_accuracy")  # leaderboard.csv columns: what each trial was and its score


def subsample_folder(data: Path, per_class: int, seed: int, out: Path) -> Path:
    """OUT/<class>/<image>: copies of the train images `bench.subsample` keeps, as the bench
    subsamples a cell's training images."""
    scan = subsample(scan_folder(data), per_class, seed)
    for record in scan.splits["train"]:
        folder = out / scan.classes[record.label]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(record.path, folder / Path(record.path).name)
    return out


def fit_run(data: Path, run: Path, cache: Path, extra: list[str]) -> dict:
    """`autotransfer fit DATA --out RUN` as a user runs it; its plan, trials and seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "autotransfer", "fit", str(data), "--out", str(run), *extra],
                          env={**os.environ, "AUTOTRANSFER_CACHE": str(cache)}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"fit failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with (run / "leaderboard.csv").open(newline="") as handle:
        trials = sorted(({k: row[k] for k in TRIAL_FIELDS} for row in csv.DictReader(handle)), key=lambda t: int(t["trial"]))
    return {"seconds": round(time.perf_counter() - start, 1), "plan_json": (run / "plan.json").read_text(),
            "trials": trials, "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load_independence.json")
    parser.add_argument("fit_args", nargs="*", help="more `fit` options, after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = subsample_folder(args.data, args.per_class, args.seed, tmp / "data")
        extra = ["--seed", str(args.seed), *args.fit_args]
        idle = fit_run(data, tmp / "idle", tmp / "cache", extra)  # empty cache
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
        try:
            loaded = fit_run(data, tmp / "loaded", tmp / "cache", extra)  # the cache the idle run left
        finally:
            for hog in hogs:
                hog.kill()
    same_plan = idle["plan_json"] == loaded["plan_json"]
    unscored = [[t | {"val_balanced_accuracy": None} for t in run["trials"]] for run in (idle, loaded)]
    same_trials = unscored[0] == unscored[1]
    write_result(args.out, {
        "data": f"{args.data.name}, {args.per_class} train images per class (seed {args.seed}), fit {' '.join(extra)}",
        "hogs": args.hogs,
        "same_plan_json": same_plan,
        "same_trials": same_trials,
        "same_trial_scores": idle["trials"] == loaded["trials"],
        "seconds_idle": idle["seconds"], "seconds_loaded": loaded["seconds"],
        "slowdown": round(loaded["seconds"] / idle["seconds"], 2),
        "idle": idle, "loaded": loaded, **machine(),
    })
    if not (same_plan and same_trials):
        sys.exit("the decision moved with the machine's load")


if __name__ == "__main__":
    main()
