"""What `autotransfer fit` shows while it works: the ranked candidate Plans as a short
table, one line per finished trial, one progress bar over the whole search (trials done,
budget left, ETA) and a summary box at the end.

On a terminal it draws with rich; in a log file, a pipe, or with --no-progress or
--quiet, the same content comes as whole plain lines: no carriage returns, no colour
codes. It takes plain data (Plans, SearchProgress, the Run) and imports neither
Lightning nor Optuna, so the command line stays a thin layer.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

from autotransfer.plan import Plan, describe

if TYPE_CHECKING:
    from autotransfer.api import Run
    from autotransfer.search import SearchProgress, TrialRecord

# The search's own lines about each trial (selector.trial_runner): where the bar shows the
# running trial and `trial` prints one line per finished one, these say nothing more.
_TRIAL_STARTED = re.compile(r"trial \d+( \(.*\))?: ")
_TRIAL_FOLD, _TRIAL_RESULT = "  fold ", "  -> "


def short(plan: Plan) -> str:
    """A Plan in a few words, for a table cell: strategy, depth, and what fine-tuning sets."""
    depth = ("every level" + {"level": "", "feature": ", per feature", "ensemble": ", mean of 3"}[plan.all_levels_mode]) if plan.all_levels else "top" if plan.feature_level is None else f"level {plan.feature_level}"
    if plan.strategy == "frozen":
        return f"frozen @ {depth}"
    what = f"partial, cut {plan.cut}" if plan.strategy == "partial" else "full"
    extras = [f"{plan.epochs} ep", f"lr {plan.lr:.2g}"]
    extras += ["BN train"] if plan.bn_mode == "train" else []
    extras += ["strong aug"] if plan.augment == "strong" else []
    return f"{what} @ {depth}, {', '.join(extras)}"


def cost(plan: Plan, earlier: list[Plan]) -> str:
    """Rough cost in passes over the training images, before anything is timed: a frozen
    Plan needs one forward pass, shared by the frozen Plans of its backbone and input size
    after the first (then only a linear head); a fine-tuning epoch is a forward and a
    backward pass, about 2 passes when part of the network trains, 3 when all of it does."""
    if plan.strategy == "frozen":
        shared = any(p.strategy == "frozen" and (p.backbone, p.image_size) == (plan.backbone, plan.image_size)
                     for p in earlier)
        return "head only" if shared else "1 pass"
    return f"~{plan.epochs * (2 if plan.strategy == 'partial' else 3)} passes"


def trial_line(progress: "SearchProgress") -> str:
    """One finished trial in one line: score (or where it was pruned), Plan, time, count."""
    trial: TrialRecord = progress.trial
    count = f"[{progress.finished}/{progress.planned if progress.planned is not None else '?'}]"
    if trial.score is None:
        outcome = f"pruned after epoch {trial.pruned_at}" if trial.pruned_at is not None else "pruned"
    else:
        outcome = f"balanced accuracy {trial.score:.4f} ({'cross-validated' if trial.cross_validated else 'val'})"
    return f"trial {trial.number} {outcome}: {trial.plan.backbone}, {short(trial.plan)}, {trial.seconds:.0f}s {count}"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class _ClockColumn(ProgressColumn):
    """Time left to a deadline kept in the task's fields: the bar redraws it every tick."""

    def __init__(self, field: str, label: str) -> None:
        super().__init__()
        self.field, self.label = field, label

    def render(self, task: Task) -> Text:
        deadline = task.fields.get(self.field)
        return Text("" if deadline is None else f"{self.label} {_clock(deadline - time.monotonic())}")


class Screen:
    """fit's output: `log` and `warn` for lines, `ranked` for the candidates, `watch` for
    the search (the API's callbacks), `summary` for the result; `close` ends the bar.

    `live` draws with rich (a terminal); otherwise everything is whole plain lines.
    `verbose` adds every Plan's reasons and the search's own lines about each trial.
    `quiet` prints only warnings and the result. `stderr` sends it all to stderr (stdout
    then holds a JSON result alone).
    """

    def __init__(self, live: bool, verbose: bool = False, quiet: bool = False, stderr: bool = False) -> None:
        self.live, self.verbose, self.quiet = live, verbose, quiet
        # plain: wide, so that a log keeps a table row or a line whole
        self.console = Console(stderr=stderr, force_terminal=live, no_color=not live, width=None if live else 160,
                               markup=False, emoji=False, highlight=False)
        self.errors = Console(stderr=True, force_terminal=False, no_color=True, markup=False, emoji=False,
                              highlight=False)
        self._bar: Progress | None = None
        self._task = None
        self._started = 0.0  # when this process's search began
        self._done_here = 0  # trials this process finished since
        self._searching = False

    def print(self, line: str) -> None:
        """A whole line, above the bar while there is one; never re-wrapped."""
        self.console.print(line, soft_wrap=True)

    def log(self, line: str) -> None:
        if self.quiet:
            return
        if self._searching and not self.verbose:
            if line.startswith(_TRIAL_RESULT):
                return  # `trial_line` says it
            if self._bar is not None and (_TRIAL_STARTED.match(line) or line.startswith(_TRIAL_FOLD)):
                self._bar.update(self._task, description=line.strip())
                return
        self.print(line)

    def warn(self, line: str) -> None:
        if self._bar is not None:
            self.console.print(line, soft_wrap=True, style="yellow")  # above the bar, on its console
        else:
            self.errors.print(line, soft_wrap=True)

    def ranked(self, plans: list[Plan]) -> None:
        """The candidates as a table: rank, backbone, Plan in short, estimated cost, and why
        (its own reason; every reason with `verbose`)."""
        if self.quiet:
            return
        self.print("ranked plans (the rules' order; the search tries them first):")
        table = Table(box=box.SIMPLE_HEAD if self.live else box.ASCII2, show_edge=False, pad_edge=False)
        for name, justify in (("#", "right"), ("backbone", "left"), ("plan", "left"), ("cost", "right")):
            table.add_column(name, justify=justify, no_wrap=self.live)
        table.add_column("why", overflow="fold")
        compact = self.live and not self.verbose  # a row a Plan on a screen; a log keeps the whole reason
        for rank, plan in enumerate(plans, start=1):
            why = Text("\n".join(plan.reasons) if self.verbose else _own_reason(plan), no_wrap=compact,
                       overflow="ellipsis" if compact else "fold")
            table.add_row(str(rank), plan.backbone, short(plan), cost(plan, plans[: rank - 1]), why)
        if self.live:
            self.console.print(table)
        else:  # a log keeps no padding at the ends of lines
            with self.console.capture() as captured:
                self.console.print(table)
            for line in captured.get().splitlines():
                self.print(line.rstrip())
        if not self.verbose:
            self.print("(every reason: -v, plan.json and `autotransfer report`; cost in passes over the training images)")

    def watch(self, progress: "SearchProgress") -> None:
        """The search started (no trial yet) or finished a trial: a line, and the bar."""
        if progress.trial is None:
            self._search_started(progress)
            return
        self._done_here += 1
        if not self.quiet:
            self.print(trial_line(progress))
        if self._bar is not None:
            left = None if progress.planned is None else max(0, progress.planned - progress.finished)
            eta = None if left is None else (time.monotonic() - self._started) / self._done_here * left
            if progress.budget_left is not None:
                eta = progress.budget_left if eta is None else min(eta, progress.budget_left)
            self._bar.update(self._task, completed=progress.finished, total=progress.planned, description="",
                             eta=None if eta is None else time.monotonic() + eta)

    def _search_started(self, progress: "SearchProgress") -> None:
        self._searching, self._started, self._done_here = True, time.monotonic(), 0
        if not self.live or self.quiet or self._bar is not None:
            return
        budget = None if progress.budget_left is None else time.monotonic() + progress.budget_left
        self._bar = Progress(
            TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"),
            _ClockColumn("budget", "budget left"), _ClockColumn("eta", "ETA"), TextColumn("{task.description}"),
            console=self.console, transient=False,
        )
        self._task = self._bar.add_task("", total=progress.planned, completed=progress.finished,
                                        budget=budget, eta=None)
        self._bar.start()

    def close(self) -> None:
        """Stop the bar, leaving it drawn where it ended; safe to call more than once."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._searching = False

    def __enter__(self) -> "Screen":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self, run: "Run", decided: bool) -> None:
        """The result: decision (when autotransfer `decided`), accuracy, time, where things are."""
        self.close()
        rows = summary_rows(run, decided, self.verbose)
        if not self.live:
            for line in _plain_summary(run, rows, decided, self.verbose):
                self.print(line)
            return
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for key, value in rows:
            grid.add_row(key, value)
        self.console.print(Panel(grid, title="autotransfer fit: done", title_align="left", box=box.ROUNDED,
                                 expand=False))


def _own_reason(plan: Plan) -> str:
    """The reason that sets this Plan apart: the rule that chose it, not the data facts
    every Plan shares (imbalance, small images) nor the "alternative N" preface."""
    own = [r for r in plan.reasons if not r.startswith("alternative ")]
    lead = [r for r in own if " -> " in r and not r.startswith(("classes imbalanced", "small images"))]
    return (lead or own[-1:] or [""])[0]


def summary_rows(run: "Run", decided: bool, verbose: bool = False) -> list[tuple[str, str]]:
    """(label, text) pairs of the summary box, in order."""
    metrics, plan, out = run.metrics or {}, run.plan, run.path
    rows: list[tuple[str, str]] = []
    if plan is not None:
        rows.append(("decision" if decided else "trained", describe(plan)))
        reasons = plan.reasons if verbose else [r for r in plan.reasons if r.startswith("won the search")]
        rows += [("why" if i == 0 else "", reason) for i, reason in enumerate(reasons)]
    val = metrics.get("val")
    if val:
        rows.append(("val", f"accuracy {val['accuracy']:.4f}, balanced {val['balanced_accuracy']:.4f}, "
                            f"macro-F1 {val['macro_f1']:.4f}"))
    if "test" in metrics:
        test = metrics["test"]
        rows.append(("held-out", f"test accuracy {test['accuracy']:.4f}, balanced {test['balanced_accuracy']:.4f} "
                                 f"({test.get('n', '?')} images of test/)"))
    if run.seconds is not None:
        rows.append(("time", f"{run.seconds:.0f}s"))
    rows.append(("model", f"{out / 'model.pt'}"))
    rows.append(("plan", f"{out / 'plan.json'} (with every reason)"))
    if (out / "leaderboard.csv").is_file():
        rows.append(("trials", f"{out / 'leaderboard.csv'}"))
    report = out / "report" / "report.html"
    rows.append(("report", str(report) if report.is_file() else f"`autotransfer report {out}` writes {report}"))
    return rows


def _plain_summary(run: "Run", rows: list[tuple[str, str]], decided: bool, verbose: bool) -> list[str]:
    """The summary as lines a log keeps and scripts grep (`done in`, `run saved in`, `decision:`)."""
    metrics, out = run.metrics or {}, Path(run.path)
    lines = []
    val = metrics.get("val")
    if val:
        lines.append(
            f"done in {run.seconds or 0:.0f}s: val accuracy {val['accuracy']:.4f}, balanced {val['balanced_accuracy']:.4f}, "
            f"macro-F1 {val['macro_f1']:.4f}"
            + (f"; test accuracy {metrics['test']['accuracy']:.4f}" if "test" in metrics else "")
        )
    lines.append(f"run saved in {out}/ (model.pt, plan.json, metrics.json)")
    if decided and run.plan is not None:
        lines.append(f"decision: {describe(run.plan)}")
        lines += [f"  - {value}" for key, value in rows if key in ("why", "")]
        if (out / "leaderboard.csv").is_file():
            lines.append(f"all trials: {out}/leaderboard.csv")
    return lines
