"""fit's screen from plain data: the ranked table, one line per trial, the plain lines a
log keeps, and the summary. The drawn terminal (bar, box) is tested through a real
pseudo-terminal in test_cli.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from autotransfer.api import Run
from autotransfer.plan import Plan
from autotransfer.search import SearchProgress, TrialRecord
from autotransfer.terminal import Screen, cost, short, trial_line

BASE = Plan("test_efficientnet", image_size=32, epochs=4, lr=0.003)
PLANS = [
    replace(BASE, reasons=["6 images/class (<= 20: few) and near ImageNet -> frozen extractor",
                           "k-NN on features is best at the top (1.000)"]),
    replace(BASE, all_levels=True, reasons=["alternative 2: 6 images/class", "every feature level at once (Head2Toe)"]),
    replace(BASE, strategy="partial", cut=3, reasons=["alternative 3: 6 images/class", "fine-tune the top 3 of 6 groups"]),
    replace(BASE, strategy="full", bn_mode="train", augment="strong", reasons=["alternative 4: 6 images/class", "fastai's recipe"]),
]


def test_a_plan_in_a_few_words_and_its_cost_in_passes() -> None:
    assert [short(p) for p in PLANS] == [
        "frozen @ top", "frozen @ every level", "partial, cut 3 @ top, 4 ep, lr 0.003",
        "full @ top, 4 ep, lr 0.003, BN train, strong aug",
    ]
    assert short(replace(BASE, feature_level=2)) == "frozen @ level 2"
    assert [cost(p, PLANS[:i]) for i, p in enumerate(PLANS)] == ["1 pass", "head only", "~8 passes", "~12 passes"]
    assert cost(replace(BASE, image_size=64), PLANS) == "1 pass"  # another input size: a pass of its own


def test_the_ranked_table_shows_each_plans_own_reason_and_every_reason_when_verbose(capsys) -> None:
    Screen(live=False).ranked(PLANS)
    out = capsys.readouterr().out
    assert out.startswith("ranked plans (the rules' order; the search tries them first):\n")
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")] for line in out.splitlines()
            if "|" in line}
    assert rows["#"] == ["#", "backbone", "plan", "cost", "why"]
    assert rows["1"] == ["1", "test_efficientnet", "frozen @ top", "1 pass",
                         "6 images/class (<= 20: few) and near ImageNet -> frozen extractor"]
    assert rows["3"][2:] == ["partial, cut 3 @ top, 4 ep, lr 0.003", "~8 passes", "fine-tune the top 3 of 6 groups"]
    assert "alternative" not in out and "(every reason: -v" in out
    assert "\r" not in out and "\x1b" not in out and all(line == line.rstrip() for line in out.splitlines())

    Screen(live=False, verbose=True).ranked(PLANS)
    out = capsys.readouterr().out
    assert all(reason in out for plan in PLANS for reason in plan.reasons)


def _record(number: int, **change) -> TrialRecord:
    return replace(TrialRecord(number, PLANS[2], 0.8125, False, 12.4), **change)


def test_one_line_per_finished_trial() -> None:
    assert trial_line(SearchProgress(3, 9, None, _record(2))) == (
        "trial 2 balanced accuracy 0.8125 (val): test_efficientnet, partial, cut 3 @ top, 4 ep, lr 0.003, 12s [3/9]")
    assert trial_line(SearchProgress(4, None, 30.0, _record(5, score=None, pruned_at=1))) == (
        "trial 5 pruned after epoch 1: test_efficientnet, partial, cut 3 @ top, 4 ep, lr 0.003, 12s [4/?]")
    cv = trial_line(SearchProgress(1, 2, None, _record(0, plan=PLANS[0], cross_validated=True)))
    assert cv.startswith("trial 0 balanced accuracy 0.8125 (cross-validated): test_efficientnet, frozen @ top")


def test_a_log_gets_each_trials_start_and_one_result_line_and_verbose_gets_everything(capsys) -> None:
    search_lines = ["search: 2 trials, the rules' Plans (1 fine-tuned)", "trial 0: test_efficientnet, frozen extractor at top",
                    "  -> cross-validated balanced accuracy 1.0000 on 24 images, in 0s", "trial 1 (80s of the search budget left): x",
                    "  fold 1 of 5: balanced accuracy 1.0000", "  -> pruned: val balanced accuracy 0.2 at step 1"]
    for verbose in (False, True):
        screen = Screen(live=False, verbose=verbose)
        screen.log("before the search")
        screen.watch(SearchProgress(0, 2, None))
        for line in search_lines[:3]:
            screen.log(line)
        screen.watch(SearchProgress(1, 2, None, _record(0, plan=PLANS[0], cross_validated=True)))
        for line in search_lines[3:]:
            screen.log(line)
        screen.watch(SearchProgress(2, 2, None, _record(1, score=None, pruned_at=1)))
        screen.close()
        lines = capsys.readouterr().out.splitlines()
        kept = search_lines if verbose else [line for line in search_lines if not line.startswith("  -> ")]
        assert [line for line in lines if line in search_lines or line == "before the search"] == ["before the search", *kept]
        assert sum(line.startswith(("trial 0 balanced", "trial 1 pruned")) for line in lines) == 2


def test_quiet_prints_no_progress_and_warnings_go_to_stderr(capsys) -> None:
    screen = Screen(live=False, quiet=True)
    screen.log("data: 3 classes")
    screen.ranked(PLANS)
    screen.watch(SearchProgress(0, 1, None))
    screen.watch(SearchProgress(1, 1, None, _record(0)))
    screen.warn("skipped 1 file")
    out, err = capsys.readouterr()
    assert out == "" and err == "skipped 1 file\n"


def _decided_run(tmp_path: Path) -> Run:
    """A RUN folder as a search leaves it, written by hand: plan, metrics, leaderboard."""
    won = "won the search: trial 1 of 3, cross-validated balanced accuracy 1.0000 (runner-up trial 0: 0.9000)"
    replace(PLANS[1], reasons=[*PLANS[1].reasons, won]).save(tmp_path / "plan.json")
    scores = {"accuracy": 0.95, "balanced_accuracy": 0.9, "macro_f1": 0.85}
    (tmp_path / "metrics.json").write_text(json.dumps({"val": scores, "test": {**scores, "accuracy": 0.8, "n": 10}}))
    (tmp_path / "leaderboard.csv").write_text("trial,state\n1,COMPLETE\n")
    return Run(tmp_path, seconds=42.4)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_summary_as_lines_says_decision_why_scores_and_where(tmp_path: Path, capsys, verbose: bool) -> None:
    run = _decided_run(tmp_path)
    Screen(live=False, verbose=verbose).summary(run, decided=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "done in 42s: val accuracy 0.9500, balanced 0.9000, macro-F1 0.8500; test accuracy 0.8000",
        f"run saved in {tmp_path}/ (model.pt, plan.json, metrics.json)",
        "decision: test_efficientnet, frozen extractor at every feature level",
    ]
    reasons = run.plan.reasons if verbose else run.plan.reasons[-1:]
    assert lines[3:] == [*(f"  - {r}" for r in reasons), f"all trials: {tmp_path}/leaderboard.csv"]


def test_an_explicit_run_has_no_decision(frozen_run: Path, capsys) -> None:
    Screen(live=False).summary(Run(frozen_run, seconds=3.0), decided=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("done in 3s: val accuracy")
    assert lines[1] == f"run saved in {frozen_run}/ (model.pt, plan.json, metrics.json)"
