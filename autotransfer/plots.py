"""The report's figures, as PNG bytes: embedded as data URIs in HTML, saved for Markdown.

Plain data in, bytes out; matplotlib's object API on the Agg canvas (no pyplot, no
global state, no display), so figures can be drawn from any thread or process.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

STRATEGY_COLOURS = {"frozen": "#1f77b4", "partial": "#ff7f0e", "full": "#2ca02c"}
DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def class_balance(classes: Sequence[str], per_split: dict[str, dict[str, int]]) -> bytes:
    """Images per class and split, side by side; sorted, unlabelled bars past 40 classes."""
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    splits = list(per_split)
    many = len(classes) > 40
    order = sorted(classes, key=lambda c: -per_split[splits[0]].get(c, 0)) if many else list(classes)
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        xs = [k + (i - (len(splits) - 1) / 2) * width for k in range(len(order))]
        ax.bar(xs, [per_split[split].get(c, 0) for c in order], width, label=split)
    if many:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(classes)} classes, sorted by {splits[0]} images")
    else:
        ax.set_xticks(range(len(order)), [c[:14] for c in order], rotation=45 if len(order) > 8 else 0, ha="right" if len(order) > 8 else "center")
    ax.set_ylabel("images")
    ax.set_title("images per class")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def distance_by_depth(
    labels: Sequence[str], values: Sequence[float | None], ylabel: str,
    references: dict[str, float] | None = None,
) -> bytes:
    """One bar per depth (stem first); dashed lines for the reference levels."""
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    heights = [0.0 if v is None else v for v in values]
    bars = ax.bar(range(len(labels)), heights, color="#8c6bb1")
    for bar, value in zip(bars, values):
        if value is None:
            ax.text(bar.get_x() + bar.get_width() / 2, 0, "n/a", ha="center", va="bottom", fontsize=8)
    for k, (name, level) in enumerate((references or {}).items()):
        ax.axhline(level, ls="--", lw=1, color=["#555555", "#d62728"][k % 2], label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title("distance to the pretraining data per depth (stem left, top right)")
    if references:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


@dataclass
class Series:
    """One line or set of markers of the layer-transfer figure."""

    label: str
    x: list[float]
    y: list[float]
    colour: str
    marker: str = "o"
    line: bool = True
    dashed: bool = False
    filled: bool = True


def transfer_curve(
    series: Sequence[Series], tick_labels: Sequence[str], baseline: float | None,
    highlight: tuple[float, float] | None,
) -> bytes:
    """Accuracy against the cut (coarse groups kept frozen): Yosinski et al.'s figure."""
    fig = Figure(figsize=(8, 5.2))
    ax = fig.add_subplot()
    for s in series:
        ax.plot(
            s.x, s.y, ls=("--" if s.dashed else "-") if s.line else "none", marker=s.marker,
            color=s.colour, label=s.label, ms=7, mfc=s.colour if s.filled else "white", alpha=0.9,
        )
    if baseline is not None:
        ax.axhline(baseline, color="#777777", lw=1, ls=":", label="majority class (val)")
    if highlight is not None:
        ax.plot(*highlight, marker="*", ms=18, color="gold", mec="black", ls="none", label="chosen", zorder=5)
    ax.set_xticks(range(len(tick_labels)), tick_labels, fontsize=8)
    ax.set_xlim(-0.5, len(tick_labels) - 0.5)
    ax.set_xlabel("cut: coarse groups kept frozen (0 = full fine-tuning; all = frozen extractor)")
    ax.set_ylabel("accuracy")
    ax.set_title("layer transfer: accuracy vs cut depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return _png(fig)


def search_history(
    numbers: Sequence[int], values: Sequence[float | None], states: Sequence[str],
    from_rules: Sequence[bool | None], best: int | None,
) -> bytes:
    """Val balanced accuracy (the objective) per trial: rule-queued squares, sampled circles, pruned hollow, best so far."""
    fig = Figure(figsize=(8, 4.4))
    ax = fig.add_subplot()
    kinds = [("queued by the rules", True, "s", "#1f77b4"), ("sampled (TPE)", False, "o", "#ff7f0e"),
             ("unknown origin", None, "D", "#7f7f7f")]
    for label, origin, marker, colour in kinds:
        for pruned in (False, True):
            pts = [(n, v) for n, v, s, r in zip(numbers, values, states, from_rules)
                   if v is not None and r is origin and (s == "PRUNED") is pruned and s in ("COMPLETE", "PRUNED")]
            if pts:
                ax.plot(*zip(*pts), ls="none", marker=marker, ms=8, color=colour, mfc="white" if pruned else colour,
                        label=f"{label}{', pruned (last report)' if pruned else ''}")
    done = sorted((n, v) for n, v, s in zip(numbers, values, states) if s == "COMPLETE" and v is not None)
    if done:
        xs, running, top = [], [], float("-inf")
        for n, v in done:
            top = max(top, v)
            xs.append(n)
            running.append(top)
        ax.step(xs, running, where="post", color="black", lw=1.2, label="best so far")
    if best is not None:
        ax.plot([best], [dict(done)[best]], marker="*", ms=18, color="gold", mec="black", ls="none", label="chosen")
    failed = [n for n, s in zip(numbers, states) if s not in ("COMPLETE", "PRUNED", "WAITING")]
    for n in failed:
        ax.axvline(n, color="#d62728", alpha=0.25, lw=6)
    waiting = sum(s == "WAITING" for s in states)
    ax.set_xlabel("trial" + (" (red bands: failed or unfinished)" if failed else "")
                  + (f"; {waiting} queued, never started" if waiting else ""))
    ax.set_ylabel("val balanced accuracy")
    ax.set_title("search history")
    if numbers:
        ax.set_xticks(sorted(numbers) if len(numbers) <= 30 else ax.get_xticks())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    return _png(fig)


def confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    """Row-normalised colours, raw counts written in (up to 25 classes)."""
    n = len(classes)
    side = min(9.0, max(3.6, 0.45 * n + 1.8))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    rows = [sum(r) or 1 for r in matrix]
    norm = [[v / rows[i] for v in r] for i, r in enumerate(matrix)]
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 25:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if norm[i][j] > 0.5 else "black")
        ax.set_xticks(range(n), [c[:12] for c in classes], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), [c[:12] for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)
