"""Optuna search over Plans: the rule engine's Plans are enqueued first, then a sampler
refines strategy, depth, backbone and hyperparameters; unpromising fine-tuning is pruned.
The objective is validation balanced accuracy (`metrics.balanced_accuracy`): accuracy
that does not depend on the class mix of the val split.

Only this module imports Optuna. The study lives in a storage (SQLite inside RUN by
default, named relative to RUN; or any Optuna RDB URL such as postgresql://...), so a
killed process loses no finished trial, `fit --resume RUN` continues (an interrupted
trial runs again with its own Plan), and `autotransfer worker RUN` processes on other
machines can join the same study, each trial drawing its own sampler seed.
"""

from __future__ import annotations

import csv
import json
import gc
import os
import re
import shutil
import socket
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import optuna

from autotransfer.errors import AutotransferError, PlanError, RunError
from autotransfer.metrics import balanced_accuracy_gap_se, balanced_accuracy_of
from autotransfer.plan import AUGMENTS, ALL_LEVELS_MODES, Plan
from autotransfer.strategies import all_levels_supported, depth_of

STUDY_NAME = "autotransfer"
SEARCH_FILE = "search.json"
MAX_TRAINED_GROUPS = 6
# A sampled trial displaces the best of the rules' Plans only when it leads by more than
# this many standard errors of the gap between the two (paired, over the val images:
# metrics.balanced_accuracy_gap_se). The best of many sampled trials is flattered by its
# noise: in quick benches sampled trials that led by 1 of 100 and 3 of 77 val images lost
# 3 and 2.6 held-out points. Among the rules' Plans the best on val wins: giving ties within
# one standard error to the rules' ranking instead was worse over 24 bench cells (README).
SAMPLED_LEAD_STANDARD_ERRORS = 1.0
# The best fine-tuned trial replaces the best frozen one only when it leads by more than
# this many paired standard errors on the same images. Fine-tuning costs more and can
# fail quietly, and on few images its lead is mostly luck: in the quick bench it led the
# probes by 1 of 20 cross-validated images (0.36 SE, hymenoptera 10/class) and lost 11
# held-out points (5.9 at 224 px, 0.56 SE). The price: at cifar10 50/class a lead of
# 0.5 SE on 100 val images, worth 4.1 held-out points, is now declined (README, "How it
# decides").
FINETUNE_LEAD_STANDARD_ERRORS = 1.0
# A trial is pruned at a step only against the median of at least this many finished
# trials' reports there: against one, the quick bench pruned a full fine-tune after its
# first epoch of 2 behind a partial one, and it would have won (cifar10, 50/class).
PRUNE_MIN_TRIALS = 3
# A cross-validated fine-tuning trial stops after any fold from the second on where its
# out-of-fold predictions so far trail the best frozen trial's, on the same images, by
# more than this many paired standard errors: it would need to lead by one at the end to
# be adopted. On cifar10 10/class (100 images) a full fine-tune 27 points behind after 2
# of 5 folds ran 3 more folds and a refit, 76 of the fit's 148 s.
CV_BEHIND_STANDARD_ERRORS = 2.0
CV_MIN_FOLDS = 2
# Among frozen trials the "ensemble" one (the mean of the 3 best probes, Plan.all_levels_mode)
# is adopted unless the best single probe leads it by more than this many paired standard
# errors of their cross-validated balanced accuracies. The best single probe's CV is
# flattered by being the best of several: picking by CV alone almost never chose the
# ensemble, which gained on held-out images (benchmarks/results/frozen_selection.md).
ENSEMBLE_LEAD_STANDARD_ERRORS = 2.0


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
    # (a killed worker) and queued again with its own Plan (`requeue_interrupted`).
    heartbeat_seconds: int = 10
    # What the search runs on (`selector.data_hash`): `--resume` and workers refuse other data.
    data_hash: str | None = None

    @property
    def grace_seconds(self) -> int:
        """How long a running trial may stay silent before it counts as interrupted."""
        return 3 * self.heartbeat_seconds

    def save(self, run_dir: Path) -> None:
        """Write RUN/search.json; a SQLite study inside RUN is named relative to RUN, so a
        moved or copied RUN keeps using its own study."""
        payload = {**asdict(self), "base": asdict(self.base), "storage": _relative_to(self.storage, run_dir)}
        (run_dir / SEARCH_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "SearchConfig":
        path = Path(run_dir) / SEARCH_FILE
        if not path.is_file():
            raise RunError(
                f"{run_dir} has no {SEARCH_FILE}: it is not a search run; "
                "start one with `autotransfer fit DATA --out RUN` (no --strategy)"
            )
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{**payload, "base": Plan(**payload["base"]), "storage": _resolved_in(payload["storage"], run_dir)})
        except (ValueError, TypeError, LookupError, PlanError) as exc:  # JSON and UTF-8 errors are ValueErrors
            raise RunError(
                f"{path} is damaged ({type(exc).__name__}: {exc}); restore it, or start a new search "
                "with `autotransfer fit DATA --out NEW_RUN`"
            ) from None


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h' or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match:
        raise AutotransferError(f"time budget '{text}' is not a duration; use e.g. 90s, 10m or 1h")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


def default_storage(run_dir: Path) -> str:
    return f"{SQLITE}{(run_dir / 'study.db').resolve()}"


SQLITE = "sqlite:///"


def _sqlite_file(url: str) -> tuple[str, str] | None:
    """(path, '?query' or '') of a SQLite file URL; None for other storages and in-memory SQLite."""
    if not url.startswith(SQLITE):
        return None
    path, mark, query = url[len(SQLITE):].partition("?")
    return None if path in ("", ":memory:") else (path, mark + query)


def _relative_to(url: str, run_dir: Path) -> str:
    """A SQLite file inside RUN as a path relative to RUN (a relative one outside RUN, as
    SQLAlchemy reads it, relative to the working folder, made absolute); other URLs as given."""
    parts = _sqlite_file(url)
    if parts is None:
        return url
    file = Path(parts[0]).resolve()
    try:
        return f"{SQLITE}{file.relative_to(Path(run_dir).resolve()).as_posix()}{parts[1]}"
    except ValueError:
        return f"{SQLITE}{file}{parts[1]}"


def _resolved_in(url: str, run_dir: Path) -> str:
    """Inverse of _relative_to: a relative SQLite path in search.json is relative to RUN."""
    parts = _sqlite_file(url)
    if parts is None or Path(parts[0]).is_absolute():
        return url
    return f"{SQLITE}{(Path(run_dir) / parts[0]).resolve()}{parts[1]}"


def shown_storage(url: str) -> str:
    """A storage URL fit for a message: the file of a SQLite study, a server URL without its password."""
    parts = _sqlite_file(url)
    if parts is not None:
        return parts[0]
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: the open itself will say so
        return url


def _rdb_storage(config: SearchConfig) -> optuna.storages.RDBStorage | None:
    """The storage of `config`; None for ':memory:' (a study in this process: tests,
    throwaway searches). A trial whose heartbeat goes stale is queued again (`requeue`)."""
    if config.storage == ":memory:":
        return None
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental": news to us, not to our users
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                config.storage,
                heartbeat_interval=config.heartbeat_seconds,
                grace_period=config.grace_seconds,
                heartbeat_stale_trial_callback=requeue,
                engine_kwargs={"connect_args": {"timeout": 60}} if config.storage.startswith("sqlite") else {},
            )
    except Exception as exc:
        raise AutotransferError(f"cannot open study storage '{shown_storage(config.storage)}': {exc}") from exc
    if config.storage.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    return storage


def open_study(config: SearchConfig) -> optuna.Study:
    """Create or load the study; trials of a killed process are failed and queued again
    with their own Plan (`requeue_interrupted`), not lost."""
    study = optuna.create_study(
        study_name=config.study_name,
        storage=_rdb_storage(config),
        direction="maximize",
        sampler=TrialSeededSampler(config.seed, n_startup_trials=4),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1, n_min_trials=PRUNE_MIN_TRIALS),
        load_if_exists=True,
    )
    requeue_interrupted(study, config.grace_seconds)
    return study


def study_trials(config: SearchConfig) -> int | None:
    """How many trials the storage holds in `config`'s study; None where it holds no such
    study (a SQLite file that does not exist is not created to find out)."""
    parts = _sqlite_file(config.storage)
    if config.storage == ":memory:" or (parts is not None and not Path(parts[0]).is_file()):
        return None
    storage = _rdb_storage(config)
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(config.study_name))
    except KeyError:
        return None


def finished_trial_seconds(config: SearchConfig) -> float:
    """Seconds the study's finished (complete or pruned) trials ran: what a resumed search
    had already spent on them. Read only, like `study_trials` (opening the study would
    requeue interrupted trials: the resume's work)."""
    storage = _rdb_storage(config)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = storage.get_all_trials(storage.get_study_id_from_name(config.study_name), deepcopy=False, states=states)
    return sum(t.duration.total_seconds() for t in trials if t.duration is not None)


def delete_study(config: SearchConfig) -> None:
    """Remove `config`'s study from its storage (`fit --overwrite` with a server storage)."""
    optuna.delete_study(study_name=config.study_name, storage=_rdb_storage(config))


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed in trial `number`: whichever process runs the trial draws the same."""
    return seed + number


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose random draws in trial n come from `trial_seed(seed, n)`.

    One TPESampler(seed) per process made two workers draw identical parameters (same seed,
    same history); seeding by trial number gives every trial its own draws, and one process
    still makes the same ones for the same data and seed. TPE keeps no other state between
    trials (it reads the history from the storage), so a fresh one per trial loses nothing.
    """

    def __init__(self, seed: int, **tpe) -> None:
        self.seed, self._tpe = seed, tpe
        self._inner = optuna.samplers.TPESampler(seed=seed, **tpe)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = optuna.samplers.TPESampler(seed=trial_seed(self.seed, trial.number), **self._tpe)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)


# Set by the objective right after it recorded the trial's first heartbeat: which machine
# and process runs the trial ({"host": ..., "pid": ...}).
WORKER_ATTR = "worker"
# What queued a trial (`enqueue_plans`, `fill_queue`); a re-queued trial keeps it.
QUEUE_ATTRS = ("reasons", "queued")


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed, interrupted trial again as it was: its parameters (a rule's Plan
    stays that Plan; one killed before its objective began has only the queued ones) and
    what queued it; `retry_of` names the trial it replaces. Optuna calls this for trials
    whose heartbeat went stale."""
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    attrs = {key: trial.user_attrs[key] for key in QUEUE_ATTRS if key in trial.user_attrs}
    study.enqueue_trial(params, user_attrs={**attrs, "retry_of": trial.number})


def requeue_interrupted(study: optuna.Study, grace_seconds: float) -> None:
    """Fail each RUNNING trial that no live process runs any more and queue it again with
    its own Plan (`requeue`).

    - It ran on this machine (WORKER_ATTR) and its process is gone (kill -9, a crash): at once.
    - It ran elsewhere: its heartbeat goes stale, `fail_stale_trials` fails it after the
      grace period and Optuna calls `requeue`.
    - It was killed between Optuna's `ask` and its objective's first heartbeat (it has
      neither): once older than the grace period.
    Ctrl-C needs none of these: the objective requeues its own trial (`make_objective`).
    """
    with warnings.catch_warnings():  # "experimental": news to us, not to our users
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker, started = trial.user_attrs.get(WORKER_ATTR), trial.datetime_start
        if worker:
            orphaned = worker.get("host") == socket.gethostname() and not _alive(worker.get("pid"))
        else:
            orphaned = started is not None and (now - started).total_seconds() > grace_seconds
        if orphaned and _fail(study, trial):
            requeue(study, trial)


def _alive(pid: int | None) -> bool:
    """Is process `pid` of this machine running? Unknown counts as running."""
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _fail(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Mark a RUNNING trial failed; False where another process finished or failed it first."""
    try:
        return study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def progress(study: optuna.Study) -> str:
    """What a study holds, in a few words: '3 finished, 1 queued (1 after an interruption), 1 running'."""
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    count = Counter(t.state for t in trials)
    retried = sum(t.state == states.WAITING and "retry_of" in t.user_attrs for t in trials)
    parts = [f"{count[states.COMPLETE] + count[states.PRUNED]} finished trial(s)",
             f"{count[states.WAITING]} queued" + (f" ({retried} after an interruption)" if retried else "")]
    parts += [f"{count[states.RUNNING]} running"] if count[states.RUNNING] else []
    parts += [f"{count[states.FAIL]} failed"] if count[states.FAIL] else []
    return ", ".join(parts)


def run_progress(run_dir: Path) -> str | None:
    """What the study of the search in RUN holds (`progress`); None where it has none yet."""
    if not (Path(run_dir) / SEARCH_FILE).is_file():
        return None
    config = SearchConfig.load(run_dir)
    return None if study_trials(config) is None else progress(open_study(config))


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
        all_levels_mode=params.get("all_levels_mode", "level") if all_levels else "level",
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
        if plan.all_levels:
            params["all_levels_mode"] = plan.all_levels_mode
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


def suggest_params(trial: optuna.Trial, backbones: list[str], base: Plan) -> dict:
    """The search space. Conditional parameters only exist where they mean something.

    Each range reaches from its default bounds out to the search's base Plan (the user's
    `--epochs 20` or `--lr 0.05`) and down to every feature level, so that every rule Plan
    enqueued lies inside it: a fixed value outside makes Optuna warn in every `fit`, and
    its TPE then models a trial it could not have drawn."""
    def span(low: float, high: float, value: float) -> tuple:
        return (min(low, value), max(high, value)) if value > 0 else (low, high)  # log scales stop above 0

    params: dict = {}
    if len(backbones) > 1:
        params["backbone"] = trial.suggest_categorical("backbone", backbones)
    params["strategy"] = trial.suggest_categorical("strategy", ["frozen", "partial", "full"])
    _, levels = depth_of(params.get("backbone", backbones[0]), None)
    params["levels_below_top"] = trial.suggest_int("levels_below_top", 0, levels)
    params["class_weighting"] = trial.suggest_categorical("class_weighting", [False, True])
    if params["strategy"] == "frozen" and all_levels_supported(params.get("backbone", backbones[0])):
        params["all_levels"] = trial.suggest_categorical("all_levels", [False, True])
        if params["all_levels"]:
            params["all_levels_mode"] = trial.suggest_categorical("all_levels_mode", list(ALL_LEVELS_MODES))
    if params["strategy"] == "partial":
        params["trained_groups"] = trial.suggest_int("trained_groups", 1, MAX_TRAINED_GROUPS)
    if params["strategy"] != "frozen":  # a frozen probe tunes its own penalty by CV
        params["lr"] = trial.suggest_float("lr", *span(1e-4, 1e-2, base.lr), log=True)
        params["weight_decay"] = trial.suggest_float("weight_decay", *span(1e-6, 1e-2, base.weight_decay), log=True)
        params["backbone_lr_ratio"] = trial.suggest_float(
            "backbone_lr_ratio", *span(0.01, 0.5, base.backbone_lr_ratio), log=True)
        params["epochs"] = trial.suggest_int("epochs", *span(2, 10, base.epochs))
        params["bn_mode"] = trial.suggest_categorical("bn_mode", ["frozen", "train"])
        params["augment"] = trial.suggest_categorical("augment", list(AUGMENTS))
    return params


# run_trial(plan, trial_dir, report, after_fold): report(step, score) feeds the pruner;
# after_fold(folds_done, images, predicted), None or `stop_when_behind`, for CV trials.
TrialRunner = Callable[[Plan, Path, Callable[[int, float], None], Callable | None], dict]


def best_frozen_predictions(study: optuna.Study) -> dict | None:
    """The out-of-fold predictions of the frozen trial adopted if the search ended now
    (with its number), or None before one finished."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    frozen = _best_frozen([t for t in complete if is_frozen(t) and "cv_predictions" in t.user_attrs])
    return None if frozen is None else {**frozen.user_attrs["cv_predictions"], "trial": frozen.number}


def stop_when_behind(rival: dict) -> Callable[[int, list[int], list[int]], None]:
    """after_fold for a cross-validated fine-tuning trial: prune it once, from the
    CV_MIN_FOLDS-th fold on, its predictions so far trail `rival`'s on the same images by
    more than CV_BEHIND_STANDARD_ERRORS paired standard errors of balanced accuracy."""

    def after_fold(folds: int, images: list[int], predicted: list[int]) -> None:
        if folds < CV_MIN_FOLDS:
            return
        target = [rival["target"][i] for i in images]
        frozen = [rival["predicted"][i] for i in images]
        lead = balanced_accuracy_of(predicted, target) - balanced_accuracy_of(frozen, target)
        se = balanced_accuracy_gap_se(predicted, frozen, target)
        if lead + CV_BEHIND_STANDARD_ERRORS * se < 0:  # se >= 0: only a trial behind
            raise optuna.TrialPruned(
                f"pruned after {folds} folds: balanced accuracy {lead:+.4f} against frozen trial {rival['trial']} "
                f"on the same {len(images)} images, beyond {CV_BEHIND_STANDARD_ERRORS:g} paired standard errors ({se:.4f})"
            )

    return after_fold


class SurplusTrial(Exception):
    """A worker lost the race for the last queued trial; recorded as FAIL, never run."""


class TrialInterrupted(BaseException):
    """Ctrl-C stopped a trial, which was then failed and queued again with its own Plan.

    Not a KeyboardInterrupt: Optuna would record that as a failed trial (and log its
    traceback), and Lightning would turn it into exit(1).
    """


def is_ctrl_c(exc: BaseException) -> bool:
    """Ctrl-C however it arrives: a KeyboardInterrupt, Lightning's exit(1) after one, or a
    TrialInterrupted."""
    return isinstance(exc, (KeyboardInterrupt, TrialInterrupted)) or (
        isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt))


def make_objective(config: SearchConfig, run_dir: Path, run_trial: TrialRunner) -> Callable:
    """Objective: validation balanced accuracy of the trial's Plan; reports feed the pruner.

    Each trial records which process runs it (WORKER_ATTR, so that a resume knows at once
    when that process is gone) and its sampler seed. Ctrl-C fails the trial and queues it
    again with its own Plan before the interruption goes on, as TrialInterrupted.
    """

    def objective(trial: optuna.Trial) -> float:
        try:
            return measure(trial)
        except BaseException as exc:
            if not is_ctrl_c(exc):
                raise
            frozen = trial.study._storage.get_trial(trial._trial_id)
            if _fail(trial.study, frozen):
                requeue(trial.study, frozen)
            raise TrialInterrupted(f"trial {trial.number} was stopped and queued again with its Plan") from exc

    def measure(trial: optuna.Trial) -> float:
        storage = trial.study._storage  # Optuna offers no public handle on a trial's storage
        if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval():
            storage.record_heartbeat(trial._trial_id)  # before WORKER_ATTR: see requeue_interrupted
        trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
        trial.set_user_attr("sampler_seed", trial_seed(config.seed, trial.number))
        if config.trials is not None and not trial.user_attrs.get("queued"):
            raise SurplusTrial("the study already holds its planned number of trials")
        params = suggest_params(trial, config.backbones, config.base)
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
        rival = best_frozen_predictions(trial.study) if plan.strategy != "frozen" else None
        after_fold = stop_when_behind(rival) if rival else None
        try:
            metrics = run_trial(plan, run_dir / "trials" / f"{trial.number:04d}", report, after_fold)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned", str(exc))  # the decision's why names it
            raise
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
    workers finish exactly `trials` trials. Failed trials do not count: an interrupted one
    is queued again with its own Plan (`requeue`), and resuming refills the places of
    others (errors) with sampled ones.
    """
    live = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    for _ in range(trials - len(live)):
        study.enqueue_trial({}, user_attrs={"queued": True})


@dataclass
class TrialRecord:
    """A trial this process finished, in plain data for a display (`watch_search`)."""

    number: int
    plan: Plan
    score: float | None  # the objective; None when pruned
    cross_validated: bool  # score is a k-fold CV balanced accuracy on every labelled image, else val's
    seconds: float
    pruned_at: int | None = None  # the step (epoch) it was pruned after


@dataclass
class SearchProgress:
    """Where a search run by this process stands: sent when it starts (`trial` None) and
    after each trial it finishes (`watch_search`)."""

    finished: int  # trials of the study finished by any worker, complete or pruned
    planned: int | None  # None: as many as the time budget allows
    budget_left: float | None  # seconds; None without a time budget
    trial: TrialRecord | None = None


_watchers: list[Callable[[SearchProgress], None]] = []


@contextmanager
def watch_search(callback: Callable[[SearchProgress], None] | None) -> Iterator[None]:
    """Send `callback` a SearchProgress when a search starts in this process and after each
    of its trials (fit's progress bar and trial lines). A hook rather than an argument:
    the search runs several calls below the fit that displays it. None watches nothing."""
    if callback is not None:
        _watchers.append(callback)
    try:
        yield
    finally:
        if callback is not None:
            _watchers.remove(callback)


def _notifier(config: SearchConfig, deadline: float | None) -> Callable:
    """An Optuna callback telling the watchers about each finished trial (a surplus one,
    which never ran, is FAIL and not told)."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def notify(study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        if not _watchers or (trial is not None and (trial.state not in done or "plan" not in trial.user_attrs)):
            return
        pruned = trial is not None and trial.state == optuna.trial.TrialState.PRUNED
        record = None if trial is None else TrialRecord(
            trial.number, Plan(**trial.user_attrs["plan"]), None if pruned else trial.value,
            "cv_predictions" in trial.user_attrs, trial.duration.total_seconds() if trial.duration else 0.0,
            max(trial.intermediate_values, default=None) if pruned else None,
        )
        progress = SearchProgress(
            len(study.get_trials(deepcopy=False, states=done)), config.trials,
            None if deadline is None else max(0.0, deadline - time.monotonic()), record,
        )
        for watcher in list(_watchers):
            watcher(progress)

    return notify


def run_search(
    study: optuna.Study, config: SearchConfig, run_dir: Path, run_trial: TrialRunner,
    wait: Callable[[str], None] | None = None,
) -> None:
    """Run queued trials until none is left (or run until the time budget is spent).

    With `wait` (a fit about to adopt the best trial), then wait for the trials other
    workers are still running, saying so once through `wait`: adopting before they end
    ignored them. A worker that dies meanwhile is noticed (`requeue_interrupted`: at once
    on this machine, after the heartbeat grace period elsewhere) and its trial runs here.
    """
    gc.collect()
    gc.freeze()  # what exists now outlives the search: gc_after_trial then scans only what
    # trials make (0.2 s a trial otherwise, half a million objects from the imports alone)
    try:
        _run_search(study, config, run_dir, run_trial, wait)
    finally:
        gc.unfreeze()


def _run_search(
    study: optuna.Study, config: SearchConfig, run_dir: Path, run_trial: TrialRunner,
    wait: Callable[[str], None] | None,
) -> None:
    objective = make_objective(config, run_dir, run_trial)
    deadline = None if config.time_budget is None else time.monotonic() + config.time_budget
    notify = _notifier(config, deadline)
    notify(study, None)
    if config.trials is None:
        study.optimize(objective, timeout=config.time_budget, gc_after_trial=True, callbacks=[notify])

    def runnable() -> bool:
        return config.trials is not None and bool(_waiting(study)) and (deadline is None or time.monotonic() < deadline)

    said = False
    while True:
        while runnable():
            study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True, callbacks=[notify])
        if wait is None:
            return
        requeue_interrupted(study, config.grace_seconds)
        running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
        if not running and not runnable():
            return
        if running and not said:
            wait(f"waiting for {len(running)} trial(s) that other workers are running ({', '.join(map(str, running))}) "
                 f"before adopting the best; a worker that stops is noticed within {config.grace_seconds}s")
            said = True
        if running:
            time.sleep(min(1.0, config.heartbeat_seconds))


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
    frozen = _best_frozen([t for t in complete if is_frozen(t)])
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
    image where both were cross-validated, else val), by more than
    FINETUNE_LEAD_STANDARD_ERRORS paired standard errors; a smaller lead keeps the frozen
    one (cheaper, and its probe saw every image)."""
    on = shared_images(tuned, frozen)
    lead = tuned.value - frozen.value if on == "cv_predictions" else _val_score(tuned) - _val_score(frozen)
    return lead > 0 and lead > FINETUNE_LEAD_STANDARD_ERRORS * gap_standard_error(tuned, frozen, on)


def _val_score(trial: optuna.trial.FrozenTrial) -> float:
    return trial.user_attrs.get("val_balanced_accuracy", trial.value)


def is_ensemble(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.user_attrs.get("plan", {}).get("all_levels_mode") == "ensemble"


def leads_beyond(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial, standard_errors: float) -> bool:
    """Does a's objective lead b's by more than this many paired standard errors on the
    images both were scored on?"""
    return a.value - b.value > standard_errors * gap_standard_error(a, b, shared_images(a, b))


def _best_frozen(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    """The best frozen trial (`_best_of`), replaced by the best ensemble trial unless it
    leads that one beyond ENSEMBLE_LEAD_STANDARD_ERRORS."""
    best = _best_of(trials)
    ensemble = _best_of([t for t in trials if is_ensemble(t)])
    if best is None or ensemble is None or best is ensemble or leads_beyond(best, ensemble, ENSEMBLE_LEAD_STANDARD_ERRORS):
        return best
    return ensemble


def _best_of(trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    if not trials:
        return None
    top = max(trials, key=_score_key)
    from_rules = [t for t in trials if t.user_attrs.get("reasons")]
    if not from_rules or top.user_attrs.get("reasons"):
        return top
    prior = max(from_rules, key=_score_key)
    return top if leads_beyond(top, prior, SAMPLED_LEAD_STANDARD_ERRORS) else prior


def write_leaderboard(study: optuna.Study, path: Path) -> None:
    """One row per trial: state, balanced accuracy (the objective), accuracy, seconds, plan
    essentials, whether a rule queued it."""
    fields = ["trial", "state", "val_balanced_accuracy", "val_accuracy", "val_loss", "macro_f1", "seconds",
              "backbone", "strategy", "cut", "feature_level", "all_levels", "all_levels_mode", "bn_mode", "augment", "epochs", "lr", "backbone_lr_ratio",
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
    single = _best_of([t for t in family if not is_ensemble(t)]) if is_ensemble(best) else None
    if single is not None and single.value > best.value:
        on = shared_images(single, best)
        why += (
            f", the mean of the best probes, kept over the best single one (trial {single.number}, {single.value:.4f}): "
            f"a lead within {ENSEMBLE_LEAD_STANDARD_ERRORS:g} paired standard error ({gap_standard_error(single, best, on):.4f}) "
            "is the flattery of being the best of several"
        )
    elif single is not None:
        why += f", the mean of the best probes (best single probe: trial {single.number}, {single.value:.4f})"
    elif top.number != best.number:
        why += (
            f", kept over sampled trial {top.number} ({top.value:.4f}): a lead within "
            f"{SAMPLED_LEAD_STANDARD_ERRORS:g} standard error of the gap ({gap_standard_error(top, best, shared_images(top, best)):.4f}) is noise"
        )
    else:
        runner_up = max((t for t in family if t.number != best.number), key=_score_key, default=None)
        if runner_up is not None:
            why += f" (runner-up trial {runner_up.number}: {runner_up.value:.4f})"
    other = (_best_of if is_frozen(best) else _best_frozen)([t for t in complete if is_frozen(t) != is_frozen(best)])
    if other is not None:
        tuned, frozen = (other, best) if is_frozen(best) else (best, other)
        ahead = (tuned.value - frozen.value if shared_images(tuned, frozen) == "cv_predictions"
                 else _val_score(tuned) - _val_score(frozen)) > 0
        verdict = ("beat" if best.number == tuned.number else
                   f"led, but by no more than {FINETUNE_LEAD_STANDARD_ERRORS:g} paired standard error,"
                   if ahead else "did not beat")
        on = shared_images(tuned, frozen)
        scores = (tuned.value, frozen.value) if on == "cv_predictions" else (_val_score(tuned), _val_score(frozen))
        where = "every labelled image (cross-validated)" if on == "cv_predictions" else "the same val images"
        why += (
            f"; fine-tuned trial {tuned.number} {verdict} frozen trial {frozen.number} on {where}: "
            f"{scores[0]:.4f} vs {scores[1]:.4f} balanced accuracy, "
            f"paired standard error {gap_standard_error(tuned, frozen, on):.4f}"
        )
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)):
        if not is_frozen(t) and t.user_attrs.get("pruned"):
            why += f"; fine-tuned trial {t.number} was {t.user_attrs['pruned']}"
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
