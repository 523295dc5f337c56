"""Which rule for picking a winner on val does best on held-out data?

Replays selection rules over the grid rows of finished `autotransfer bench` runs (frozen
at every depth, LP-FT from each cut, full): each row's val predictions are in its
RUN's metrics.json ("val_predictions") and its held-out accuracy in bench.json, so every
rule is judged on the same trials, at no training cost. This is how `search.best_trial`
was chosen (README, "The search").

    autotransfer bench DATA... --quick --seed 0 --out runs/s0     (and --seed 1, ...)
    python benchmarks/bench_selection_rules.py runs/s0 runs/s1 --out benchmarks/results/selection_rules
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autotransfer.metrics import balanced_accuracy_gap_se
from autotransfer.plan import Plan, describe


@dataclass
class Row:
    recipe: str
    score: float  # val balanced accuracy
    loss: float
    predicted: list[int]
    target: list[int]
    heldout: float
    rank: int | None  # position among the rules' Plans of that cell (None: not among them)


def load_cells(bench_dir: Path) -> list[tuple[str, list[Row]]]:
    report = json.loads((bench_dir / "bench.json").read_text())
    cells = []
    for cell in report["cells"]:
        rows = {r["recipe"]: r for r in cell["rows"]}
        ranked = rows["autotransfer"].get("ranked_plans", [])
        size = str(cell["per_class"] or "all")
        grid = []
        for recipe in (name for name, row in rows.items() if "grid" in row["kinds"]):
            metrics = json.loads((bench_dir / "runs" / cell["dataset"] / size / recipe / "metrics.json").read_text())
            description = describe(Plan(**rows[recipe]["plan"]))
            grid.append(Row(
                recipe, metrics["val"]["balanced_accuracy"], metrics["val"]["loss"],
                metrics["val_predictions"]["predicted"], metrics["val_predictions"]["target"],
                rows[recipe]["heldout_accuracy"], ranked.index(description) if description in ranked else None,
            ))
        cells.append((f"{cell['dataset']} {size} (seed {report['settings']['seed']})", grid))
    return cells


def val_best(rows: list[Row]) -> Row:
    return max(rows, key=lambda r: (r.score, -r.loss))


def within_one_se(rows: list[Row]) -> list[Row]:
    top = val_best(rows)
    return [r for r in rows if top.score - r.score <= balanced_accuracy_gap_se(r.predicted, top.predicted, r.target)]


def one_se_rules_rank(rows: list[Row]) -> Row:
    ranked = [r for r in within_one_se(rows) if r.rank is not None]
    return min(ranked, key=lambda r: r.rank) if ranked else val_best(rows)


def one_se_lowest_loss(rows: list[Row]) -> Row:
    return min(within_one_se(rows), key=lambda r: r.loss)


RULES: dict[str, tuple[str, Callable[[list[Row]], Row]]] = {
    "val_best": ("best val balanced accuracy, ties to the lower val loss (what best_trial does among the rules' Plans)", val_best),
    "one_se_rules_rank": ("within 1 SE of the best: the rules' highest-ranked Plan", one_se_rules_rank),
    "one_se_lowest_loss": ("within 1 SE of the best: the lowest val loss", one_se_lowest_loss),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_dirs", type=Path, nargs="+", help="--out folders of `autotransfer bench` runs")
    parser.add_argument("--out", type=Path, required=True, help="Writes OUT.md and OUT.json.")
    args = parser.parse_args()
    try:
        cells = [cell for d in args.bench_dirs for cell in load_cells(d)]
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: {exc} (each folder needs bench.json and runs/ from a bench run of this version)", file=sys.stderr)
        return 1
    picks = {name: [] for name in RULES}
    for _, rows in cells:
        best = max(r.heldout for r in rows)
        for name, (_, rule) in RULES.items():
            pick = rule(rows)
            picks[name].append({"recipe": pick.recipe, "regret": round(100 * (best - pick.heldout), 2)})
    summary = {
        name: {
            "rule": RULES[name][0],
            "within_1_point": sum(p["regret"] <= 1.0 for p in ps),
            "cells": len(ps),
            "mean_regret": round(sum(p["regret"] for p in ps) / len(ps), 2),
        }
        for name, ps in picks.items()
    }
    lines = ["# Selection rules replayed on the bench grid", "",
             f"Runs: {', '.join(str(d) for d in args.bench_dirs)}; {len(cells)} cells. "
             "Regret: held-out accuracy points below the grid's best in that cell.", "",
             "| rule | within 1 point | mean regret |", "|---|---|---|"]
    lines += [f"| {s['rule']} | {s['within_1_point']} of {s['cells']} | {s['mean_regret']:+.2f} |" for s in summary.values()]
    lines += ["", "| cell | " + " | ".join(RULES) + " |", "|---|" + "---|" * len(RULES)]
    for i, (cell, _) in enumerate(cells):
        lines.append(f"| {cell} | " + " | ".join(f"{picks[n][i]['recipe']} ({picks[n][i]['regret']:+.1f})" for n in RULES) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"runs": [str(d) for d in args.bench_dirs], "summary": summary,
         "cells": [{"cell": c, **{n: picks[n][i] for n in RULES}} for i, (c, _) in enumerate(cells)]}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
