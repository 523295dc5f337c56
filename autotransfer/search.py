"""Optuna search over Plans: the rule engine's Plans are enqueued first, then a sampler
refines strategy, depth, backbone and hyperparameters; unpromising fine-tuning is pruned.
The objective is validation balanced accuracy (`metrics.balanced_accuracy`): accuracy
that does not depend on the class mix of the val split.

Only this module imports Optuna. The study lives in a storage (SQLite inside RUN by
default, or any Optuna RDB URL such as postgresql://...), so a killed process loses no
finished trial, `fit --resume RUN` continues, and `autotransfer worker RUN` processes on
other machines can join the same study.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

import optuna

from autotransfer.errors import AutotransferError, RunError
from autotransfer.metrics import balanced_accuracy_gap_se
from autotransfer.plan import AUGMENTS, Plan
from autotransfer.strategies import all_levels_supported, depth_of

STUDY_NAME = "autotransfer"
SEARCH_FILE = "search.json"
MAX_LEVELS_BELOW_TOP = 2
MAX_TRAINED_GROUPS = 6
# A sampled trial displaces the best of the rules' Plans only when it leads by more than
# this many standard errors of the gap between the two (paired, over the val images:
# metrics.balanced_accuracy_gap_se). The best of many sampled trials is flattered by its
# noise: in quick benches sampled trials that led by 1 of 100 and 3 of 77 val images lost
# 3 and 2.6 held-out points. Among the rules' Plans the best on val wins: giving ties within
# one standard error to the rules' ranking instead was worse over 24 bench cells (README).
SAMPLED_LEAD_STANDARD_ERRORS = 1.0
# A trial is pruned at a step only against the median of at least this many finished
# trials' reports there: against one, the quick bench pruned a full fine-tune after its
# first epoch of 2 behind a partial one, and it would have won (cifar10, 50/class).
PRUNE_MIN_TRIALS = 3


def _serialise_sqlite(engine) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE (SQLAlchemy's recipe).

    Python's sqlite3 starts a transaction only at the first write, so two workers can
    both read a trial as WAITING and both claim it. Taking the write lock at BEGIN makes
    the claim atomic, as row locks do on PostgreSQL.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed are dropped


@dataclass
class SearchConfig:
    """What a search needs besides the data; saved as RUN/search.json for resume/workers."""

    data: str
    storage: str
    backbones: list[str]
    base: Plan
    trials: int | None = None
    time_budget: float | None = None  # seconds
    seed: int = 0
    study_name: str = STUDY_NAME
    # A running trial whose process sent no heartbeat for 3 intervals is marked failed
    # (a killed worker), and `fit --resume` queues a replacement.
    heartbeat_seconds: int = 10

    def save(self, run_dir: Path) -> None:
        payload = {**asdict(self), "base": asdict(self.base)}
        (run_dir / SEARCH_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "SearchConfig":
        path = Path(run_dir) / SEARCH_FILE
        if not path.is_file():
            raise RunError(
                f"{run_dir} has no {SEARCH_FILE}: it is not a search run; "
                "start one with `autotransfer fit DATA --out RUN` (no --strategy)"
            )
        payload = json.loads(path.read_text())
        return cls(**{**payload, "base": Plan(**payload["base"])})


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match:
        raise AutotransferError(f"time budget '{text}' is not a duration; use e.g. 90s, 10m or 1h")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_study(config: SearchConfig) -> optuna.Study:
    """Create or load the study; trials of a killed process are marked failed, not lost.

    Storage ':memory:' keeps the study in this process (tests, throwaway searches).
    """
    try:
        storage = None if config.storage == ":memory:" else optuna.storages.RDBStorage(
            config.storage,
            heartbeat_interval=config.heartbeat_seconds,
            grace_period=3 * config.heartbeat_seconds,
            engine_kwargs={"connect_args": {"timeout": 60}} if config.storage.startswith("sqlite") else {},
        )
    except Exception as exc:
        raise AutotransferError(f"cannot open study storage '{config.storage}': {exc}") from exc
    if config.storage.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    study = optuna.create_study(
        study_name=config.study_name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=4),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1, n_min_trials=PRUNE_MIN_TRIALS),
        load_if_exists=True,
    )
    if storage is not None:
        optuna.storages.fail_stale_trials(study)
        fail_unstarted_trials(study, 3 * config.heartbeat_seconds)
    return study


# Set by the objective right after it recorded the trial's first heartbeat.
STARTED_ATTR = "started"


def fail_unstarted_trials(study: optuna.Study, grace_seconds: float) -> None:
    """Fail RUNNING trials whose process died before their objective began.

    Optuna marks a trial RUNNING (`ask`) before its heartbeat thread writes the first
    heartbeat, and `fail_stale_trials` skips trials with no heartbeat at all: a kill -9 in
    that window left a trial RUNNING for ever, so a resumed `--trials N` study ended at N-1.
    The objective records a heartbeat and then sets STARTED_ATTR, so a RUNNING trial
    without it, older than the grace period, has no live process behind it.
    """
    now = datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.datetime_start
        if STARTED_ATTR not in trial.user_attrs and started and (now - started).total_seconds() > grace_seconds:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def plan_from_params(params: dict, base: Plan) -> Plan:
    """The Plan a trial's parameters describe (depth given relative to the top)."""
    backbone = params.get("backbone", base.backbone)
    _, levels = depth_of(backbone, None)
    strategy = params["strategy"]
    all_levels = strategy == "frozen" and params.get("all_levels", False)
    below = 0 if all_levels else min(params.get("levels_below_top", 0), levels)
    level = None if below == 0 else levels - below
    cut = None
    if strategy == "partial":
        groups, _ = depth_of(backbone, level)
        cut = max(1, groups - min(params["trained_groups"], groups - 1))
    tuned = strategy != "frozen"
    return replace(
        base,
        backbone=backbone,
        strategy=strategy,
        cut=cut,
        feature_level=level,
        all_levels=all_levels,
        lr=params.get("lr", base.lr) if tuned else base.lr,
        weight_decay=params.get("weight_decay", base.weight_decay) if tuned else base.weight_decay,
        class_weighting=params.get("class_weighting", base.class_weighting),
        backbone_lr_ratio=params.get("backbone_lr_ratio", base.backbone_lr_ratio) if tuned else base.backbone_lr_ratio,
        epochs=params.get("epochs", base.epochs) if tuned else base.epochs,
        bn_mode=params.get("bn_mode", base.bn_mode) if tuned else base.bn_mode,
        augment=params.get("augment", base.augment) if tuned else base.augment,
        reasons=[],
    )


def params_from_plan(plan: Plan, backbones: list[str]) -> dict:
    """Inverse of plan_from_params, for enqueueing a rule Plan as a trial."""
    _, levels = depth_of(plan.backbone, None)
    params: dict = {
        "strategy": plan.strategy,
        "levels_below_top": 0 if plan.feature_level is None else levels - plan.feature_level,
        "class_weighting": plan.class_weighting,
    }
    if len(backbones) > 1:
        params["backbone"] = plan.backbone
    if plan.strategy == "frozen" and all_levels_supported(plan.backbone):
        params["all_levels"] = plan.all_levels
    if plan.strategy == "partial":
        groups, _ = depth_of(plan.backbone, plan.feature_level)
        params["trained_groups"] = groups - plan.cut
    if plan.strategy != "frozen":
        params.update(
            lr=plan.lr, weight_decay=plan.weight_decay,
            backbone_lr_ratio=plan.backbone_lr_ratio, epochs=plan.epochs, bn_mode=plan.bn_mode,
            augment=plan.augment,
        )
    return params


def suggest_params(trial: optuna.Trial, backbones: list[str]) -> dict:
    """The search space. Conditional parameters only exist where they mean something."""
    params: dict = {}
    if len(backbones) > 1:
        params["backbone"] = trial.suggest_categorical("backbone", backbones)
    params["strategy"] = trial.suggest_categorical("strategy", ["frozen", "partial", "full"])
    params["levels_below_top"] = trial.suggest_int("levels_below_top", 0, MAX_LEVELS_BELOW_TOP)
    params["class_weighting"] = trial.suggest_categorical("class_weighting", [False, True])
    if params["strategy"] == "frozen" and all_levels_supported(params.get("backbone", backbones[0])):
        params["all_levels"] = trial.suggest_categorical("all_levels", [False, True])
    if params["strategy"] == "partial":
        params["trained_groups"] = trial.suggest_int("trained_groups", 1, MAX_TRAINED_GROUPS)
    if params["strategy"] != "frozen":  # a frozen probe tunes its own penalty by CV
        params["lr"] = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        params["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        params["backbone_lr_ratio"] = trial.suggest_float("backbone_lr_ratio", 0.01, 0.5, log=True)
        params["epochs"] = trial.suggest_int("epochs", 2, 10)
        params["bn_mode"] = trial.suggest_categorical("bn_mode", ["frozen", "train"])
        params["augment"] = trial.suggest_categorical("augment", list(AUGMENTS))
    return params


TrialRunner = Callable[[Plan, Path, Callable[[int, float], None]], dict]


class SurplusTrial(Exception):
    """A worker lost the race for the last queued trial; recorded as FAIL, never run."""


def make_objective(config: SearchConfig, run_dir: Path, run_trial: TrialRunner) -> Callable:
    """Objective: validation balanced accuracy of the trial's Plan; reports feed the pruner."""

    def objective(trial: optuna.Trial) -> float:
        storage = trial.study._storage  # Optuna offers no public handle on a trial's storage
        if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval():
            storage.record_heartbeat(trial._trial_id)  # see fail_unstarted_trials
        trial.set_user_attr(STARTED_ATTR, True)
        if config.trials is not None and not trial.user_attrs.get("queued"):
            raise SurplusTrial("the study already holds its planned number of trials")
        params = suggest_params(trial, config.backbones)
        plan = plan_from_params(params, config.base)
        trial.set_user_attr("plan", asdict(plan))

        def report(step: int, score: float) -> None:
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned: val balanced accuracy {score:.4f} at step {step} is below the median of "
                    f"earlier trials there"
                )

        start = time.perf_counter()
        metrics = run_trial(plan, run_dir / "trials" / f"{trial.number:04d}", report)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        trial.set_user_attr("val_accuracy", metrics["val"]["accuracy"])
        trial.set_user_attr("macro_f1", metrics["val"]["macro_f1"])
        trial.set_user_attr("val_loss", metrics["val"].get("loss"))
        trial.set_user_attr("val_balanced_accuracy", metrics["val"]["balanced_accuracy"])
        if "val_predictions" in metrics:
            trial.set_user_attr("val_predictions", metrics["val_predictions"])
        if "cv" in metrics:  # a frozen Plan: judged by its probe's CV on every labelled image
            cv = metrics["cv"]
            trial.set_user_attr("cv_predictions", {"predicted": cv["predicted"], "target": cv["target"]})
            return cv["balanced_accuracy"]
        return metrics["val"]["balanced_accuracy"]

    return objective


def enqueue_plans(study: optuna.Study, plans: list[Plan], backbones: list[str]) -> None:
    """Rule Plans go first; a Plan already tried or queued is not queued again."""
    for plan in plans:
        study.enqueue_trial(
            params_from_plan(plan, backbones),
            user_attrs={"reasons": plan.reasons, "queued": True},
            skip_if_exists=True,
        )


def fill_queue(study: optuna.Study, trials: int) -> None:
    """Queue empty trials (the sampler fills them) until the study holds `trials` live ones.

    Workers only run queued trials, and popping one is atomic in the storage, so several
    workers finish exactly `trials` trials. Failed trials (e.g. a killed process) do not
    count, so resuming refills their places.
    """
    live = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    for _ in range(trials - len(live)):
        study.enqueue_trial({}, user_attrs={"queued": True})


def run_search(study: optuna.Study, config: SearchConfig, run_dir: Path, run_trial: TrialRunner) -> None:
    """Run queued trials until none is left (or run until the time budget is spent)."""
    objective = make_objective(config, run_dir, run_trial)
    if config.trials is None:
        study.optimize(objective, timeout=config.time_budget, gc_after_trial=True)
        return
    deadline = None if config.time_budget is None else time.monotonic() + config.time_budget
    while _waiting(study) and (deadline is None or time.monotonic() < deadline):
        study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def _score_key(t: optuna.trial.FrozenTrial) -> tuple:
    """Highest objective; exact ties go to the lower val loss (as between epochs in
    training), then to higher macro-F1, then to the earlier trial (the rules' rank). Not
    to the faster one: seconds follow the machine's load, and a decision must not."""
    loss = t.user_attrs.get("val_loss")
    return (t.value, -(loss if loss is not None else float("inf")),
            t.user_attrs.get("macro_f1", 0.0), -t.number)


def gap_standard_error(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial, on: str = "val_predictions") -> float:
    """Standard error of the gap between two trials' balanced accuracies on the same images
    (`on`: "val_predictions", or "cv_predictions" between frozen trials); 0 where either
    trial did not record them, or they were made on different images."""
    pa, pb = a.user_attrs.get(on), b.user_attrs.get(on)
    if not pa or not pb or pa["target"] != pb["target"]:
        return 0.0
    return balanced_accuracy_gap_se(pa["predicted"], pb["predicted"], pa["target"])


def is_frozen(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.user_attrs.get("plan", {}).get("strategy") == "frozen"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial to adopt.

    Frozen trials are ranked by their probe's cross-validated balanced accuracy on every
    labelled image, fine-tuned ones by val balanced accuracy; within each, the best of the
    rules' Plans wins unless a sampled trial leads it by more than
    SAMPLED_LEAD_STANDARD_ERRORS. The best fine-tuned trial then replaces the best frozen
    one only if it is better on the same images, the val split (the frozen trial's
    out-of-fold predictions there).
    """
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise AutotransferError("no trial finished; raise --trials or --time-budget")
    frozen = _best_of([t for t in complete if is_frozen(t)])
    tuned = _best_of([t for t in complete if not is_frozen(t)])
    if frozen is None or tuned is None:
        return frozen or tuned
    return tuned if finetuning_wins(tuned, frozen) else frozen


def shared_images(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> str:
    """Which predictions two trials are compared on: their cross-validation on every
    labelled image where both have one (frozen trials; fine-tuned ones on small data),
    else the val split."""
    ca, cb = a.user_attrs.get("cv_predictions"), b.user_attrs.get("cv_predictions")
    return "cv_predictions" if ca and cb and ca["target"] == cb["target"] else "val_predictions"


def finetuning_wins(tuned: optuna.trial.FrozenTrial, frozen: optuna.trial.FrozenTrial) -> bool:
    """Higher balanced accuracy than the frozen trial on the same images (every labelled
    image where both were cross-validated, else val); a tie keeps the frozen one
    (cheaper, and its probe saw every image)."""
    if shared_images(tuned, frozen) == "cv_predictions":
        return tuned.value > frozen.value
    return _val_score(tuned) > _val_score(frozen)


def _val_score(trial: optuna.trial.FrozenTrial) -> float:
    return trial.user_attrs.get("val_balanced_accuracy", trial.value)


def _best_of(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    if not trials:
        return None
    top = max(trials, key=_score_key)
    from_rules = [t for t in trials if t.user_attrs.get("reasons")]
    if not from_rules or top.user_attrs.get("reasons"):
        return top
    prior = max(from_rules, key=_score_key)
    real_lead = top.value - prior.value > SAMPLED_LEAD_STANDARD_ERRORS * gap_standard_error(top, prior, shared_images(top, prior))
    return top if real_lead else prior


def write_leaderboard(study: optuna.Study, path: Path) -> None:
    """One row per trial: state, balanced accuracy (the objective), accuracy, seconds, plan
    essentials, whether a rule queued it."""
    fields = ["trial", "state", "val_balanced_accuracy", "val_accuracy", "val_loss", "macro_f1", "seconds",
              "backbone", "strategy", "cut", "feature_level", "all_levels", "bn_mode", "augment", "epochs", "lr", "backbone_lr_ratio",
              "weight_decay", "class_weighting", "from_rules"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        plan = t.user_attrs.get("plan", {})
        rows.append({
            "trial": t.number, "state": t.state.name, "val_balanced_accuracy": t.value,
            "val_accuracy": t.user_attrs.get("val_accuracy"), "val_loss": t.user_attrs.get("val_loss"),
            "macro_f1": t.user_attrs.get("macro_f1"), "seconds": t.user_attrs.get("seconds"),
            **{k: plan.get(k) for k in fields[7:-1]},
            "from_rules": bool(t.user_attrs.get("reasons")),
        })
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["val_balanced_accuracy"] is None, -(r["val_balanced_accuracy"] or 0))))


def _why(study: optuna.Study, best: optuna.trial.FrozenTrial) -> str:
    """How the search decided, in one sentence with its numbers and their noise."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    family = [t for t in complete if is_frozen(t) == is_frozen(best)]
    score = "cross-validated balanced accuracy" if best.user_attrs.get("cv_predictions") else "val balanced accuracy"
    why = f"won the search: trial {best.number} of {len(study.trials)}, {score} {best.value:.4f}"
    top = max(family, key=_score_key)
    if top.number != best.number:
        why += (
            f", kept over sampled trial {top.number} ({top.value:.4f}): a lead within "
            f"{SAMPLED_LEAD_STANDARD_ERRORS:g} standard error of the gap ({gap_standard_error(top, best, shared_images(top, best)):.4f}) is noise"
        )
    else:
        runner_up = max((t for t in family if t.number != best.number), key=_score_key, default=None)
        if runner_up is not None:
            why += f" (runner-up trial {runner_up.number}: {runner_up.value:.4f})"
    other = _best_of([t for t in complete if is_frozen(t) != is_frozen(best)])
    if other is not None:
        tuned, frozen = (other, best) if is_frozen(best) else (best, other)
        verdict = "beat" if best is tuned else "did not beat"
        on = shared_images(tuned, frozen)
        scores = (tuned.value, frozen.value) if on == "cv_predictions" else (_val_score(tuned), _val_score(frozen))
        where = "every labelled image (cross-validated)" if on == "cv_predictions" else "the same val images"
        why += (
            f"; fine-tuned trial {tuned.number} {verdict} frozen trial {frozen.number} on {where}: "
            f"{scores[0]:.4f} vs {scores[1]:.4f} balanced accuracy, "
            f"paired standard error {gap_standard_error(tuned, frozen, on):.4f}"
        )
    return why


def adopt_best(study: optuna.Study, run_dir: Path) -> tuple[Plan, optuna.trial.FrozenTrial]:
    """Copy the best trial's model and metrics to RUN/ and write plan.json with the why."""
    best = best_trial(study)
    trial_dir = run_dir / "trials" / f"{best.number:04d}"
    for name in ("model.pt", "metrics.json", "scan.json"):
        if (trial_dir / name).is_file():
            shutil.copy2(trial_dir / name, run_dir / name)
    why = _why(study, best)
    reasons = [*best.user_attrs.get("reasons", []), why]
    plan = Plan(**{**best.user_attrs["plan"], "reasons": reasons})
    plan.save(run_dir / "plan.json")
    write_leaderboard(study, run_dir / "leaderboard.csv")
    return plan, best
