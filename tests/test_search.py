"""Search: Plans <-> trial parameters, rule Plans first, pruning, resume after kill -9,
two workers on one study (SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from autotransfer.plan import Compute, Plan
from autotransfer.search import (
    SearchConfig,
    adopt_best,
    best_frozen_predictions,
    enqueue_plans,
    fill_queue,
    make_objective,
    open_study,
    params_from_plan,
    parse_duration,
    plan_from_params,
    run_search,
    watch_search,
)

BACKBONE = "test_efficientnet"
BASE = Plan(BACKBONE, weights="random", epochs=1)


def fake_accuracy(plan: Plan) -> float:
    """A made-up landscape: partial fine-tuning of 2 groups at the top is best."""
    score = {"frozen": 0.6, "partial": 0.8, "full": 0.7}[plan.strategy]
    if plan.strategy == "partial":
        score += 0.05 * (plan.cut == 3)
    return score - 0.1 * (plan.feature_level is not None)


FAKE_VAL_N = 100


def fake_loss(plan: Plan) -> float:
    """Lower for deeper-truncated Plans, so accuracy ties have a loss to break them."""
    return 1.0 - 0.1 * (plan.feature_level or 0)


def fake_trial(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
    """Writes what a real trial writes, reports like one, costs nothing."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    accuracy = fake_accuracy(plan)
    for step in range(3):
        report(step, accuracy)
    (trial_dir / "model.pt").write_bytes(b"fake")
    macro_f1 = accuracy - 0.001 * (plan.feature_level or 0)
    metrics = {"val": {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": macro_f1,
                       "loss": fake_loss(plan), "n": FAKE_VAL_N}}
    (trial_dir / "metrics.json").write_text(json.dumps(metrics))
    time.sleep(float(os.environ.get("FAKE_TRIAL_SECONDS", "0")))
    return metrics


def rule_plans() -> list[Plan]:
    return [
        replace(BASE, strategy="frozen", reasons=["rule: few images per class"]),
        replace(BASE, strategy="partial", cut=4, reasons=["rule: medium data"]),
    ]


def config(storage: str, trials: int | None = 6, heartbeat_seconds: int = 10) -> SearchConfig:
    return SearchConfig(
        data="unused", storage=storage, backbones=[BACKBONE], base=BASE, trials=trials,
        heartbeat_seconds=heartbeat_seconds,
    )


@pytest.mark.parametrize(
    "plan",
    [
        replace(BASE, strategy="frozen"),
        replace(BASE, strategy="frozen", feature_level=3),
        replace(BASE, strategy="partial", cut=2),
        replace(BASE, strategy="partial", cut=1, feature_level=2),
        replace(BASE, strategy="full", bn_mode="train", epochs=4),
        replace(BASE, strategy="frozen", all_levels=True),
        replace(BASE, strategy="frozen", all_levels=True, all_levels_mode="feature"),
    ],
)
def test_params_round_trip(plan: Plan) -> None:
    assert plan_from_params(params_from_plan(plan, [BACKBONE]), BASE) == plan


def test_the_rules_frozen_plans_at_every_level_lie_in_the_search_space(tmp_path: Path) -> None:
    """Far data enqueues a frozen Plan at each feature level; a fixed value outside the
    sampler's range made Optuna warn in every such `fit` and hid the trial from TPE."""
    from autotransfer.strategies import depth_of

    _, levels = depth_of(BACKBONE, None)
    plans = [replace(BASE, strategy="frozen", feature_level=level) for level in range(levels)]
    cfg = config(":memory:", trials=len(plans) + 2)
    study = open_study(cfg)
    enqueue_plans(study, plans, cfg.backbones)
    fill_queue(study, cfg.trials)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "Fixed parameter ... is out of range" included
        run_search(study, cfg, tmp_path, fake_trial)
    trials = study.get_trials()
    assert [plan_from_params(t.params, BASE).feature_level for t in trials[:levels]] == list(range(levels))
    assert all(t.distributions["levels_below_top"].high == levels for t in trials)


def test_the_users_epochs_and_learning_rate_lie_in_the_search_space(tmp_path: Path) -> None:
    """`fit --epochs 20 --lr 0.05` puts them in every rule Plan; the sampler's ranges
    stretch to them (and no further), so Optuna neither warns nor clips them."""
    base = replace(BASE, epochs=20, lr=0.05)
    cfg = replace(config(":memory:", trials=2), base=base)
    study = open_study(cfg)
    enqueue_plans(study, [replace(base, strategy="full")], cfg.backbones)
    fill_queue(study, cfg.trials)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_search(study, cfg, tmp_path, fake_trial)
    first = study.get_trials()[0]
    assert plan_from_params(first.params, base) == replace(base, strategy="full")
    assert (first.distributions["epochs"].low, first.distributions["epochs"].high) == (2, 20)
    assert (first.distributions["lr"].low, first.distributions["lr"].high) == (1e-4, 0.05)


def test_trials_and_workers_train_where_the_search_was_told(tmp_path: Path) -> None:
    """The search's base Plan carries its Compute to every trial and, in search.json, to
    `--resume` and workers."""
    base = replace(BASE, compute=Compute("cpu", 2, "bf16-mixed"))
    trial = plan_from_params(params_from_plan(replace(base, strategy="partial", cut=2), [BACKBONE]), base)
    assert trial.compute == Compute("cpu", 2, "bf16-mixed")
    replace(config(":memory:"), base=base).save(tmp_path)
    assert SearchConfig.load(tmp_path).base.compute == base.compute


def test_what_exists_before_a_search_is_frozen_for_the_gc_only_while_it_runs(tmp_path: Path) -> None:
    """gc.freeze spares each trial's gc_after_trial the imports' objects; a notebook's later
    garbage must still be collectable after the search."""
    cfg = config(":memory:", trials=1)
    study = open_study(cfg)
    enqueue_plans(study, rule_plans()[:1], cfg.backbones)
    seen = []

    def trial_seeing_the_freeze(plan, trial_dir, report, after_fold=None):
        seen.append(gc.get_freeze_count())
        return fake_trial(plan, trial_dir, report, after_fold)

    run_search(study, cfg, tmp_path, trial_seeing_the_freeze)
    assert len(seen) == 1 and seen[0] > 10_000
    assert gc.get_freeze_count() == 0


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("ten minutes")


def test_rule_plans_run_first_and_best_is_adopted(tmp_path: Path) -> None:
    cfg = config(":memory:", trials=6)
    study = open_study(cfg)
    enqueue_plans(study, rule_plans(), cfg.backbones)
    fill_queue(study, cfg.trials)
    run_search(study, cfg, tmp_path, fake_trial)

    trials = study.get_trials()
    assert len(trials) == 6
    first = [plan_from_params(t.params, BASE) for t in trials[:2]]
    assert [p.strategy for p in first] == ["frozen", "partial"]
    assert first[1].cut == 4
    plan, best = adopt_best(study, tmp_path)
    assert best.value == max(t.value for t in trials if t.value is not None)
    assert (tmp_path / "model.pt").read_bytes() == b"fake"
    assert any("won the search" in reason for reason in plan.reasons)
    leaderboard = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert leaderboard[0].startswith("trial,state,val_balanced_accuracy,val_accuracy")
    assert len(leaderboard) == 7


def test_pruner_stops_a_hopeless_trial(tmp_path: Path) -> None:
    cfg = config(":memory:", trials=None)
    study = open_study(cfg)
    for _ in range(4):
        study.enqueue_trial({"strategy": "partial", "levels_below_top": 0, "trained_groups": 2,
                             "lr": 1e-3, "weight_decay": 1e-4, "class_weighting": False,
                             "backbone_lr_ratio": 0.1, "epochs": 2, "bn_mode": "frozen"})
    study.enqueue_trial({"strategy": "frozen", "levels_below_top": 2, "lr": 1e-3,
                         "weight_decay": 1e-4, "class_weighting": False})
    study.optimize(
        lambda t: _objective_via_run_search(t, cfg, tmp_path), n_trials=5
    )
    states = [t.state for t in study.get_trials()]
    assert states[:4] == [optuna.trial.TrialState.COMPLETE] * 4
    assert states[4] == optuna.trial.TrialState.PRUNED


def test_pruner_needs_three_finished_trials_at_a_step(tmp_path: Path) -> None:
    """Behind the median of one or two trials is little evidence: with two finished
    fine-tuning trials (fake landscape: 0.85) a worse full one (0.70) runs on; with three
    it is pruned at its first epoch."""
    partial = {"strategy": "partial", "levels_below_top": 0, "trained_groups": 3, "lr": 1e-3,
               "weight_decay": 1e-4, "class_weighting": False, "backbone_lr_ratio": 0.1,
               "epochs": 2, "bn_mode": "frozen"}
    for finished, pruned in ((2, False), (3, True)):
        cfg = config(":memory:", trials=None)
        study = open_study(cfg)
        for _ in range(finished):
            study.enqueue_trial(partial)
        study.enqueue_trial({"strategy": "full", "levels_below_top": 0, "lr": 1e-3, "weight_decay": 1e-4,
                             "class_weighting": False, "backbone_lr_ratio": 0.1, "epochs": 2, "bn_mode": "frozen"})
        study.optimize(lambda t: _objective_via_run_search(t, cfg, tmp_path), n_trials=finished + 1)
        last = study.get_trials()[-1]
        assert (last.state == optuna.trial.TrialState.PRUNED) is pruned, (finished, last.state)


def _objective_via_run_search(trial, cfg, tmp_path):
    from autotransfer.search import make_objective

    return make_objective(cfg, tmp_path, fake_trial)(trial)


def _worker(storage: str, run_dir: str) -> None:
    cfg = config(storage)
    study = open_study(cfg)
    run_search(study, cfg, Path(run_dir), fake_trial)


def _two_workers_finish_exactly(storage: str, tmp_path: Path, trials: int = 8) -> None:
    cfg = config(storage, trials=trials)
    study = open_study(cfg)
    enqueue_plans(study, rule_plans(), cfg.backbones)
    fill_queue(study, trials)
    ctx = multiprocessing.get_context("spawn")
    env_before = os.environ.get("FAKE_TRIAL_SECONDS")
    os.environ["FAKE_TRIAL_SECONDS"] = "0.2"
    try:
        workers = [ctx.Process(target=_worker, args=(storage, str(tmp_path))) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=180)
            assert w.exitcode == 0
    finally:
        if env_before is None:
            os.environ.pop("FAKE_TRIAL_SECONDS")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    states = [(t.number, t.state.name, t.user_attrs.get("queued")) for t in study.get_trials()]
    assert len(done) == trials, str(states)  # none lost, none extra
    assert len({t.number for t in done}) == trials  # none duplicated
    queued_rules = [t for t in done if t.user_attrs.get("reasons")]
    assert len(queued_rules) == 2  # each rule Plan ran exactly once
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == [f"{t.number:04d}" for t in done]


def test_two_workers_sqlite(tmp_path: Path) -> None:
    _two_workers_finish_exactly(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url(tmp_path: Path):
    """A real PostgreSQL server on loopback for this test, or a skip saying why not."""
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'psycopg[binary]')")
    bin_dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    initdb = shutil.which("initdb") or next((str(d / "initdb") for d in bin_dirs), None)
    pg_ctl = shutil.which("pg_ctl") or next((str(d / "pg_ctl") for d in bin_dirs), None)
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    data = Path("/tmp") / f"at-pg-{os.getpid()}-{tmp_path.name}"
    data.mkdir(mode=0o700)
    if run_as:
        shutil.chown(data, "postgres")
    port = _free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "autotransfer"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-w", "-l", str(data / "log"), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://autotransfer@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_postgresql(postgres_url: str, tmp_path: Path) -> None:
    _two_workers_finish_exactly(postgres_url, tmp_path)


RESUMABLE = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_search import config, fake_trial, rule_plans
from autotransfer.search import enqueue_plans, fill_queue, open_study, run_search
cfg = config({storage!r}, trials=5, heartbeat_seconds=1)
study = open_study(cfg)
enqueue_plans(study, rule_plans(), cfg.backbones)
fill_queue(study, 5)
run_search(study, cfg, Path({run!r}), fake_trial)
"""


def test_resume_after_kill_loses_no_finished_trial(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    script = RESUMABLE.format(tests=str(Path(__file__).parent), storage=storage, run=str(tmp_path))
    open_study(config(storage, trials=5, heartbeat_seconds=1))  # tables exist before polling
    env = {**os.environ, "FAKE_TRIAL_SECONDS": "1.5"}
    log = (tmp_path / "search.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=log, stderr=log)
    study = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.3)
        study = optuna.load_study(study_name="autotransfer", storage=storage)
        if len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) >= 2:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert study is not None
    finished = {t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert len(finished) >= 2

    time.sleep(3.5)  # past the heartbeat grace period: the killed trial is stale
    cfg = config(storage, trials=5, heartbeat_seconds=1)
    resumed = open_study(cfg)
    assert not resumed.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    fill_queue(resumed, 5)
    run_search(resumed, cfg, tmp_path, fake_trial)
    done = resumed.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert finished <= {t.number for t in done}  # nothing finished before the kill is lost
    assert len(done) == 5


KILLED_BEFORE_HEARTBEAT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_search import config
from autotransfer.search import fill_queue, open_study
study = open_study(config({storage!r}, trials=3, heartbeat_seconds=1))
fill_queue(study, 3)
study.ask()  # what Optuna does before starting a trial's heartbeat thread
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_fails_a_trial_killed_before_its_first_heartbeat(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    script = KILLED_BEFORE_HEARTBEAT.format(tests=str(Path(__file__).parent), storage=storage)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = optuna.load_study(study_name="autotransfer", storage=storage)
    assert len(killed.get_trials(states=(optuna.trial.TrialState.RUNNING,))) == 1

    time.sleep(3.5)  # past the grace period
    cfg = config(storage, trials=3, heartbeat_seconds=1)
    resumed = open_study(cfg)
    assert not resumed.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    fill_queue(resumed, 3)
    run_search(resumed, cfg, tmp_path, fake_trial)
    assert len(resumed.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3


def test_a_running_trial_younger_than_the_grace_period_is_left_alone(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(config(storage, trials=1, heartbeat_seconds=1))
    study.ask()  # another worker's trial, just started
    reopened = open_study(config(storage, trials=1, heartbeat_seconds=1))
    assert len(reopened.get_trials(states=(optuna.trial.TrialState.RUNNING,))) == 1


def test_accuracy_ties_go_to_the_lower_validation_loss(tmp_path: Path) -> None:
    cfg = config(":memory:", trials=2)
    study = open_study(cfg)
    tied = [replace(BASE, strategy="frozen", feature_level=level) for level in (2, 3)]
    assert fake_accuracy(tied[0]) == fake_accuracy(tied[1])
    assert fake_loss(tied[1]) < fake_loss(tied[0])  # level 3 has the lower loss, level 2 the higher F1
    enqueue_plans(study, tied, cfg.backbones)
    run_search(study, cfg, tmp_path, fake_trial)
    plan, best = adopt_best(study, tmp_path)
    assert plan.feature_level == 3 and best.user_attrs["val_loss"] == fake_loss(tied[1])
    assert (tmp_path / "leaderboard.csv").read_text().startswith("trial,state,val_balanced_accuracy,val_accuracy,val_loss,")


VAL_TARGETS = [0] * 50 + [1] * 50
RULE_CORRECT = set(range(80))
# Both challengers get 83 of 100 val images right, 3 more than the rules' Plan: one on the
# rule's 80 and 3 more (a lead of ~1.8 standard errors), one on 17..99 (37 disagreements:
# ~0.6 standard errors).
CHALLENGERS = {"close": set(range(83)), "scattered": set(range(17, 100))}


def scored(correct: set[int], cv: bool) -> dict:
    """Metrics of a trial right on the `correct` val images (and, frozen, its CV on them)."""
    predicted = [t if i in correct else 1 - t for i, t in enumerate(VAL_TARGETS)]
    score = len(correct) / len(VAL_TARGETS)  # = balanced accuracy: 50 images per class
    metrics = {"val": {"accuracy": score, "balanced_accuracy": score, "macro_f1": score, "loss": 1.0, "n": 100},
               "val_predictions": {"predicted": predicted, "target": VAL_TARGETS}}
    if cv:
        metrics["cv"] = {"balanced_accuracy": score, "accuracy": score, "predicted": predicted, "target": VAL_TARGETS}
    return metrics


@pytest.mark.parametrize("challenger, sampled_wins", [("close", True), ("scattered", False)])
def test_a_sampled_trial_displaces_the_rules_only_by_more_than_one_standard_error(
    tmp_path: Path, challenger: str, sampled_wins: bool
) -> None:
    cfg = config(":memory:", trials=None)
    study = open_study(cfg)
    rule = replace(BASE, strategy="frozen", feature_level=3, reasons=["rule"])
    sampled = replace(BASE, strategy="frozen", feature_level=2)
    enqueue_plans(study, [rule], cfg.backbones)
    study.enqueue_trial(params_from_plan(sampled, cfg.backbones), user_attrs={"queued": True})  # no reasons: sampled

    def trial(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
        trial_dir.mkdir(parents=True, exist_ok=True)
        return scored(RULE_CORRECT if plan.feature_level == 3 else CHALLENGERS[challenger], cv=True)

    study.optimize(make_objective(cfg, tmp_path, trial), n_trials=2)
    assert {t.value for t in study.trials} == {0.80, 0.83}
    plan, best = adopt_best(study, tmp_path)
    assert (best.user_attrs.get("reasons") is None) == sampled_wins
    if not sampled_wins:
        assert any("is noise" in reason for reason in plan.reasons)


@pytest.mark.parametrize("tuned_correct, tuned_wins", [
    (set(range(84)), True),  # 4 more right, none fewer: a lead of 2 paired SEs
    (set(range(17, 100)), False),  # 3 more right on balance, 37 disagreements: ~0.5 SE
    (set(range(80)), False),  # a tie
])
def test_fine_tuning_replaces_the_best_frozen_trial_only_if_better_beyond_one_se_on_the_same_val_images(
    tmp_path: Path, tuned_correct: set[int], tuned_wins: bool
) -> None:
    """Frozen trials compete on their CV score over every labelled image; the best one
    meets the best fine-tuned trial on the val images both were scored on (its
    out-of-fold predictions there). A lead within one paired SE keeps the frozen one."""
    cfg = config(":memory:", trials=None)
    study = open_study(cfg)
    frozen_cv_high = replace(BASE, strategy="frozen", feature_level=3, reasons=["rule"])
    frozen_cv_low = replace(BASE, strategy="frozen", feature_level=2, reasons=["rule"])
    tuned = replace(BASE, strategy="full", reasons=["rule"])
    enqueue_plans(study, [frozen_cv_high, frozen_cv_low, tuned], cfg.backbones)

    def trial(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
        trial_dir.mkdir(parents=True, exist_ok=True)
        if plan.strategy != "frozen":
            return scored(tuned_correct, cv=False)
        metrics = scored(RULE_CORRECT, cv=True)  # 0.80 on val images for both frozen trials
        metrics["cv"]["balanced_accuracy"] = 0.9 if plan.feature_level == 3 else 0.7
        return metrics

    study.optimize(make_objective(cfg, tmp_path, trial), n_trials=3)
    plan, best = adopt_best(study, tmp_path)
    assert plan.strategy == ("full" if tuned_wins else "frozen")
    if not tuned_wins:
        assert plan.feature_level == 3 and best.value == 0.9  # the CV winner, not val's tie
    ahead = len(tuned_correct) > len(RULE_CORRECT)
    said = " beat frozen trial" if tuned_wins else "led, but by no more than 1 paired standard error" if ahead else "did not beat"
    assert any(said in r for r in plan.reasons)


@pytest.mark.parametrize("folds, tuned_correct, stops", [
    (1, set(range(20)), False),  # one fold: too few images to call
    (2, set(range(50)), True),  # 25 of 40 wrong where the frozen probe is right: far beyond 2 SE
    (2, set(range(80)), False),  # level with the probe on the images scored so far
    (5, set(range(75)), True),  # 5 behind on 100, and never ahead: 2.3 SE
    (5, set(range(10, 85)), False),  # 10 lost, 5 won where they disagree: 1.4 SE, it might be luck
])
def test_a_cross_validated_fine_tune_stops_once_beyond_two_se_behind_the_best_frozen_trial(
    folds: int, tuned_correct: set[int], stops: bool
) -> None:
    from autotransfer.search import stop_when_behind

    rival = {**scored(RULE_CORRECT, cv=True)["cv"], "trial": 0}  # right on images 0..79
    scored_so_far = [i for i in range(100) if i % 50 < 10 * folds]
    predicted = [VAL_TARGETS[i] if i in tuned_correct else 1 - VAL_TARGETS[i] for i in scored_so_far]
    after_fold = stop_when_behind(rival)
    if stops:
        with pytest.raises(optuna.TrialPruned, match=rf"^pruned after {folds} folds: balanced accuracy -0\.\d+ against frozen trial 0 on the same {len(scored_so_far)} images"):
            after_fold(folds, scored_so_far, predicted)
    else:
        after_fold(folds, scored_so_far, predicted)


def test_a_stopped_fine_tune_is_pruned_and_the_decision_says_why(tmp_path: Path) -> None:
    """The search hands a fine-tuning trial the best frozen trial's out-of-fold predictions;
    a trial stopped by them is PRUNED, the frozen one adopted, and its why names the stop."""
    cfg = config(":memory:", trials=None)
    study = open_study(cfg)
    enqueue_plans(study, [replace(BASE, strategy="frozen", reasons=["rule"]), replace(BASE, strategy="full", reasons=["rule"])],
                  cfg.backbones)
    heard = []

    def trial(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
        trial_dir.mkdir(parents=True, exist_ok=True)
        heard.append(after_fold)
        if plan.strategy == "frozen":
            return scored(RULE_CORRECT, cv=True)
        images = [i for i in range(100) if i % 50 < 20]
        after_fold(2, images, [1 - VAL_TARGETS[i] for i in images])  # every image wrong
        raise AssertionError("not stopped")

    study.optimize(make_objective(cfg, tmp_path, trial), n_trials=2)
    assert heard[0] is None and heard[1] is not None  # the first trial had no frozen trial to meet
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    plan, _ = adopt_best(study, tmp_path)
    assert plan.strategy == "frozen"
    assert any("fine-tuned trial 1 was pruned after 2 folds: balanced accuracy -1.0000 against frozen trial 0" in r
               for r in plan.reasons)


def test_the_search_selects_on_balanced_accuracy_not_accuracy(tmp_path: Path) -> None:
    """Of two Plans, the one that guesses the majority class more has the higher accuracy;
    the one right more often on every class wins (what survives a change of class mix)."""
    cfg = config(":memory:", trials=2)
    study = open_study(cfg)
    majority, balanced = (replace(BASE, strategy="frozen", feature_level=level) for level in (2, 3))
    scores = {2: (0.90, 0.70), 3: (0.88, 0.85)}  # feature level -> (accuracy, balanced accuracy)

    def trial(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
        accuracy, score = scores[plan.feature_level]
        report(0, score)
        trial_dir.mkdir(parents=True, exist_ok=True)
        return {"val": {"accuracy": accuracy, "balanced_accuracy": score, "macro_f1": score, "loss": 1.0, "n": FAKE_VAL_N}}

    enqueue_plans(study, [majority, balanced], cfg.backbones)
    run_search(study, cfg, tmp_path, trial)
    plan, best = adopt_best(study, tmp_path)
    assert plan.feature_level == 3 and best.value == 0.85 and best.user_attrs["val_accuracy"] == 0.88
    rows = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert rows[1].split(",")[2:4] == ["0.85", "0.88"]


# ------------------------------------------ interrupted trials, workers, moved runs (issue 16)

KILLED_IN_FINE_TUNING = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_search import config, fake_trial, rule_plans
from autotransfer.search import enqueue_plans, fill_queue, open_study, run_search

def killed_in_fine_tuning(plan, trial_dir, report, after_fold=None):
    if plan.strategy != "frozen":
        report(0, 0.5)  # under way
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_trial(plan, trial_dir, report)

cfg = config({storage!r}, trials=3)
study = open_study(cfg)
enqueue_plans(study, rule_plans(), cfg.backbones)
fill_queue(study, 3)
run_search(study, cfg, Path({run!r}), killed_in_fine_tuning)
"""


def _rules_fine_tune_ran_again(study: optuna.Study, interrupted: int) -> None:
    """The interrupted trial failed, and the rules' Plan it was running finished in its place."""
    trials = study.get_trials()
    assert trials[interrupted].state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == interrupted]
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["reasons"] == ["rule: medium data"]
    assert (retry.user_attrs["plan"]["strategy"], retry.user_attrs["plan"]["cut"]) == ("partial", 4)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3


def test_resume_right_after_kill_9_reruns_the_killed_trials_own_plan(tmp_path: Path) -> None:
    """No wait for the 30 s heartbeat grace: the killed process ran on this machine and is
    gone, so its trial is failed and queued again with the rules' Plan (not a sampled one)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    script = KILLED_IN_FINE_TUNING.format(tests=str(Path(__file__).parent), storage=storage, run=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = optuna.load_study(study_name="autotransfer", storage=storage)
    assert [t.state.name for t in killed.get_trials()] == ["COMPLETE", "RUNNING", "WAITING"]

    cfg = config(storage, trials=3)  # heartbeat 10 s, grace 30 s: far from stale
    resumed = open_study(cfg)
    assert not resumed.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    fill_queue(resumed, 3)
    run_search(resumed, cfg, tmp_path, fake_trial)
    _rules_fine_tune_ran_again(resumed, interrupted=1)


def _interrupted_in_fine_tuning(how: str):
    def run(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
        if plan.strategy != "frozen":
            if how == "keyboard":
                raise KeyboardInterrupt
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                sys.exit(1)  # what Lightning does with Ctrl-C, once it has saved its weights
        return fake_trial(plan, trial_dir, report)

    return run


@pytest.mark.parametrize("how", ["keyboard", "lightning"])
def test_ctrl_c_requeues_the_trial_with_its_own_plan_at_once(tmp_path: Path, how: str) -> None:
    from autotransfer.search import TrialInterrupted

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = config(storage, trials=3)
    study = open_study(cfg)
    enqueue_plans(study, rule_plans(), cfg.backbones)
    fill_queue(study, 3)
    with pytest.raises(TrialInterrupted, match="trial 1 was stopped and queued again"):
        run_search(study, cfg, tmp_path, _interrupted_in_fine_tuning(how))
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL", "WAITING", "WAITING"]

    resumed = open_study(cfg)
    fill_queue(resumed, 3)
    run_search(resumed, cfg, tmp_path, fake_trial)
    _rules_fine_tune_ran_again(resumed, interrupted=1)


def test_two_workers_draw_different_parameters_and_record_their_seeds(tmp_path: Path) -> None:
    """Two processes, each with its own sampler, take turns on one study (as two workers
    do): with one seed per process, trials 0 and 1 (and 2 and 3) drew the same parameters."""
    cfg = config(f"sqlite:///{tmp_path / 'study.db'}", trials=4)
    first = open_study(cfg)
    fill_queue(first, 4)  # sampled trials only
    second = open_study(cfg)
    objective = make_objective(cfg, tmp_path, fake_trial)
    for _ in range(2):
        for worker in (first, second):
            worker.optimize(objective, n_trials=1)
    trials = first.get_trials()
    assert all(t.state.is_finished() and t.state.name != "FAIL" for t in trials)
    assert trials[0].params != trials[1].params and trials[2].params != trials[3].params
    assert [t.user_attrs["sampler_seed"] for t in trials] == [cfg.seed + n for n in range(4)]
    assert all(t.user_attrs["worker"] == {"host": socket.gethostname(), "pid": os.getpid()} for t in trials)


def test_one_process_draws_the_same_trials_for_the_same_seed(tmp_path: Path) -> None:
    def drawn() -> list[dict]:
        cfg = config(":memory:", trials=6)
        study = open_study(cfg)
        fill_queue(study, 6)
        run_search(study, cfg, tmp_path, fake_trial)
        return [t.params for t in study.get_trials()]

    assert drawn() == drawn()


def _slow_trial(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
    time.sleep(2.0)
    return fake_trial(plan, trial_dir, report)


def test_adopting_waits_for_the_trials_other_workers_are_running(tmp_path: Path) -> None:
    import threading

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = config(storage, trials=3, heartbeat_seconds=1)
    study = open_study(cfg)
    enqueue_plans(study, rule_plans(), cfg.backbones)
    fill_queue(study, 3)
    other = open_study(cfg)  # another worker: its own connection, sampler and heartbeat
    worker = threading.Thread(target=other.optimize, args=(make_objective(cfg, tmp_path, _slow_trial),),
                              kwargs={"n_trials": 1})
    worker.start()
    while not study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        time.sleep(0.05)
    said: list[str] = []
    run_search(study, cfg, tmp_path, fake_trial, wait=said.append)
    worker.join()
    assert len(said) == 1 and said[0].startswith("waiting for 1 trial(s) that other workers are running (0)")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3
    adopt_best(study, tmp_path)
    assert "RUNNING" not in (tmp_path / "leaderboard.csv").read_text()


def test_a_moved_run_keeps_using_its_own_study(tmp_path: Path) -> None:
    from autotransfer.search import default_storage

    run = tmp_path / "R"
    run.mkdir()
    cfg = config(default_storage(run), trials=2)
    cfg.save(run)
    assert json.loads((run / "search.json").read_text())["storage"] == "sqlite:///study.db"
    study = open_study(cfg)
    enqueue_plans(study, rule_plans(), cfg.backbones)
    run_search(study, cfg, run, fake_trial)

    moved = tmp_path / "R2"
    shutil.move(run, moved)
    run.mkdir()
    loaded = SearchConfig.load(moved)
    assert loaded.storage == default_storage(moved)
    assert len(open_study(loaded).get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    assert not any(run.iterdir())

    elsewhere = f"sqlite:///{tmp_path / 'shared.db'}"  # outside RUN: absolute; a server URL: as given
    for storage in (elsewhere, "postgresql://user:secret@db.example/optuna"):
        replace(cfg, storage=storage).save(moved)
        assert SearchConfig.load(moved).storage == storage


def test_a_new_search_refuses_a_study_left_in_its_storage(tmp_path: Path) -> None:
    from autotransfer.errors import RunError
    from autotransfer.search import delete_study, study_trials
    from autotransfer.selector import select_and_fit

    cfg = config(f"sqlite:///{tmp_path / 'shared.db'}", trials=2)
    assert study_trials(cfg) is None and not (tmp_path / "shared.db").exists()
    study = open_study(cfg)
    enqueue_plans(study, rule_plans(), cfg.backbones)
    run_search(study, cfg, tmp_path / "first", fake_trial)
    with pytest.raises(RunError, match=r"shared\.db already holds a study 'autotransfer' with 2 trial\(s\).*--overwrite"):
        select_and_fit(cfg, tmp_path / "second", rule_plans())
    assert not (tmp_path / "second").exists()
    delete_study(cfg)  # what --overwrite does first
    assert study_trials(cfg) is None


def test_a_display_hears_when_the_search_starts_and_of_each_finished_trial(tmp_path: Path) -> None:
    """fit's bar and trial lines (autotransfer.terminal) follow the search through this hook."""
    from autotransfer.search import SearchProgress

    cfg = config(":memory:", trials=3)
    study = open_study(cfg)
    enqueue_plans(study, rule_plans(), cfg.backbones)
    fill_queue(study, cfg.trials)
    heard: list[SearchProgress] = []
    with watch_search(heard.append):
        run_search(study, cfg, tmp_path, fake_trial)
    assert heard[0] == SearchProgress(finished=0, planned=3, budget_left=None, trial=None)
    assert [p.finished for p in heard[1:]] == [1, 2, 3] and [p.trial.number for p in heard[1:]] == [0, 1, 2]
    first, second = heard[1].trial, heard[2].trial
    assert first.plan == replace(rule_plans()[0], reasons=[]) and second.plan == replace(rule_plans()[1], reasons=[])
    assert (first.score, first.cross_validated, first.pruned_at) == (0.6, False, None)
    assert second.score == pytest.approx(0.8) and first.seconds >= 0

    budget = replace(config(":memory:", trials=None), time_budget=0.5)
    study = open_study(budget)
    heard.clear()
    with watch_search(heard.append):
        run_search(study, budget, tmp_path, _slow(0.1))
    assert heard[0].planned is None and 0.4 < heard[0].budget_left <= 0.5
    assert [p.finished for p in heard[1:]] == list(range(1, len(heard))) and len(heard) >= 2
    assert heard[0].budget_left > heard[1].budget_left >= heard[-1].budget_left >= 0

    run_search(study, budget, tmp_path, fake_trial)  # no watcher any more
    assert len(heard) == heard[-1].finished + 1

    tuned = {"levels_below_top": 0, "lr": 1e-3, "weight_decay": 1e-4, "class_weighting": False,
             "backbone_lr_ratio": 0.1, "epochs": 2, "bn_mode": "frozen"}
    cfg = config(":memory:", trials=4)
    study = open_study(cfg)
    for params in [{"strategy": "partial", "trained_groups": 3}] * 3 + [{"strategy": "full"}]:  # 0.85, then 0.70
        study.enqueue_trial({**tuned, **params}, user_attrs={"queued": True})
    heard.clear()
    with watch_search(heard.append):
        run_search(study, cfg, tmp_path, fake_trial)
    assert (heard[-1].finished, heard[-1].trial.score, heard[-1].trial.pruned_at) == (4, None, 1)


def _slow(seconds: float):
    def run(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
        time.sleep(seconds)
        return fake_trial(plan, trial_dir, report)

    return run


@pytest.mark.parametrize("single, ensemble_kept", [
    ("close", True),  # 3 more right, none fewer: ~1.8 SE, within the 2 SE this case sets
    ("scattered", True),  # 3 more on balance, 37 disagreements: ~0.6 SE, the flattery of the best of several
    ("far", False),  # 12 more right, none fewer: far beyond one SE
])
def test_the_mean_of_the_best_probes_is_kept_unless_a_single_probe_leads_it_beyond_one_se(
    tmp_path: Path, single: str, ensemble_kept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("autotransfer.search.ENSEMBLE_LEAD_STANDARD_ERRORS", 2.0 if single == "close" else 1.0)
    cfg = config(":memory:", trials=None)
    study = open_study(cfg)
    ensemble = replace(BASE, strategy="frozen", all_levels=True, all_levels_mode="ensemble", reasons=["rule"])
    level = replace(BASE, strategy="frozen", feature_level=3, reasons=["rule"])
    enqueue_plans(study, [level, ensemble], cfg.backbones)
    correct = {**CHALLENGERS, "far": set(range(92))}[single]

    def trial(plan: Plan, trial_dir: Path, report, after_fold=None) -> dict:
        trial_dir.mkdir(parents=True, exist_ok=True)
        return scored(RULE_CORRECT if plan.all_levels else correct, cv=True)

    study.optimize(make_objective(cfg, tmp_path, trial), n_trials=2)
    plan, best = adopt_best(study, tmp_path)
    assert (plan.all_levels_mode == "ensemble") == ensemble_kept
    if ensemble_kept:
        assert any("the mean of the best probes, kept over the best single one" in r for r in plan.reasons)
    assert best_frozen_predictions(study)["trial"] == best.number  # the rival fine-tuning trials are stopped against
