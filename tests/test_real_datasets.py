"""End-to-end on the shared real datasets (issue 2's "done when"); path from AUTOTRANSFER_DATASETS."""

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from autotransfer.cli import main

pytestmark = pytest.mark.slow
DATASETS = Path(os.environ.get("AUTOTRANSFER_DATASETS", Path(__file__).parents[2] / "shared" / "datasets"))


def _fit(tmp_path: Path, name: str, *args: str) -> tuple[dict, float, str]:
    data = DATASETS / name
    if not data.is_dir():
        pytest.skip(f"{data} not found; set AUTOTRANSFER_DATASETS")
    out = tmp_path / "run"
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["fit", str(data), "--out", str(out), "--no-progress", *args])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text()), seconds, result.output


def test_hymenoptera_frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTRANSFER_CACHE", str(tmp_path / "cache"))
    metrics, _, output = _fit(tmp_path, "hymenoptera", "--strategy", "frozen")
    assert metrics["val"]["accuracy"] >= 0.92  # (its time is a benchmark's business, not a test's)
    assert "imageNotFound.gif" in output  # the placeholder is reported


def test_hymenoptera_full(tmp_path: Path) -> None:
    metrics, _, _ = _fit(tmp_path, "hymenoptera", "--strategy", "full")
    assert metrics["val"]["accuracy"] >= 0.92


def test_flowers_frozen(tmp_path: Path) -> None:
    metrics, _, _ = _fit(tmp_path, "flowers", "--strategy", "frozen")
    assert metrics["val"]["accuracy"] >= 0.85


def test_hymenoptera_decides_and_explains(tmp_path: Path) -> None:
    metrics, _, output = _fit(tmp_path, "hymenoptera", "--trials", "2", "--epochs", "2")
    assert metrics["val"]["accuracy"] >= 0.92
    assert "ranked plans:" in output and "decision:" in output
    profile = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert any(s["path"].endswith("imageNotFound.gif") for s in profile["quality"]["skipped"])
    assert profile["summary"]["distance"] < 2.0  # near ImageNet
