"""Decide and prove: profile the data, rank Plans by rules, search from them, and adopt
the winning trial into RUN.

scan -> Profile -> [Plan...] (rules, with reasons) -> trials (search) -> best trial in RUN.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from autotransfer.backbones import get_backbone, list_backbones
from autotransfer.data import DatasetScan, scan_folder
from autotransfer.errors import BackboneError, RunError
from autotransfer.features import cache_feature_levels
from autotransfer.plan import DEFAULT_BACKBONE, Plan, describe
from autotransfer.predict import evaluate_records
from autotransfer.profile import Profile, profile_dataset
from autotransfer.rules import THRESHOLDS, input_size, rank_plans, rank_plans_across_backbones
from autotransfer.search import (
    SearchConfig,
    adopt_best,
    delete_study,
    enqueue_plans,
    fill_queue,
    open_study,
    progress,
    run_search,
    shown_storage,
    study_trials,
)
from autotransfer.strategies import Preprocessing, build_net
from autotransfer.train import CV_FINETUNE_MAX_IMAGES, cross_validate, fit, refit

if TYPE_CHECKING:
    import optuna

# Each candidate costs a profile (one pass over at most --max-images images) before the
# search starts: measured on 2 CPU cores, 35-120 s at 400 images of 224-260 px.
MAX_DEFAULT_BACKBONES = 3
BACKBONES_ENV = "AUTOTRANSFER_BACKBONES"  # a,b,c: the default candidates, replacing the rule
# The installed backbones beyond the default are profiled only on at least this many
# labelled images: one standard error of a k-NN accuracy near 0.8 is 0.02 on 400 images,
# the margin a costlier backbone must win by (rules.Thresholds.backbone_knn_margin), so on
# fewer they could not change the ranking, and their profiles were most of a small fit.
MIN_IMAGES_TO_RANK_BACKBONES = 400


def trial_runner(scan: DatasetScan, log: Callable[[str], None], budget: float | None = None) -> Callable:
    """Runs one trial's Plan as a normal fit into its own folder, quietly.

    With a time budget, a trial's fine-tuning stops when the budget is spent (keeping
    its best epoch), so the last trial cannot overrun the budget by a whole run.
    """
    deadline = None if budget is None else time.monotonic() + budget

    def run(plan: Plan, trial_dir: Path, report: Callable[[int, float], None], after_fold: Callable | None = None) -> dict:
        left = None if deadline is None else deadline - time.monotonic()
        log(f"trial {int(trial_dir.name)}" + ("" if left is None else f" ({max(0, left):.0f}s of the search budget left)")
            + f": {describe(plan)}")
        try:
            if cross_validates(scan, plan):
                result = cross_validate(scan, plan, trial_dir, log=log, after_fold=after_fold)
            else:
                result = fit(scan, plan, trial_dir, progress=False, log=lambda _: None, report=report,
                             max_seconds=left, evaluate_test=False)
        except Exception as exc:  # pruned (the search goes on) or failed: say which before it propagates
            log(f"  -> {exc}")
            raise
        cv = result.metrics.get("cv")
        score = (f"cross-validated balanced accuracy {cv['balanced_accuracy']:.4f} on {cv['n']} images" if cv else
                 f"val accuracy {result.metrics['val']['accuracy']:.4f}, balanced {result.metrics['val']['balanced_accuracy']:.4f}")
        log(f"  -> {score}, in {result.seconds:.0f}s")
        return result.metrics

    return run


def cross_validates(scan: DatasetScan, plan: Plan) -> bool:
    """Is a fine-tuning trial judged by k-fold CV (`train.cross_validate`) rather than on
    val? Where the tool drew val and every labelled image fits CV_FINETUNE_MAX_IMAGES."""
    n = len(scan.splits["train"]) + len(scan.splits["val"])
    return plan.strategy != "frozen" and plan.epochs > 0 and plan.lp_init and plan.refit and scan.val_drawn and n <= CV_FINETUNE_MAX_IMAGES


def search_config(
    data: str, storage: str, profiles: list[Profile], plans: list[Plan],
    trials: int | None, time_budget: float | None,
) -> SearchConfig:
    """The search over what the rules ranked: among the profiled backbones, with sampled
    trials seeing the data as the rules did (image size, seed)."""
    return SearchConfig(
        data=data, storage=storage, backbones=[profile.backbone for profile in profiles],
        base=replace(plans[0], reasons=[]), trials=trials, time_budget=time_budget, seed=plans[0].seed,
    )


def select_and_fit(
    config: SearchConfig, run_dir: Path, rule_plans: list[Plan],
    scan: DatasetScan | None = None, log: Callable[[str], None] = print, overwrite: bool = False,
) -> Plan:
    """Search (rule Plans first), then put the best trial's model and plan into RUN.

    A study already in the storage is another search's: mixing its trials into this one
    adopted models of other data, so it is refused, or deleted first with `overwrite`.
    """
    held = study_trials(config)
    if held is not None and not overwrite:
        raise RunError(
            f"the storage {shown_storage(config.storage)} already holds a study '{config.study_name}' with {held} "
            "trial(s) of an earlier search; continue that one with `autotransfer fit DATA --resume --out ITS_RUN`, "
            "or add --overwrite to delete it and start again"
        )
    if held is not None:
        delete_study(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.trials is None and config.time_budget is None:  # the default: a count, not a clock
        rule_plans = default_plans(rule_plans)
        config = replace(config, trials=len(rule_plans))
        log(f"search: {len(rule_plans)} trials, the rules' Plans ({sum(p.strategy != 'frozen' for p in rule_plans)} fine-tuned); "
            "--trials or --time-budget for more")
    elif config.trials is not None:  # the rules' best N, whatever they cost
        rule_plans = rule_plans[: config.trials]
    rule_plans = cheap_first(rule_plans)
    scan = scan or scan_folder(config.data, config.base.val_fraction, config.base.seed)
    config = replace(config, data_hash=data_hash(scan))
    config.save(run_dir)
    start = time.monotonic()
    warm_frozen_features(scan, [plan for plan in rule_plans if plan.backbone == rule_plans[0].backbone])
    study = open_study(config)
    enqueue_plans(study, rule_plans, config.backbones)
    if config.trials is not None:
        fill_queue(study, config.trials)
    if config.time_budget is not None:  # the shared feature pass is part of the search
        config = replace(config, time_budget=max(1.0, config.time_budget - (time.monotonic() - start)))
    run_search(study, config, run_dir, trial_runner(scan, log, config.time_budget), wait=log)
    return _adopt_and_test(study, run_dir, scan, log)


def data_hash(scan: DatasetScan) -> str:
    """What a search runs on: the class names and every split's files and labels."""
    blob = json.dumps([scan.classes, {split: scan.content_hash(split) for split in sorted(scan.splits)}])
    return hashlib.sha1(blob.encode()).hexdigest()


def _same_data(config: SearchConfig, scan: DatasetScan, run_dir: Path) -> None:
    """A RUN belongs to one dataset: resuming or joining its search on other data would
    compare and adopt trials of two datasets."""
    found = data_hash(scan) if config.data_hash else str(Path(scan.root).resolve())
    expected = config.data_hash or str(Path(config.data).resolve())  # runs from before data_hash: the path
    if found != expected:
        raise RunError(
            f"{scan.root} is not the data the search in {run_dir} ran on ({config.data}; its classes, files or "
            f"labels differ); resume with that data, or start a new run: `autotransfer fit {scan.root} --out NEW_RUN`"
        )


def _adopt_and_test(study: "optuna.Study", run_dir: Path, scan: DatasetScan, log: Callable[[str], None]) -> Plan:
    """Adopt the best trial into RUN, refit a fine-tuned winner on every labelled image
    where the tool drew val itself (a frozen one was refit in its trial; a cross-validated
    one left its refit to this point, so only the winner pays for one), then score it on
    test/ (trials never saw test/). A winner judged on one split is refit on that run's
    schedule and stopped at its best epoch there: the model that was validated, not one
    annealed early (benchmarks/results/refit_pneumoniamnist_all.md: +3.3 points)."""
    plan, _ = adopt_best(study, run_dir)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    labelled = len(scan.splits["train"]) + len(scan.splits["val"])
    pending = metrics.get("refit")
    if pending is not None and "images" not in pending:  # a cross-validated trial: no model of its own yet
        epochs = pending["epochs"]
        log(f"refit: the winner on every labelled image ({labelled}), {epochs} epochs (its folds' median)")
        metrics["refit"] = {**pending, "images": refit(scan, plan, run_dir, epochs)}
    elif plan.refit and scan.val_drawn and metrics.get("kept") == "finetuned" and pending is None:
        epochs = metrics["stages"]["finetune_best_epoch"]
        log(f"refit: the winner again on train + val ({labelled} images), {epochs} of its {plan.epochs} "
            "epochs' schedule (where it was best on the split); --no-refit keeps the split's model")
        images = refit(scan, plan, run_dir, epochs, schedule_epochs=plan.epochs)
        metrics["refit"] = {"images": images, "epochs": epochs, "schedule_epochs": plan.epochs}
    if scan.splits.get("test"):
        metrics["test"] = evaluate_records(run_dir, scan.splits["test"], scan.classes)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return plan


def cheap_first(plans: list[Plan]) -> list[Plan]:
    """The leading backbone's frozen Plans first, rank kept otherwise: they share one pass
    over the data and then cost a linear head each, so a tight budget still sees every
    depth. Another backbone's frozen Plan needs a pass of its own, so it keeps its rank
    (behind the leading backbone's fine-tuning: a budget spent on passes of candidates
    that the profile ranked lower would leave the leader untried)."""
    lead = plans[0].backbone if plans else None
    return sorted(plans, key=lambda plan: not (plan.strategy == "frozen" and plan.backbone == lead))


def warm_frozen_features(scan: DatasetScan, plans: list[Plan]) -> None:
    """Cache the features of every depth the Plans start from, in one pass per backbone.

    Frozen trials at several depths (or at all of them at once) then read their features
    from disk, and partial and full trials find the top features for their linear probe.
    """
    by_backbone: dict[tuple, list[int | None]] = {}
    all_levels: set[tuple] = set()
    for plan in plans:
        if plan.lp_init:
            key = (plan.backbone, plan.weights, plan.image_size, plan.seed)
            by_backbone.setdefault(key, [None])
            if plan.feature_level not in by_backbone[key]:
                by_backbone[key].append(plan.feature_level)
            if plan.all_levels:
                all_levels.add(key)
    for key, levels in by_backbone.items():
        backbone, weights, image_size, seed = key
        plan = Plan(backbone, weights=weights, image_size=image_size, seed=seed)
        cache_feature_levels(get_backbone(backbone), plan, scan, levels, progress=False, all_levels=key in all_levels)


def continue_search(
    run_dir: Path, adopt: bool = True, log: Callable[[str], None] = print, data: str | Path | None = None,
    scan: DatasetScan | None = None,
) -> Plan | None:
    """Run more trials of RUN's study with the settings it was started with.

    `fit --resume RUN` adopts the best trial afterwards (after other workers' trials end);
    `worker RUN` (possibly on another machine, sharing the study through a server storage)
    only adds trials. `data` (default: the path the search recorded) must hold the data
    the search ran on (or `scan`, for a search on a scan of part of a folder, as the bench's).
    Trials that a kill or Ctrl-C interrupted run again, with their Plan.
    """
    config = SearchConfig.load(run_dir)
    if study_trials(config) is None:  # a missing study is not created: that lost the old one's place
        raise RunError(
            f"the study of {run_dir} is not in its storage {shown_storage(config.storage)}; restore it, or "
            f"start again with `autotransfer fit DATA --out {run_dir} --overwrite`"
        )
    scan = scan or scan_folder(data or config.data, config.base.val_fraction, config.base.seed)
    _same_data(config, scan, run_dir)
    study = open_study(config)
    if adopt and config.trials is not None:
        fill_queue(study, config.trials)  # refill the places of trials that failed
    log(f"{'resuming' if adopt else 'joining'} the search in {run_dir}: {progress(study)}")
    run_search(study, config, run_dir, trial_runner(scan, log, config.time_budget), wait=log if adopt else None)
    return _adopt_and_test(study, run_dir, scan, log) if adopt else None


def profile_and_rank(
    scan: DatasetScan, base: Plan, max_images: int = 400, progress: bool = True,
    backbones: list[str] | None = None, optional_backbones: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[Profile], list[Plan]]:
    """Profile the data for each backbone named (default: the base Plan's) and, on data of
    at least MIN_IMAGES_TO_RANK_BACKBONES images, each of `optional_backbones` (the other
    installed ones); then let the rules rank backbones and Plans. The leading backbone's
    profile comes first. Nothing here depends on how fast the machine is: backbones are
    costed in FLOPs, not seconds. Each profile is made at the input size the Plans will
    train at (the base Plan's, else the rules' `input_size`: 128 px for small images), so
    its distances and per-depth k-NN are measured on the pixels the trials see.

    Of several backbones, one whose weights cannot be loaded is dropped with a logged
    reason; a name no plugin offers (or one whose spec failed) stops before any profile."""
    optional = list(optional_backbones or [])
    n_images = len(scan.splits["train"]) + len(scan.splits.get("val", []))
    if optional and n_images < MIN_IMAGES_TO_RANK_BACKBONES:
        log(f"not profiled: {', '.join(optional)} ({n_images} images: a k-NN accuracy on fewer than "
            f"{MIN_IMAGES_TO_RANK_BACKBONES} cannot resolve the {THRESHOLDS.backbone_knn_margin:g} margin that ranks "
            "backbones); name them with --backbone to compare them anyway")
        optional = []
    names = list(dict.fromkeys([*(backbones or [base.backbone]), *optional]))
    for name in names:
        get_backbone(name)
    profiles, dropped = [], []
    image_size = base.image_size or input_size(scan.median_side())
    for name in names:
        try:
            profiles.append(profile_dataset(
                scan.root, name, base.weights, max_images=max_images, image_size=image_size,
                val_fraction=base.val_fraction, seed=base.seed, progress=progress, scan=scan,
            ))
        except BackboneError as exc:
            if len(names) == 1:
                raise
            dropped.append(exc)
            log(f"dropped backbone {name}: {exc}")
    if not profiles:
        raise dropped[0]
    costs = {} if len(profiles) == 1 else {p.backbone: forward_flops(rank_plans(p, base)[0]) for p in profiles}
    plans = rank_plans_across_backbones(profiles, costs, base)
    profiles.sort(key=lambda p: p.backbone != plans[0].backbone)
    return profiles, plans


def default_backbones(weights: str) -> list[str]:
    """What `fit` chooses among when no --backbone is given: DEFAULT_BACKBONE, then the
    installed backbones whose spec says `default_candidate` (those of DEFAULT_BACKBONE's
    own plugin first, then by name), at most MAX_DEFAULT_BACKBONES in all;
    `profile_and_rank` takes the others as optional. Installing a plugin never pushes
    efficientnet_lite1/2 out; any other backbone is used when named with --backbone.

    AUTOTRANSFER_BACKBONES=a,b,c replaces this rule with that list, in that order (a
    unknown name is a BackboneError naming the variable). Only pretrained weights come in
    sets; 'random' or a weights file means one backbone: the list's first.
    """
    chosen = [name.strip() for name in os.environ.get(BACKBONES_ENV, "").split(",") if name.strip()]
    for name in chosen:
        try:
            get_backbone(name)
        except BackboneError as exc:
            raise BackboneError(f"{BACKBONES_ENV}={os.environ[BACKBONES_ENV]}: {exc}") from exc
    if chosen:
        return list(dict.fromkeys(chosen))[: None if weights == "pretrained" else 1]
    if weights != "pretrained":
        return [DEFAULT_BACKBONE]
    specs = list_backbones()
    home = next((spec.package for spec in specs if spec.name == DEFAULT_BACKBONE), None)
    others = sorted((spec for spec in specs if spec.default_candidate and spec.name != DEFAULT_BACKBONE),
                    key=lambda spec: (spec.package != home, spec.name))
    return [DEFAULT_BACKBONE, *(spec.name for spec in others)][:MAX_DEFAULT_BACKBONES]


# Without --trials or --time-budget the search runs every frozen Plan the rules ranked
# (each a linear probe on the shared feature pass) and at most this many of their
# fine-tuning Plans, in rank order: a count, so the same data and seed give the same
# decision on an idle or a loaded machine. Three full fine-tunes was the cost goal of
# issue 4 (the whole fit within 3x one full fine-tune).
MAX_DEFAULT_FINETUNES = 3


def default_plans(plans: list[Plan]) -> list[Plan]:
    """What a search without a budget of the user's runs: every frozen Plan, and the
    first MAX_DEFAULT_FINETUNES fine-tuning ones, rank kept."""
    tuned = [plan for plan in plans if plan.strategy != "frozen"][:MAX_DEFAULT_FINETUNES]
    return [plan for plan in plans if plan.strategy == "frozen" or any(plan is t for t in tuned)]


@torch.no_grad()
def forward_flops(plan: Plan) -> float:
    """FLOPs of one image through `plan`'s backbone at its input size: what backbones are
    ranked by cost with (timed steps would make the ranking follow the machine's load)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = get_backbone(plan.backbone)
    full = replace(plan, strategy="full", cut=None, feature_level=None, all_levels=False, reasons=[])
    net = build_net(spec, full, 2).eval()
    size = Preprocessing.for_plan(spec, full).input_size
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())
