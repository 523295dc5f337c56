"""The Python API end to end on generated images: fit -> Run -> load -> predict -> evaluate,
and the same plan.json from the API as from the command line."""

from __future__ import annotations

import sys
import warnings
from dataclasses import replace
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import autotransfer
from autotransfer import api
from autotransfer.cli import main
from autotransfer.errors import AutotransferError, DataError, PlanError, RunError, UsageError
from autotransfer.plan import Compute
from conftest import CLASSES, COLOURS, FAST, FAST_CLI, photo

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode")

SEARCH = dict(backbone="test_efficientnet", trials=2, max_images=24)  # a tiny search
SEARCH_CLI = ["--backbone", "test_efficientnet", "--trials", "2", "--max-images", "24", *FAST_CLI]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> tuple[api.Run, list[str], Path]:
    """A search through `autotransfer.fit`, its log lines, and its feature cache."""
    out = tmp_path_factory.mktemp("api") / "run"
    cache = tmp_path_factory.mktemp("api-cache")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setenv("AUTOTRANSFER_CACHE", str(cache))
        mp.setenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        run = autotransfer.fit(image_folder, out, **SEARCH, **FAST, progress=False, log=lines.append, warn=lines.append)
    return run, lines, cache


def test_fit_load_predict_evaluate(searched, image_folder: Path, tmp_path: Path) -> None:
    run, lines, _ = searched
    assert isinstance(run, autotransfer.Run) and run.seconds > 0
    assert f"{image_folder}: 3 classes, train 18, val 6 images" in lines and "ranked plans:" in lines
    assert run.plan.backbone == "test_efficientnet" and any("won the search" in r for r in run.plan.reasons)
    assert run.metrics["val"]["accuracy"] >= 5 / 6

    model = autotransfer.load(run)
    assert model.classes == CLASSES == autotransfer.load(run.path / "model.pt").classes
    for name in CLASSES:
        photo(COLOURS[name], seed=99).save(tmp_path / f"{name}.png")
    one = model.predict(tmp_path / "red.png")
    assert isinstance(one, autotransfer.Prediction)
    assert (one.image, one.label, one.classes[0]) == (str(tmp_path / "red.png"), "red", "red")
    assert sorted(one.classes) == CLASSES and sum(one.probabilities) == pytest.approx(1, abs=1e-5)
    assert one.probabilities == sorted(one.probabilities, reverse=True)
    several = model.predict([tmp_path / f"{name}.png" for name in CLASSES], top_k=2)
    assert [p.label for p in several] == CLASSES and all(len(p.classes) == 2 for p in several)

    evaluation = model.evaluate(image_folder, split="val")
    assert (evaluation["split"], evaluation["n"]) == ("val", 6)  # fit's own val split, drawn again
    assert evaluation["confusion_matrix"] == run.metrics["val"]["confusion_matrix"]


def test_predict_takes_paths_pil_images_and_arrays(frozen_run: Path) -> None:
    model = autotransfer.load(frozen_run)
    image = photo(COLOURS["green"], seed=5)
    pixels = np.asarray(image)
    inputs = {
        "pil": image, "pil-grey-alpha": image.convert("LA"), "uint8": pixels,
        "floats in [0, 1]": pixels / 255.0, "float32": (pixels / 255.0).astype(np.float32),
    }
    for kind, item in inputs.items():
        prediction = model.predict(item)
        assert prediction.image is None, kind
        assert prediction.label == "green" or kind == "pil-grey-alpha", kind
    batch = model.predict(np.stack([pixels, np.asarray(photo(COLOURS["blue"], seed=6))]))  # N x H x W x C
    assert [p.label for p in batch] == ["green", "blue"]
    assert [p.label for p in model.predict((image, pixels))] == ["green", "green"]
    assert model.predict(pixels[..., 0]).label in CLASSES  # H x W: grey
    assert model.predict([]) == []
    assert model.predict(image).to_dict()["top_k"][0] == {"class": "green", "probability": model.predict(image).probability}


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, 40, 40), dtype=np.uint8), r"channels last\), but got shape \(3, 40, 40\); .*transpose\(1, 2, 0\)"),
    (np.full((8, 8, 3), np.nan), r"NaN or infinite"),
    (42, r"expected an image path, a PIL image or a numpy array, but got int"),
    (Path("nowhere.jpg"), r"image 'nowhere.jpg' not found"),
])
def test_predict_says_what_it_cannot_read(frozen_run: Path, bad, match: str) -> None:
    with pytest.raises(DataError, match=match):
        autotransfer.load(frozen_run).predict(bad)


def test_run_leaderboard_and_report(searched) -> None:
    run, _, _ = searched
    rows = run.leaderboard
    assert len(rows) == 2 and rows[0]["state"] == "COMPLETE" and rows[0]["from_rules"] is True
    assert isinstance(rows[0]["trial"], int) and isinstance(rows[0]["val_balanced_accuracy"], float)
    assert rows[0]["val_balanced_accuracy"] >= rows[1]["val_balanced_accuracy"]
    pytest.importorskip("pandas")
    frame = run.leaderboard_frame()
    assert list(frame["trial"]) == [row["trial"] for row in rows]

    opened = autotransfer.Run(str(run.path))  # an earlier run, by its folder
    assert (opened.plan, opened.metrics, opened.seconds) == (run.plan, run.metrics, None)
    missing: list[str] = []
    html = opened.report(run.path.parent / "report", max_misclassified=0, warn=missing.append)
    assert html == run.path.parent / "report" / "report.html" and html.is_file()
    assert (html.parent / "report.md").is_file() and (html.parent / "report.json").is_file()
    assert any(line.startswith("misclassified: skipped") for line in missing)


def test_an_explicit_run_has_no_leaderboard_and_no_pandas_says_so(frozen_run: Path, monkeypatch) -> None:
    run = autotransfer.Run(frozen_run)
    assert run.leaderboard == [] and run.plan.strategy == "frozen"
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(AutotransferError, match=r"needs pandas, which is not installed: `pip install pandas`"):
        run.leaderboard_frame()


def test_cli_and_api_write_the_same_plan_json(searched, image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    run, _, cache = searched
    monkeypatch.setenv("AUTOTRANSFER_CACHE", str(cache))
    result = CliRunner().invoke(main, ["fit", str(image_folder), *SEARCH_CLI, "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "plan.json").read_text() == (run.path / "plan.json").read_text()

    args = ["--backbone", "test_efficientnet", "--weights", "random", "--image-size", "32", "--seed", "3"]
    result = CliRunner().invoke(main, ["plan", str(image_folder), *args, "--max-images", "24", "--no-progress",
                                       "--out", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    plans = autotransfer.plan(image_folder, backbone="test_efficientnet", weights="random", image_size=32, seed=3,
                              max_images=24, progress=False, log=None)
    assert (tmp_path / "plan.json").read_text() == plans[0].to_json() + "\n"
    assert all(isinstance(p, autotransfer.Plan) and p.reasons for p in plans)


def test_explicit_fit_and_profile(image_folder: Path, tmp_path: Path) -> None:
    run = autotransfer.fit(image_folder, tmp_path / "run", strategy="frozen", backbone="test_resnet",
                           progress=False, log=None, **FAST)
    assert run.plan.strategy == "frozen" and run.plan.backbone == "test_resnet" and run.leaderboard == []
    again = autotransfer.fit(image_folder, tmp_path / "again", plan=run.plan, progress=False, log=None)
    assert again.plan == run.plan and again.metrics["val"] == run.metrics["val"]
    moved = autotransfer.fit(image_folder, tmp_path / "moved", plan=run.plan, accelerator="cpu", precision="bf16-mixed",
                             progress=False, log=None)  # where and how precisely it runs may change, not what
    assert moved.plan == replace(run.plan, compute=Compute("cpu", 1, "bf16-mixed"))

    profile = autotransfer.profile(image_folder, "test_efficientnet", weights="random", image_size=32, max_images=12,
                                   progress=False)
    assert isinstance(profile, autotransfer.Profile) and profile.backbone == "test_efficientnet"
    assert profile.sample.images == 12


@pytest.mark.parametrize("call, error, match", [
    (lambda d, t: autotransfer.fit(d, t, strategy="frozen", lrr=0.1), UsageError, r"unknown option\(s\) lrr; the options are Plan fields"),
    (lambda d, t: autotransfer.fit(d, t, plan=t / "p.json", strategy="full"), UsageError, r"plan= runs a saved Plan as it is, so strategy would be ignored"),
    (lambda d, t: autotransfer.fit(d, resume=True), UsageError, r"--resume needs --out RUN"),
    (lambda d, t: autotransfer.fit(d, t, logger="wandb"), UsageError, r"logger must be one of csv, tensorboard, mlflow, but got 'wandb'"),
    (lambda d, t: autotransfer.fit(d, t, resume=True, seed=2), UsageError, r"resume continues the search .* so seed would be ignored"),
    (lambda d, t: autotransfer.fit(d, t, resume=True, devices=2), UsageError, r"resume continues the search .* so compute would be ignored"),
    (lambda d, t: autotransfer.fit(d, t, strategy="full", devices=0), PlanError, r"devices must be a whole number of at least 1 or 'auto', but got 0"),
    (lambda d, t: autotransfer.fit(d, t, feature_level=2), UsageError, r"--feature-level 2 fix part of a Plan"),
    (lambda d, t: autotransfer.fit(d, t, strategy="frozen", backbone=["test_resnet", "test_vit"]), UsageError, r"train one backbone, but got 2"),
    (lambda d, t: autotransfer.fit(d, t, strategy="frozen", lr=float("nan")), PlanError, r"lr must be a finite number"),
    (lambda d, t: autotransfer.fit(t / "nowhere", t / "run", strategy="frozen"), DataError, r"nowhere does not exist"),
    (lambda d, t: autotransfer.load(t), RunError, r"is not an autotransfer run"),
    (lambda d, t: autotransfer.plan(d, seed=-1), PlanError, r"seed must be between 0 and 2\*\*32 - 1"),
])
def test_api_errors_are_autotransfer_errors(call, error, match, image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(error, match=match):
        call(image_folder, tmp_path)


def test_the_package_exports_the_api_functions() -> None:
    import autotransfer.plan  # noqa: F401  (the submodules of the same names, loaded)
    import autotransfer.profile  # noqa: F401
    from autotransfer.plan import Plan

    assert (autotransfer.fit, autotransfer.plan, autotransfer.profile, autotransfer.load) == (
        api.fit, api.plan, api.profile, api.load)
    assert autotransfer.Plan is Plan
    assert all(getattr(function, "__doc__", None) for function in (api.fit, api.plan, api.profile, api.load))


def test_progress_bars_only_where_they_can_redraw(monkeypatch) -> None:
    assert api.wants_progress(True) and not api.wants_progress(False)
    assert not api.wants_progress(None)  # pytest captures stdout: not a terminal

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert api.wants_progress(None)


def test_fit_from_python_is_as_quiet_as_the_command_line(image_folder: Path, tmp_path: Path, capfd, monkeypatch) -> None:
    """In a notebook, Lightning's start-up chatter ("GPU available: ...", tips) and
    Optuna's own trial lines drown the decision; the API quiets them as the CLI does."""
    import logging

    import optuna

    for name in ("pytorch_lightning", "lightning.pytorch"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.INFO)  # as a fresh kernel has it
    optuna.logging.set_verbosity(optuna.logging.INFO)
    autotransfer.fit(image_folder, tmp_path / "run", strategy="full", backbone="test_resnet", progress=False,
                     log=None, **{**FAST, "epochs": 1})
    out, err = capfd.readouterr()
    assert "GPU available" not in out + err and "TPU available" not in out + err
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
