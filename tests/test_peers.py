"""The real fastai beside the recipes: its row runs on a tiny random-init timm model where
fastai is installed, and says "not installed" where it is not (never a silent skip)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

from autotransfer.backbones import get_backbone
from autotransfer.bench import BenchSettings, draw_val, format_markdown, peer_rows, scan_datasets, score_cell
from autotransfer.peers import NOT_INSTALLED, fastai_version, run_fastai, timm_weights_file
from autotransfer.plan import Plan

from conftest import FAST

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cell(image_folder: Path):
    (scan,) = scan_datasets([image_folder], BenchSettings(seed=0))
    return draw_val(scan, 0.2, 0)


def test_weights_reach_timm_through_the_pretrained_cfg_overlay(tmp_path: Path) -> None:
    """The route fastai's vision_learner takes: timm.create_model(arch, pretrained=True,
    pretrained_cfg_overlay=dict(file=...)) must load exactly the backbone's weights."""
    spec = get_backbone("test_efficientnet")
    path = timm_weights_file(spec, "random", 5, tmp_path / "w.pth")
    saved = torch.load(path, weights_only=True)
    overlay = dict(file=str(path), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), num_classes=0)
    model = timm.create_model(spec.architecture, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items()) and len(saved) == len(model.state_dict())
    assert tuple(model.pretrained_cfg["mean"]) == (0.1, 0.2, 0.3)  # what fastai normalises with
    again = torch.load(timm_weights_file(spec, "random", 5, tmp_path / "again.pth"), weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in saved.items())  # seeded


def test_fastai_fine_tune_runs_on_a_tiny_random_model(cell, tmp_path: Path) -> None:
    pytest.importorskip("fastai")
    plan = Plan(**{**FAST, "backbone": "test_efficientnet"})
    row = run_fastai(cell, plan, tmp_path / "fastai")
    targets = [r.label for r in cell.splits["test"]]
    assert len(row["heldout_predicted"]) == len(targets) == 6
    assert set(row["heldout_predicted"]) <= {0, 1, 2}
    assert row["heldout_accuracy"] == pytest.approx(sum(p == t for p, t in zip(row["heldout_predicted"], targets)) / 6)
    assert row["epochs"] == {"frozen": 1, "unfrozen": 1} and row["image_size"] == 32 and row["fastai"] == fastai_version()
    assert row["seconds"] >= row["train_seconds"] > 0 and row["val_accuracy"] is not None


def test_without_fastai_the_row_says_not_installed(cell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "fastai" or m.startswith("fastai.")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails, as when it is absent
    monkeypatch.setitem(sys.modules, "fastai", None)
    assert fastai_version() is None
    plan = Plan(**{**FAST, "backbone": "test_efficientnet"})
    logged: list[str] = []
    (row,) = peer_rows(cell, plan, tmp_path / "runs", logged.append)
    assert row["recipe"] == "fastai" and row["not_installed"] and row["error"] == NOT_INSTALLED
    assert "not installed" in NOT_INSTALLED and "autotransfer[peers]" in NOT_INSTALLED and NOT_INSTALLED in logged[0]
    scored = score_cell({"rows": [row], "heldout_targets": [0], "images": {"train": 9, "test": 1}, "heldout": "test",
                         "dataset": "colours", "size": "all", "image_size": 32})
    report = {"cells": [scored], "settings": {**BenchSettings().__dict__}, "settings_text": "", "command": "x",
              "machine": {"platform": "p", "cpu_count": 1, "torch_threads": 1, "gpu": None},
              "versions": {}, "started": "now", "load_average_start": [0]}
    markdown = format_markdown(report)
    assert "| fastai | peer |" in markdown and "not installed" in markdown
