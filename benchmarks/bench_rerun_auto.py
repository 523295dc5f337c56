"""Run only the autotransfer row of committed `autotransfer bench` reports again, on the
same images and settings, and re-score their cells (`bench.rerun_autotransfer`): how a
change to the selector is judged without rerunning the references, fastai and the fixed
recipes, which do not run its code. Each REPORT's new bench.json/md/html go to
OUT/<REPORT's name>/; the preamble says which row was rerun, when, and `--note`.

    python benchmarks/bench_rerun_auto.py benchmarks/results/bench_cpu_128px_50perclass_seed0.json \
        --note "commit abc123: every-level head with both scalings" --out runs/rerun [--dataset pneumoniamnist]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotransfer.api import quiet_frameworks
from autotransfer.bench import rerun_autotransfer, verdict_lines
from autotransfer.errors import AutotransferError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+", help="bench.json files (one seed each)")
    parser.add_argument("--note", required=True, help="What changed (e.g. the commit): written into each report.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", action="append", default=None,
                        help="Rerun only this dataset's cells (repeatable): the cells a change can touch.")
    parser.add_argument("--resume", action="store_true",
                        help="Go on from the search an interrupted rerun left in OUT (its finished trials kept).")
    args = parser.parse_args()
    quiet_frameworks()
    for path in args.reports:
        try:
            report = rerun_autotransfer(json.loads(path.read_text()), args.out / path.stem, args.note, log=print,
                                        datasets=args.dataset, resume=args.resume)
        except (OSError, ValueError, AutotransferError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 1
        print("\n".join(verdict_lines(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
