"""Decide and prove, end to end on tiny data: profile -> rules -> search -> adopted winner."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

from autotransfer.backbones import get_backbone
from autotransfer.cli import main
from autotransfer.data import scan_folder
from autotransfer.errors import BackboneError
from autotransfer.plan import Plan
from autotransfer.search import best_trial
from autotransfer.profile import Profile
from autotransfer.strategies import Preprocessing
from autotransfer.selector import (
    MAX_DEFAULT_FINETUNES,
    cheap_first,
    default_backbones,
    cross_validates,
    default_plans,
    forward_flops,
    select_and_fit,
    profile_and_rank,
    trial_runner,
    warm_frozen_features,
)
from autotransfer.train import fit, refit as refit_model

from conftest import FAST, FAST_CLI, GOOD_PLUGIN, write_plugin, write_plugins


def test_fit_decides_searches_and_explains(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", str(image_folder), "--trials", "3", "--max-images", "24",
                                       "--backbone", "test_efficientnet", *FAST_CLI, "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "ranked plans (" in result.output and "decision:" in result.output
    for name in ("model.pt", "plan.json", "metrics.json", "profile.json", "leaderboard.csv", "study.db", "search.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "leaderboard.csv").open()))
    assert len(rows) == 3 and rows[0]["from_rules"] == "True"
    plan = Plan.load(run / "plan.json")
    assert any("won the search" in r for r in plan.reasons)
    study = optuna.load_study(study_name="autotransfer", storage=f"sqlite:///{run / 'study.db'}")
    top = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    adopted = best_trial(study)  # --trials 3: all three are the rules' Plans, so the top one
    assert adopted.number == top.number or adopted.value == top.value
    assert adopted.user_attrs["val_predictions"]["target"] == top.user_attrs["val_predictions"]["target"]
    assert json.loads((run / "metrics.json").read_text())["val"]["balanced_accuracy"] == pytest.approx(
        adopted.user_attrs["val_balanced_accuracy"])

    evaluated = CliRunner().invoke(main, ["evaluate", str(run), str(image_folder), "--json"])
    assert evaluated.exit_code == 0, evaluated.output

    # resume on a finished study runs nothing more and adopts the same winner
    resumed = CliRunner().invoke(main, ["fit", str(image_folder), "--resume", "--out", str(run)])
    assert resumed.exit_code == 0, resumed.output
    study = optuna.load_study(study_name="autotransfer", storage=f"sqlite:///{run / 'study.db'}")
    assert len(study.trials) == 3
    worker = CliRunner().invoke(main, ["worker", str(run)])
    assert worker.exit_code == 0 and "no queued trial left" in worker.output


def test_fit_chooses_among_several_backbones(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", str(image_folder), "--trials", "4", "--max-images", "24",
                                       "--backbone", "test_efficientnet", "--backbone", "test_resnet",
                                       "--time-budget", "10m", "-v", *FAST_CLI, "--out", str(run)])  # -v: every reason
    assert result.exit_code == 0, result.output
    assert "profiling backbones: test_efficientnet, test_resnet\n" in result.output
    profiles = {name: Profile.load(run / "profiles" / f"{name}.json") for name in ("test_efficientnet", "test_resnet")}
    assert {p.backbone for p in profiles.values()} == set(profiles)
    leader = Profile.load(run / "profile.json").backbone
    assert f"backbone {leader} (best k-NN" in result.output and "other backbone" in result.output
    config = json.loads((run / "search.json").read_text())
    assert config["backbones"] == [leader, *(n for n in profiles if n != leader)]
    assert config["time_budget"] == 600 and config["trials"] == 4
    rows = list(csv.DictReader((run / "leaderboard.csv").open()))
    assert len(rows) == 4
    # --trials 4 takes the rules' first 4 Plans: the leader's first ones
    assert {r["backbone"] for r in rows} == {leader}


def test_sampled_trials_see_the_data_as_the_rules_did(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fast = [a for a in FAST_CLI if a not in ("--image-size", "32")]  # the rules choose the size
    result = CliRunner().invoke(main, ["fit", str(image_folder), "--trials", "1", "--max-images", "24",
                                       "--backbone", "test_efficientnet", "-v", *fast, "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "upsampled to 128 px" in result.output  # 40 px images; a reason, shown with -v
    assert json.loads((run / "search.json").read_text())["base"]["image_size"] == 128 == Plan.load(run / "plan.json").image_size
    assert json.loads((run / "profile.json").read_text())["image_size"] == 128  # profiled on the pixels trials see


@pytest.mark.filterwarnings("ignore:Overwriting leaky_tinynet")
def test_default_backbones_are_the_default_candidates_the_lite_plugin_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin whose names sort first cannot push efficientnet_lite1/2 out; one that does
    not declare default_candidate, or whose spec failed, is never a default."""
    pytest.importorskip("autotransfer_efficientnet_lite")
    assert default_backbones("random") == ["efficientnet_lite0"]  # random weights: no set to choose from
    site = write_plugins(tmp_path / "site")  # a_gone_weights_net and the failed a_misspelt_net declare it
    write_plugin(site, "autotransfer-tiny-plugin", "tiny_plugin", "tiny", GOOD_PLUGIN)  # does not
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD")
    assert default_backbones("pretrained") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    monkeypatch.setattr("autotransfer.selector.MAX_DEFAULT_BACKBONES", 100)
    assert default_backbones("pretrained") == [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "a_gone_weights_net"]


def test_autotransfer_backbones_env_sets_the_default_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTRANSFER_BACKBONES", " test_resnet, test_efficientnet,test_resnet ,")
    assert default_backbones("pretrained") == ["test_resnet", "test_efficientnet"]  # its order, once each
    assert default_backbones("random") == ["test_resnet"]  # one backbone: the list's first
    monkeypatch.setenv("AUTOTRANSFER_BACKBONES", "test_resnet,test_resnett")
    with pytest.raises(BackboneError, match=r"AUTOTRANSFER_BACKBONES=test_resnet,test_resnett: unknown backbone 'test_resnett'"):
        default_backbones("pretrained")


@pytest.mark.parametrize("min_images, profiled", [(400, ["test_efficientnet"]), (24, ["test_efficientnet", "test_resnet"])])
def test_other_backbones_are_profiled_on_enough_images_and_costed_in_flops(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch, min_images: int, profiled: list[str]
) -> None:
    """No share of a timed budget decides which backbones are compared: the installed ones
    are profiled on data large enough for their k-NN to rank them, and the ranking's costs
    are FLOPs, the same on an idle or a loaded machine."""
    monkeypatch.setattr("autotransfer.selector.MIN_IMAGES_TO_RANK_BACKBONES", min_images)
    base = Plan(**{**FAST, "backbone": "test_efficientnet"})
    logged: list[str] = []
    profiles, plans = profile_and_rank(scan_folder(image_folder), base, 24, False, ["test_efficientnet"],
                                       ["test_resnet"], log=logged.append)
    assert sorted(p.backbone for p in profiles) == profiled
    assert {p.backbone for p in plans} == set(profiled)
    assert bool(logged) == (len(profiled) == 1)
    assert all(line.startswith("not profiled: test_resnet (24 images") for line in logged)
    if len(profiled) == 1:
        return
    assert {p.backbone for p in plans} == {"test_efficientnet", "test_resnet"}
    assert 0 < forward_flops(base) == forward_flops(base) < forward_flops(replace(base, image_size=64))


def test_one_backbone_for_an_explicit_strategy(image_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["fit", str(image_folder), "--strategy", "frozen", "--backbone", "test_resnet",
                                       "--backbone", "test_efficientnet", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--strategy and --plan train one backbone, but got 2" in result.output
    weights = CliRunner().invoke(main, ["fit", str(image_folder), "--backbone", "test_resnet", "--backbone",
                                        "test_efficientnet", "--weights", str(tmp_path / "w.pth")])
    assert weights.exit_code == 2 and "state dict for one backbone" in weights.output


def test_only_the_adopted_winner_is_scored_on_test(split_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", str(split_folder), "--trials", "2", "--max-images", "24",
                                       "--backbone", "test_efficientnet", *FAST_CLI, "--out", str(run)])
    assert result.exit_code == 0, result.output
    trials = sorted((run / "trials").glob("*/metrics.json"))
    assert len(trials) == 2 and all("test" not in json.loads(t.read_text()) for t in trials)
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert f"test accuracy {test['accuracy']:.4f}" in result.output
    evaluated = CliRunner().invoke(main, ["evaluate", str(run), str(split_folder), "--split", "test", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["confusion_matrix"] == test["confusion_matrix"]


def test_plan_command_writes_a_plan_fit_reruns(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", str(image_folder), "--backbone", "test_efficientnet",
                                       "--weights", "random", "--image-size", "32", "--max-images", "24",
                                       "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("\n1. ") == 1 and "\n2. " in result.output
    plan = Plan.load(out)
    assert plan.reasons and plan.backbone == "test_efficientnet"
    rerun = CliRunner().invoke(main, ["fit", str(image_folder), "--plan", str(out), "--out", str(tmp_path / "r"), "--no-progress"])
    assert rerun.exit_code == 0, rerun.output
    assert Plan.load(tmp_path / "r" / "plan.json") == plan


def test_resume_of_a_folder_that_is_no_search(tmp_path: Path, image_folder: Path) -> None:
    result = CliRunner().invoke(main, ["fit", str(image_folder), "--resume", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a search run" in result.output and "Traceback" not in result.output


class Stop(Exception):
    pass


def test_a_trial_reports_every_stage_can_be_stopped_and_says_so(image_folder: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, float]] = []
    logged: list[str] = []

    def report(step: int, accuracy: float) -> None:
        seen.append((step, accuracy))
        if step == 1:
            raise Stop("pruned: at step 1")  # what a pruner does

    # no refit: judged on val, not cross-validated (which trains k folds without reports)
    plan = Plan(**{**FAST, "backbone": "test_efficientnet", "strategy": "full", "epochs": 3, "refit": False})
    run = trial_runner(scan_folder(image_folder), logged.append, budget=600)
    with pytest.raises(Stop):
        run(plan, tmp_path / "trials" / "0003", report)
    assert [step for step, _ in seen] == [0, 1]
    assert all(0.0 <= acc <= 1.0 for _, acc in seen)
    assert logged[0].startswith("trial 3 (") and "s of the search budget left): test_efficientnet, full" in logged[0]
    assert logged[1:] == ["  -> pruned: at step 1"]


def test_time_limit_stops_fine_tuning_and_keeps_a_model(image_folder: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    plan = Plan(**{**FAST, "backbone": "test_efficientnet", "strategy": "full", "epochs": 50})
    result = fit(scan_folder(image_folder), plan, tmp_path / "run", progress=False, log=lambda _: None,
                 report=lambda step, _: seen.append(step), max_seconds=0.5)
    assert max(seen) < 50  # stopped by the clock, not by the epoch count
    assert (tmp_path / "run" / "model.pt").is_file()
    assert 0.0 <= result.metrics["val"]["accuracy"] <= 1.0


def test_cheap_first_runs_frozen_plans_first_and_keeps_the_rank_otherwise() -> None:
    plans = [Plan("test_resnet", "partial", cut=2), Plan("test_resnet", "frozen"),
             Plan("test_resnet", "full"), Plan("test_resnet", "frozen", feature_level=2)]
    ordered = cheap_first(plans)
    assert [(p.strategy, p.feature_level) for p in ordered] == [
        ("frozen", None), ("frozen", 2), ("partial", None), ("full", None)]
    other = Plan("test_efficientnet", "frozen")  # its features need a pass of their own
    ordered = cheap_first([Plan("test_resnet", "partial", cut=2), other, Plan("test_resnet", "frozen")])
    assert [(p.backbone, p.strategy) for p in ordered] == [
        ("test_resnet", "frozen"), ("test_resnet", "partial"), ("test_efficientnet", "frozen")]


def test_warmed_features_are_what_every_frozen_trial_reads(image_folder: Path, tmp_path: Path) -> None:
    scan = scan_folder(image_folder)
    plans = [Plan(**{**FAST, "backbone": "test_resnet", "strategy": "frozen", "feature_level": level})
             for level in (None, 1, 2)]
    warm_frozen_features(scan, plans)
    for plan in plans:
        lines: list[str] = []
        fit(scan, plan, tmp_path / str(plan.feature_level), progress=False, log=lines.append)
        assert "features: reused from cache" in lines, (plan.feature_level, lines)


def test_cross_validation_picks_the_one_depth_whose_features_tell_the_classes_apart(
    image_folder: Path, tmp_path: Path
) -> None:
    """A synthetic set where one depth is clearly better: after the real shared feature
    pass, level 1's cached features become class-separated and every other depth's pure
    noise. The real frozen trials (probe, k-fold CV over every labelled image) and the
    search choose level 1 by its CV score, though a rule ranked the top first."""
    from autotransfer.features import cache_path, load_features, store_features, weights_id
    from autotransfer.search import SearchConfig, default_storage

    scan = scan_folder(image_folder)
    levels = [None, 1, 2]
    plans = [Plan(**{**FAST, "backbone": "test_resnet", "strategy": "frozen", "feature_level": level,
                     "reasons": ["rule"]}) for level in levels]
    warm_frozen_features(scan, plans)
    spec = get_backbone("test_resnet")
    prep, wid = Preprocessing.for_plan(spec, plans[0]), weights_id(spec, plans[0].weights, plans[0].seed)
    noise, classes = torch.Generator().manual_seed(0), len(scan.classes)
    for split, records in scan.splits.items():
        labels = torch.tensor([r.label for r in records])
        for level in levels:
            path = cache_path(spec.architecture, wid, level, prep, scan.content_hash(split))
            width = load_features(path, len(records)).shape[1]  # the pass wrote it: the trials read it
            synthetic = torch.randn(len(records), width, generator=noise)
            if level == 1:  # 8 features per class, shifted by 3 SD for its images
                synthetic[:, :classes * 8].view(len(records), classes, 8)[torch.arange(len(records)), labels] += 3.0
            store_features(path, synthetic)
    run = tmp_path / "run"
    config = SearchConfig(data=str(image_folder), storage=default_storage(run), backbones=["test_resnet"],
                          base=plans[0], trials=len(plans), seed=0)
    plan = select_and_fit(config, run, plans, scan=scan, log=lambda _: None)
    assert plan.feature_level == 1
    with (run / "leaderboard.csv").open() as f:
        cv = {row["feature_level"]: float(row["val_balanced_accuracy"]) for row in csv.DictReader(f)}
    assert cv["1"] >= 0.95 and cv[""] < 0.75 and cv["2"] < 0.75, cv  # 3 classes: chance is 0.33


def test_only_the_leading_backbones_features_are_warmed_before_the_search(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warming every candidate's features up front spent a 3-minute budget before trial 1."""
    import autotransfer.selector as selector
    from autotransfer.search import SearchConfig, default_storage

    warmed: list[str] = []
    real = selector.cache_feature_levels
    monkeypatch.setattr(selector, "cache_feature_levels",
                        lambda spec, plan, *a, **k: warmed.append(plan.backbone) or real(spec, plan, *a, **k))
    plans = [Plan(**{**FAST, "backbone": name, "strategy": "frozen"}) for name in ("test_resnet", "test_efficientnet")]
    run = tmp_path / "run"
    config = SearchConfig(data=str(image_folder), storage=default_storage(run), backbones=[p.backbone for p in plans],
                          base=plans[0], trials=2, seed=0)
    selector.select_and_fit(config, run, plans, log=lambda _: None)
    assert warmed == ["test_resnet"]
    with (run / "leaderboard.csv").open() as f:  # the other computed its own features in its trial
        assert {(row["backbone"], row["state"]) for row in csv.DictReader(f)} == {
            ("test_resnet", "COMPLETE"), ("test_efficientnet", "COMPLETE")}


def test_the_default_search_is_every_frozen_plan_and_the_first_fine_tunes() -> None:
    tuned = [Plan("test_resnet", "partial", cut=c) for c in (1, 2, 3, 4)]
    frozen = [Plan("test_resnet", "frozen", feature_level=level) for level in (None, 1, 2)]
    plans = [tuned[0], frozen[0], tuned[1], tuned[2], frozen[1], tuned[3], frozen[2]]
    assert MAX_DEFAULT_FINETUNES == 3
    assert default_plans(plans) == [tuned[0], frozen[0], tuned[1], tuned[2], frozen[1], frozen[2]]


def test_the_decision_does_not_depend_on_the_clock(image_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The default search is a count: a machine so loaded that every clock reading is 100 s
    later than the last (a fake slow clock) runs the same trials and writes the same plan."""
    import time

    args = ["fit", str(image_folder), "--max-images", "24", "--backbone", "test_efficientnet", *FAST_CLI]
    idle = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "idle")])
    assert idle.exit_code == 0, idle.output
    now = [time.monotonic()]

    def slow() -> float:
        now[0] += 100.0
        return now[0]

    monkeypatch.setattr(time, "monotonic", slow)
    monkeypatch.setattr(time, "perf_counter", slow)
    loaded = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "loaded")])
    assert loaded.exit_code == 0, loaded.output
    assert "search: " in idle.output and "trials, the rules' Plans" in idle.output
    trials = {}
    for run in ("idle", "loaded"):
        with (tmp_path / run / "leaderboard.csv").open() as f:
            trials[run] = sorted((row["trial"], row["state"], row["strategy"]) for row in csv.DictReader(f))
    assert trials["idle"] == trials["loaded"]  # the same trials, none cut short by the clock
    assert len(trials["idle"]) > 3 and {strategy for _, _, strategy in trials["idle"]} >= {"frozen", "partial"}
    assert Plan.load(tmp_path / "idle" / "plan.json") == Plan.load(tmp_path / "loaded" / "plan.json")


@pytest.mark.parametrize("refit", [True, False])
def test_a_fine_tuned_winner_is_refit_on_every_labelled_image(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refit: bool
) -> None:
    """The tool drew val itself: the adopted fine-tuned model then learns from train + val,
    on the split run's schedule, stopped at the epoch that was best on the split (the model
    that was validated, with more images); `--no-refit` keeps the split's model."""
    import autotransfer.selector as selector
    from autotransfer.search import SearchConfig, default_storage

    monkeypatch.setattr("autotransfer.train.finetune_wins", lambda *_: True)  # keep the fine-tuned weights
    monkeypatch.setattr(selector, "CV_FINETUNE_MAX_IMAGES", 0)  # judged on the val split, not by folds
    plan = Plan(**{**FAST, "backbone": "test_efficientnet", "strategy": "partial", "cut": 2, "epochs": 4,
                   "refit": refit, "reasons": ["rule"]})
    run = tmp_path / "run"
    config = SearchConfig(data=str(image_folder), storage=default_storage(run), backbones=["test_efficientnet"],
                          base=replace(plan, reasons=[]), trials=1, seed=0)
    lines: list[str] = []
    selector.select_and_fit(config, run, [plan], log=lines.append)
    metrics = json.loads((run / "metrics.json").read_text())
    scan = scan_folder(image_folder)
    assert scan.val_drawn and metrics["kept"] == "finetuned"
    adopted, trial = (run / "model.pt").read_bytes(), (run / "trials" / "0000" / "model.pt").read_bytes()
    if not refit:
        assert "refit" not in metrics and adopted == trial
        return
    epochs = metrics["stages"]["finetune_best_epoch"]
    assert metrics["refit"] == {"images": len(scan.splits["train"]) + len(scan.splits["val"]), "epochs": epochs,
                                "schedule_epochs": 4}
    assert adopted != trial and any(line.startswith("refit: ") for line in lines)
    with (run / "logs" / "refit" / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("train_loss")]
    assert len(logged) == epochs  # one row per epoch, on train + val
    assert epochs < 4  # else both schedules are one: the comparison below could not fail
    shipped = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    for schedule, same in ((4, True), (None, False)):  # this seed and these images: the schedule alone differs
        refit_model(scan, plan, tmp_path / f"schedule-{schedule}", epochs, schedule_epochs=schedule)
        again = torch.load(tmp_path / f"schedule-{schedule}" / "model.pt", weights_only=False)["state_dict"]
        assert all(torch.equal(shipped[k], again[k]) for k in shipped) == same


def test_fine_tuning_on_few_images_is_cross_validated_like_the_probe(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 labelled images: a val split would be 2 per class. The fine-tuned trial is judged
    by k folds over every labelled image, in the order the frozen probe uses, so the
    search compares the two on the same images; adopted, its model is then refit on all
    of them (and only then: a trial that loses costs no refit)."""
    import optuna
    from autotransfer.search import SearchConfig, default_storage, shared_images

    # every fold runs, however far behind the probe (the stop is test_search's)
    monkeypatch.setattr("autotransfer.search.CV_BEHIND_STANDARD_ERRORS", float("inf"))
    monkeypatch.setattr("autotransfer.search.finetuning_wins", lambda *_: True)  # adopted, whatever its folds said

    scan = scan_folder(image_folder)
    frozen = Plan(**{**FAST, "backbone": "test_efficientnet", "reasons": ["rule"]})
    tuned = replace(frozen, strategy="partial", cut=2, epochs=2)
    assert not cross_validates(scan, frozen) and cross_validates(scan, tuned)
    run = tmp_path / "run"
    config = SearchConfig(data=str(image_folder), storage=default_storage(run), backbones=["test_efficientnet"],
                          base=replace(frozen, reasons=[]), trials=2, seed=0)
    lines: list[str] = []
    select_and_fit(config, run, [frozen, tuned], scan=scan, log=lines.append)
    study = optuna.load_study(study_name="autotransfer", storage=default_storage(run))
    by_strategy = {t.user_attrs["plan"]["strategy"]: t for t in study.trials}
    probe, folds = by_strategy["frozen"], by_strategy["partial"]
    assert shared_images(folds, probe) == "cv_predictions"
    pool = [r.label for r in scan.splits["train"] + scan.splits["val"]]
    assert folds.user_attrs["cv_predictions"]["target"] == probe.user_attrs["cv_predictions"]["target"] == pool
    metrics = json.loads((run / "trials" / f"{folds.number:04d}" / "metrics.json").read_text())
    assert metrics["cv"]["folds"] == 5 and metrics["cv"]["n"] == len(pool)
    assert "images" not in metrics["refit"] and not (run / "trials" / f"{folds.number:04d}" / "model.pt").exists()
    adopted = json.loads((run / "metrics.json").read_text())
    assert adopted["refit"] == {**metrics["refit"], "images": len(pool)} and (run / "model.pt").is_file()
    assert sum(line.startswith("refit: the winner on every labelled image") for line in lines) == 1
    assert folds.value == pytest.approx(metrics["cv"]["balanced_accuracy"])
    assert len(list((run / "trials" / f"{folds.number:04d}").glob("fold*"))) == 5
    assert sum(line.startswith("  fold ") for line in lines) == 5
