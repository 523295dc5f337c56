"""The command line through click's CliRunner (in process) and `python -m` (subprocess)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from autotransfer import __version__
from autotransfer.cli import main
from conftest import (
    BROKEN_PLUGIN, CLASSES, COLOURS, FAST_CLI, GOOD_PLUGIN, photo, write_classes, write_plugin,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode")


def run(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str | Path):
    result = run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


# ---------------------------------------------------------------- fit


@pytest.mark.parametrize(
    "backbone, strategy_args",
    [("test_efficientnet", ["--strategy", "frozen"]), ("test_vit", ["--strategy", "full", "--feature-level", "3"]),
     ("test_resnet", ["--strategy", "frozen", "--all-levels"])],
    ids=["frozen", "full", "all-levels"],
)
def test_fit_writes_a_run(image_folder, tmp_path, backbone, strategy_args):
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "red" / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    result = ok("fit", data, "--backbone", backbone, *strategy_args, *FAST_CLI, "--out", out)

    assert f"{data}: 3 classes, train 18, val 6 images" in result.stdout
    assert f"run saved in {out}/" in result.stdout
    assert "skipped 1 file(s) that are not usable images" in result.stderr
    assert "notes.txt: not a readable image" in result.stderr
    for name in ("model.pt", "plan.json", "scan.json", "metrics.json"):
        assert (out / name).is_file(), name
    finetuned = strategy_args[1] != "frozen"
    assert (out / "logs" / "finetune" / "metrics.csv").is_file() is finetuned
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["backbone"], plan["strategy"], plan["weights"], plan["image_size"]) == (
        backbone, strategy_args[1], "random", 32,
    )
    assert plan["all_levels"] is ("--all-levels" in strategy_args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 5 / 6
    assert ("finetune_val_accuracy" in metrics["stages"]) is finetuned


def test_fit_partial_then_fit_plan_reproduces_it(image_folder, tmp_path):
    first = tmp_path / "first"
    ok("fit", image_folder, "--backbone", "test_resnet", "--strategy", "partial", "--cut", "2",
       *FAST_CLI, "--out", first)
    plan = json.loads((first / "plan.json").read_text())
    assert (plan["strategy"], plan["cut"]) == ("partial", 2)

    again = tmp_path / "again"
    result = ok("fit", image_folder, "--plan", first / "plan.json", "--out", again, "--no-progress")
    assert "features: reused from cache" in result.stdout
    assert json.loads((again / "plan.json").read_text()) == plan
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, again))
    assert m2["val"] == m1["val"] and m2["stages"] == m1["stages"]
    s1, s2 = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (first, again))
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


# ---------------------------------------------------------------- evaluate / predict


def test_evaluate(frozen_run, split_folder):
    text = ok("evaluate", frozen_run, split_folder).stdout
    assert "test split: 6 images" in text
    assert "accuracy 1.0000, macro-F1 1.0000" in text
    assert "confusion matrix (rows: true, columns: predicted):" in text

    report = json.loads(ok("evaluate", frozen_run, split_folder, "--split", "val", "--json").stdout)
    assert (report["split"], report["n"], report["accuracy"]) == ("val", 6, 1.0)
    assert list(report["per_class_accuracy"]) == CLASSES


def test_predict_json(frozen_run, tmp_path):
    images = []
    for name in CLASSES:
        images.append(tmp_path / f"{name}.jpg")
        photo(COLOURS[name], seed=3).save(images[-1])
    results = json.loads(ok("predict", frozen_run, *images, "--top-k", "2", "--json").stdout)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result, truth in zip(results, CLASSES):
        probs = [p["probability"] for p in result["top_k"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6
        assert result["top_k"][0]["class"] == truth

    text = ok("predict", frozen_run, images[0]).stdout
    assert text.startswith(f"{images[0]}: blue ")
    assert text.count(",") == 2  # top 3 by default


# ---------------------------------------------------------------- backbones / demo-data


def test_backbones_json_lists_plugins_and_failures(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_plugin(site, "autotransfer-tiny-plugin", "tiny_plugin", "tiny", GOOD_PLUGIN)
    write_plugin(site, "autotransfer-broken-plugin", "broken_plugin", "broken", BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD")

    with pytest.warns(UserWarning, match=r"autotransfer-broken-plugin\[broken\]"):
        listing = json.loads(ok("backbones", "--json").stdout)
    rows = {row["name"]: row for row in listing["backbones"]}
    tiny = rows["test_resnet"]
    assert (tiny["package"], tiny["architecture"], tiny["pretrained_on"]) == (
        "autotransfer-tiny-plugin", "test_resnet", "tiny-plugin-set",
    )
    assert (tiny["groups"], tiny["levels"], tiny["input_size"]) == (5, 5, 64)
    assert 0.3 < tiny["params_m"] < 0.4
    assert listing["failed_plugins"] == [{
        "package": "autotransfer-broken-plugin", "entry": "broken",
        "error": "ImportError: needs the missing_wheel package",
    }]

    with pytest.warns(UserWarning):
        text = ok("backbones")
    assert any(line.split()[:2] == ["test_resnet", "autotransfer-tiny-plugin"] for line in text.stdout.splitlines())
    assert "failed plugin autotransfer-broken-plugin[broken]: ImportError" in text.stderr


def test_demo_data_exports_the_digits(tmp_path):
    pytest.importorskip("sklearn")
    result = ok("demo-data", tmp_path / "digits", "--size", "16")
    assert f"wrote 1797 images in 10 classes to {tmp_path / 'digits'}/" in result.stdout
    folders = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert folders == [str(d) for d in range(10)]
    assert sum(1 for _ in (tmp_path / "digits").rglob("*.png")) == 1797
    first = Image.open(next((tmp_path / "digits" / "0").glob("*.png")))
    assert (first.size, first.mode) == ((16, 16), "L")


# ---------------------------------------------------------------- user errors


def _one_class(tmp: Path) -> Path:
    return write_classes(tmp / "one", per_class=2, classes={"cats": COLOURS["red"]})


def _unreadable_class(tmp: Path) -> Path:
    write_classes(tmp / "bad", per_class=2, classes={"cats": COLOURS["red"]})
    (tmp / "bad" / "dogs").mkdir()
    (tmp / "bad" / "dogs" / "dog.jpg").write_bytes(b"\x00" * 100)
    return tmp / "bad"


def _not_a_run(tmp: Path) -> Path:
    (tmp / "not-a-run").mkdir()
    return tmp / "not-a-run"


def _pickled_model(tmp: Path, name: str) -> Path:
    """A whole pickled timm model, not a state dict: torch explains that over many lines."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm.create_model("test_resnet"), path)
    return path


ERRORS = {
    "missing-folder": (lambda t, d: ["fit", t / "nowhere"], r"nowhere does not exist"),
    "one-class": (lambda t, d: ["fit", _one_class(t)], r"has 1 class folder \('cats'\); need at least 2"),
    "unreadable-class": (lambda t, d: ["fit", _unreadable_class(t)], r"class 'dogs' has no readable image"),
    "unknown-backbone": (
        lambda t, d: ["fit", d, "--backbone", "test_resnt"],
        r"unknown backbone 'test_resnt'; did you mean test_resnet",
    ),
    "evaluate-not-a-run": (lambda t, d: ["evaluate", _not_a_run(t), d], r"not-a-run is not an autotransfer run"),
    "predict-not-a-run": (
        lambda t, d: ["predict", _not_a_run(t), d / "red" / "00.jpg"], r"not-a-run is not an autotransfer run",
    ),
    "cut-out-of-range": (
        lambda t, d: ["fit", d, "--backbone", "test_resnet", "--strategy", "partial", "--cut", "9", *FAST_CLI],
        r"cut must be between 1 and 4 for test_resnet .*but got 9",
    ),
    "cut-without-partial": (lambda t, d: ["fit", d, "--cut", "2"], r"--cut 2 only applies to strategy 'partial'"),
    "missing-plan": (lambda t, d: ["fit", d, "--plan", t / "plan.json"], r"plan file '.*plan\.json' not found"),
    "missing-weights": (
        lambda t, d: ["fit", d, "--backbone", "test_resnet", "--weights", t / "w.pth"],
        r"weights file '.*w\.pth' not found",
    ),
    "weights-not-a-state-dict": (
        lambda t, d: ["fit", d, "--backbone", "test_resnet", "--weights", _pickled_model(t, "full.pth")],
        r"could not read weights file '.*full\.pth' \(UnpicklingError: .*\); expected a state dict",
    ),
    "model-pt-not-ours": (
        lambda t, d: ["evaluate", _pickled_model(t, "run/model.pt").parent, d],
        r"model\.pt could not be read as a model file \(UnpicklingError: .*\); expected the model\.pt",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_exit_1_without_traceback(case, tmp_path, image_folder):
    make_args, match = ERRORS[case]
    result = run(*make_args(tmp_path, image_folder))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert re.search(match, lines[0]), lines[0]


def test_usage_errors_exit_2():
    result = run("fit", "somewhere", "--strategy", "half")
    assert result.exit_code == 2
    assert "Invalid value for '--strategy'" in result.output


@pytest.mark.parametrize("command", ["fit", "plan"])
@pytest.mark.parametrize("option", [["--feature-level", "2"], ["--all-levels"]])
def test_depth_options_without_strategy_are_usage_errors(command, option, image_folder):
    """A decision picks the depth itself: a given one would be silently dropped."""
    result = run(command, image_folder, *option)
    assert result.exit_code == 2, result.output
    assert f"{option[0]}" in result.output and "add --strategy frozen" in result.output


def test_version():
    assert ok("--version").stdout.strip() == f"autotransfer, version {__version__}"


def test_python_m_autotransfer_help():
    done = subprocess.run(
        [sys.executable, "-m", "autotransfer", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: ")
    for command in ("fit", "evaluate", "predict", "backbones", "demo-data"):
        assert f"  {command} " in done.stdout
