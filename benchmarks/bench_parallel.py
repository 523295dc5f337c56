"""Run `autotransfer bench` one cell (dataset x size x seed) per process, several at once,
within a deadline: how the 3-seed, full-size bench fits in a GPU machine's few minutes.

One process per cell keeps each cell's bench.json whole when others are killed at the
deadline; cells start seed by seed (every cell of seed 0 first), the largest first (with
--jobs 1 the smallest), so a cut-short run still holds whole seeds. Run again with the same
OUT, it skips finished cells and continues killed ones from their last finished row
(`autotransfer bench --resume`). With --store DIR every finished row is also copied to
DIR/CELL/ as it lands, and copied back before a cell starts: commit DIR and a later sitting
on a fresh checkout goes on where this one stopped (a cifar10 cell at every image is hours
of CPU, more than one sitting).
Merge and average the cells afterwards with
`benchmarks/bench_seeds.py OUT/cells/*/bench.json --out ...`.

    python benchmarks/bench_parallel.py DATA... --per-class 10 --per-class 50 --per-class all \
        --seeds 0 1 2 --jobs 6 --deadline 540 --out runs/bench_cells -- --image-size 128 --coarse-grid
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DONE = ".done"  # in a cell's folder once its bench exited 0: a rerun with the same OUT skips it

@dataclass
class Cell:
    data: Path
    per_class: str
    seed: int
    images: int  # train images the cell uses (its cost, for the order)

    @property
    def name(self) -> str:
        return f"{self.data.name}-{self.per_class}-s{self.seed}"


def count_train_images(data: Path) -> tuple[int, int]:
    """(train images, classes) of an ImageFolder dataset: train/ if present, else the class folders."""
    root = data / "train" if (data / "train").is_dir() else data
    classes = [d for d in root.iterdir() if d.is_dir() and d.name not in ("val", "valid", "validation", "test")]
    return sum(1 for c in classes for f in c.iterdir() if f.is_file()), max(1, len(classes))


def plan_cells(datasets: list[Path], sizes: list[str], seeds: list[int], largest_first: bool = True) -> list[Cell]:
    """Every cell, seed by seed; within a seed the most images first (several jobs: the
    longest cell starts first and ends with the others), or the fewest (one job, a run
    over several sittings: the most whole cells soonest, not hours of one large cell)."""
    cells = []
    for seed in seeds:
        batch = []
        for data in datasets:
            total, classes = count_train_images(data)
            for size in sizes:
                batch.append(Cell(data, size, seed, total if size == "all" else min(total, int(size) * classes)))
        cells += sorted(batch, key=lambda c: c.images, reverse=largest_first)  # stable: ties keep the command's order
    return cells


def rows_folder(out: Path, cell: Cell) -> Path:
    """Where `autotransfer bench --out OUT/cells/CELL` keeps the cell's finished rows."""
    from autotransfer.bench import cell_runs

    per_class = None if cell.per_class == "all" else int(cell.per_class)
    return cell_runs(out / "cells" / cell.name, cell.data.name, per_class) / "rows"


def copy_rows(source: Path, target: Path) -> int:
    """Copy the whole row files (*.json, the cell's fingerprint too) that `target` lacks or holds
    otherwise; a `.partial` file is a row being written and waits for the next call."""
    copied = 0
    for path in sorted(source.glob("*.json")) if source.is_dir() else []:
        kept = target / path.name
        if not kept.is_file() or kept.read_bytes() != path.read_bytes():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, kept)
            copied += 1
    return copied


def run_cells(cells: list[Cell], bench_args: list[str], jobs: int, deadline: float, out: Path,
              store: Path | None = None) -> dict:
    """Start cells while there is time, `jobs` at once; kill what still runs at the deadline.
    With a `store`, rows go there as they land and come back from it before a cell starts."""
    start = time.monotonic()
    status = {c.name: "done earlier" if (out / "cells" / c.name / DONE).exists() else "not started" for c in cells}
    queue, running = [c for c in cells if status[c.name] == "not started"], {}
    while queue or running:
        for name, (proc, cell, began) in list(running.items()):
            ended = proc.poll() is not None
            if store is not None:
                copy_rows(rows_folder(out, cell), store / name)
            if ended:
                status[name] = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                if proc.returncode == 0:
                    (out / "cells" / name / DONE).touch()
                print(f"[{time.monotonic() - start:6.0f} s] {name}: {status[name]} in {time.monotonic() - began:.0f} s", flush=True)
                del running[name]
        if time.monotonic() - start > deadline:
            for name, (proc, cell, _) in running.items():
                proc.kill()
                proc.wait()
                if store is not None:
                    copy_rows(rows_folder(out, cell), store / name)
                status[name] = "killed at the deadline"
            break
        while queue and len(running) < jobs:
            cell = queue.pop(0)
            folder = out / "cells" / cell.name
            folder.mkdir(parents=True, exist_ok=True)  # a cell killed by an earlier deadline goes on (--resume)
            if store is not None and copy_rows(store / cell.name, rows_folder(out, cell)):
                print(f"{cell.name}: rows of an earlier sitting restored from {store / cell.name}", flush=True)
            command = [sys.executable, "-m", "autotransfer", "bench", str(cell.data.resolve()), "--per-class", cell.per_class,
                       "--seed", str(cell.seed), "--out", str(folder.resolve()), "--resume", *bench_args]
            log = (folder / "log.txt").open("a")
            # cwd=out: a source tree in the current folder must not shadow the installed autotransfer
            running[cell.name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=out), cell, time.monotonic())
            status[cell.name] = "running"
        time.sleep(1)
    result = {"seconds": round(time.monotonic() - start, 1), "jobs": jobs, "deadline": deadline,
              "bench_args": bench_args, "cells": [{**asdict(c), "data": str(c.data), "status": status[c.name]} for c in cells]}
    (out / "status.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+", help="Dataset folders (ImageFolder layout).")
    parser.add_argument("--per-class", action="append", default=None, help="Sizes, as bench's --per-class [default: 10, 50, all].")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 3), help="Cells at once [default: cores / 3].")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="Seconds; cells still running then are killed.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, help="Copy every finished row here as it lands (DIR/CELL/*.json) and "
                        "restore from here before a cell starts: commit it to go on in another sitting.")
    parser.epilog = "Options after -- go to every `autotransfer bench` cell."
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, bench_args = parser.parse_args(argv[:split]), argv[split + 1:]
    missing = [str(d) for d in args.data if not d.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    cells = plan_cells(args.data, args.per_class or ["10", "50", "all"], args.seeds, largest_first=args.jobs > 1)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_cells(cells, bench_args, args.jobs, args.deadline, args.out, args.store)
    done = sum(c["status"] == "done" for c in result["cells"])
    print(f"{done} of {len(cells)} cells done in {result['seconds']:.0f} s; {args.out / 'status.json'}")
    return 0 if done == len(cells) else 1


if __name__ == "__main__":
    sys.exit(main())
