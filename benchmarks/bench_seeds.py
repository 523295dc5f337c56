"""Average `autotransfer bench` runs that differ only in --seed: each cell's regrets per
seed and their mean, so the verdict is made at a smaller noise than one seed's. Reports of
single cells (benchmarks/bench_parallel.py) are merged by seed first.

    autotransfer bench DATA... --quick --seed 0 --out runs/s0   (and --seed 1, --seed 2)
    python benchmarks/bench_seeds.py runs/s0/bench.json runs/s1/bench.json runs/s2/bench.json \
        --out benchmarks/results/bench_quick_seeds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotransfer.bench import format_seed_summary, merge_by_seed, summarise_seeds
from autotransfer.errors import AutotransferError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+", help="bench.json of each seed's run, or of each cell's")
    parser.add_argument("--out", type=Path, required=True, help="Writes OUT.md and OUT.json.")
    args = parser.parse_args()
    try:
        summary = summarise_seeds(merge_by_seed([json.loads(path.read_text()) for path in args.reports]))
    except (OSError, ValueError, AutotransferError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = format_seed_summary(summary)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
