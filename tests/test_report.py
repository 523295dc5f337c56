"""`autotransfer report`: one tiny real search run and the session's explicit runs, reported
as HTML/Markdown/JSON; the HTML opened in a real headless Chromium (screenshot, no console
errors, no broken images, nothing fetched)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from click.testing import CliRunner

from autotransfer.cli import main
from autotransfer.errors import RunError
from autotransfer.report import Misclassified, build_report, linear_probe, write_report
from autotransfer.strategies import depth_of

from browser import NO_CHROMIUM, check_in_browser, chromium
from conftest import FAST_CLI, write_classes

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode")

BACKBONE = "test_efficientnet"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def search_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """`fit` without --strategy: profile, 3 trials (rules first), adopted winner."""
    run = tmp_path_factory.mktemp("report") / "search"
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setenv("AUTOTRANSFER_CACHE", str(tmp_path_factory.mktemp("report-cache")))
        mp.setenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        result = invoke("fit", image_folder, "--trials", "3", "--max-images", "24", "--backbone", BACKBONE,
                        *FAST_CLI, "--out", run)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def search_report(search_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD", "1")
        result = invoke("report", search_run, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"report written to {out / 'report.html'}" in result.stdout
    return out


def _self_contained(page: str) -> None:
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources
    assert all(s.startswith(("data:", "#")) for s in sources), [s[:60] for s in sources if not s.startswith(("data:", "#"))]
    assert "<script" not in page and "<link" not in page and "@import" not in page


def test_search_run_report(search_run: Path, search_report: Path) -> None:
    page = (search_report / "report.html").read_text()
    _self_contained(page)
    for anchor in ("profile", "decision", "curve", "search", "results", "misclassified"):
        assert f'<section id="{anchor}">' in page
    assert "Missing:" not in page  # a search run has every section

    report = json.loads((search_report / "report.json").read_text())
    metrics = json.loads((search_run / "metrics.json").read_text())
    assert report["schema"] == "autotransfer.report/1" and report["kind"] == "search"
    assert report["missing"] == {}
    assert report["plan"]["reasons"][-1].startswith("won the search")
    # search history: every trial, rules first, best-so-far never falls
    trials = report["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and trials[0]["from_rules"] is True
    best = [t["best_so_far"] for t in trials]
    assert best == sorted(best) and best[-1] == pytest.approx(metrics["val"]["accuracy"])
    assert report["winner"] in (0, 1, 2)
    # the transfer curve: k-NN at every profiled depth, plus each trial's head and fine-tuning
    groups, _ = depth_of(BACKBONE, None)
    assert report["groups"] == groups
    knn = [p for p in report["curve"] if p["source"] == "profile-knn"]
    assert sorted(p["cut"] for p in knn) == list(range(1, groups + 1))
    heads = [p for p in report["curve"] if p["source"] == "trial-head"]
    one_depth = {t["number"] for t in trials if t["state"] == "COMPLETE" and not t["all_levels"]}
    assert {p["trial"] for p in heads} == one_depth  # a head on every level at once has no depth
    assert [(t["all_levels"], t["all_levels_mode"]) for t in trials].count((True, "level")) == 1  # the rules' second Plan
    assert [(t["all_levels"], t["all_levels_mode"]) for t in trials].count((True, "feature")) == 1  # and third
    for p in report["curve"]:
        assert 0 <= p["cut"] <= groups and 0.0 <= p["accuracy"] <= 1.0
        if p["source"] == "trial-finetune":
            assert p["cut"] == (0 if p["strategy"] == "full" else next(t["cut"] for t in trials if t["number"] == p["trial"]))
    # misclassified images recomputed from the files agree with the run's own metrics
    predictions = report["predictions"]
    assert predictions["n"] == metrics["val"]["n"] and predictions["same_data"] is True
    assert predictions["accuracy"] == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
    assert len(predictions["misclassified"]) == predictions["misclassified_total"]
    assert all("thumbnail" not in m for m in predictions["misclassified"])
    assert page.count("data:image/jpeg;base64,") == predictions["misclassified_total"]

    markdown = (search_report / "report.md").read_text()
    linked = re.findall(r"\]\(((?:figures|misclassified)/[^)]+)\)", markdown)
    assert {"figures/transfer-curve.png", "figures/search-history.png", "figures/confusion-val.png",
            "figures/distance.png", "figures/class-balance.png"} <= set(linked)
    assert all((search_report / path).is_file() for path in linked)


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_report_in_a_real_browser(search_report: Path, tmp_path: Path) -> None:
    check = check_in_browser(search_report / "report.html", tmp_path)
    report = json.loads((search_report / "report.json").read_text())
    assert check["images"] == 5 + report["predictions"]["misclassified_total"]  # figures + thumbnails


def test_explicit_run_report_names_what_is_missing(truncated_run: Path, tmp_path: Path, split_folder: Path) -> None:
    """A `fit --strategy` run: no profile, no search; the sections say which command fills them."""
    result = invoke("report", truncated_run, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "explicit" and set(report["missing"]) == {"profile", "search"}
    assert f"autotransfer profile {split_folder} --backbone test_resnet --weights random --image-size 32" in report["missing"]["profile"]
    assert "(no --strategy)" in report["missing"]["search"]
    assert "profile: no profile.json" in result.stderr
    # its own two points: the linear head at level 2 (all groups of the truncated net
    # frozen), and the fine-tuning above cut 1
    points = {(p["source"], p["cut"]) for p in report["curve"]}
    assert points == {("trial-head", depth_of("test_resnet", 2)[0]), ("trial-finetune", 1)}
    assert report["predictions"]["n"] == 6 and report["predictions"]["same_data"] is True
    page = (tmp_path / "out" / "report.html").read_text()
    _self_contained(page)
    assert page.count('<div class="missing">') == 2  # the data's profile, the search history
    assert "confusion matrix, test split" in page.lower()


def test_moved_data_is_named_and_found_with_data_option(frozen_run: Path, split_folder: Path, tmp_path: Path) -> None:
    run = shutil.copytree(frozen_run, tmp_path / "run")
    scan = json.loads((run / "scan.json").read_text())
    (run / "scan.json").write_text(json.dumps({**scan, "root": str(tmp_path / "gone")}))
    report = build_report(run)
    assert report.predictions is None
    assert "--data DIR" in report.missing["misclassified"] and str(tmp_path / "gone") in report.missing["misclassified"]
    report = build_report(run, data=split_folder, max_misclassified=1)
    assert report.predictions is not None and len(report.predictions.misclassified) <= 1
    paths = write_report(report, tmp_path / "out")
    assert all(path.is_file() for path in paths.values())


def test_unfinished_search_reports_its_trials(search_run: Path, tmp_path: Path) -> None:
    """Killed before the winner was adopted: no plan, model, metrics or leaderboard yet."""
    run = shutil.copytree(search_run, tmp_path / "run")
    for name in ("plan.json", "model.pt", "metrics.json", "leaderboard.csv"):
        (run / name).unlink()
    report = build_report(run)
    assert report.kind == "search (no winner yet)"
    assert "--resume" in report.missing["decision"] and "misclassified" in report.missing
    assert [t.number for t in report.trials] == [0, 1, 2] and all(t.from_rules is None for t in report.trials)
    assert any(p.source == "trial-head" for p in report.curve)
    write_report(report, tmp_path / "out")
    _self_contained((tmp_path / "out" / "report.html").read_text())


def test_curve_option_probes_every_level(search_run: Path, tmp_path: Path) -> None:
    report = build_report(search_run, curve=True, max_misclassified=0)
    groups, levels = depth_of(BACKBONE, None)
    probes = [p for p in report.curve if p.source == "probe"]
    assert [p.feature_level for p in probes] == [*range(levels), None]
    assert [p.cut for p in probes] == [depth_of(BACKBONE, level)[0] for level in range(levels)] + [groups]
    assert all(0.0 <= p.accuracy <= 1.0 for p in probes)
    assert "skipped (--max-misclassified 0)" in report.missing["misclassified"]


def test_linear_probe_separates_separable_features() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    features = torch.randn(60, 8, generator=generator) * 0.1 + torch.nn.functional.one_hot(labels, 8).float() * 3
    assert linear_probe(features[:45], labels[:45], features[45:], labels[45:], 3) == 1.0


@pytest.mark.parametrize("make", [lambda t: t / "absent", lambda t: t, lambda t: (t / "f.txt").write_text("x") and t / "f.txt"],
                         ids=["absent", "empty-folder", "file"])
def test_not_a_run_is_one_line_exit_1(tmp_path: Path, make) -> None:
    target = make(tmp_path)
    result = invoke("report", target)
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: .*(is not an autotransfer run|does not exist).*\n", result.output), result.output
    with pytest.raises(RunError):
        build_report(target)


class _Elements(HTMLParser):
    """Every element and attribute of a page, and its text, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data: str) -> None:
        self.text += data


HOSTILE = {  # class folder -> colour; the two red ones are confused, so both show in the grid
    "<script>alert(1)": (215, 35, 35),
    "<code><img src=x onerror=alert(2)>": (215, 35, 35),
    "\"quoted' & <b>bold": (35, 55, 215),  # no '/': it is a folder name
}


def test_markup_in_class_names_and_paths_stays_text(tmp_path: Path) -> None:
    """Class folders and the data path are the user's: the page shows them, never runs them."""
    data = write_classes(tmp_path / "<img src=y onerror=alert(3)> & \"q'" / "data", per_class=6, classes=HOSTILE)
    run = tmp_path / "run"
    result = invoke("fit", data, "--backbone", BACKBONE, "--strategy", "frozen", *FAST_CLI, "--out", run)
    assert result.exit_code == 0, result.output
    report = build_report(run)
    assert report.predictions is not None
    thumbnail = report.predictions.misclassified[0].thumbnail if report.predictions.misclassified else b""
    report.predictions.misclassified.append(Misclassified(  # the grid, whatever the model got right
        str(data / "<code><img src=x onerror=alert(2)>" / "00.jpg"), "<script>alert(1)",
        "<code><img src=x onerror=alert(2)>", 0.9, thumbnail))
    paths = write_report(report, tmp_path / "out")

    page = _Elements()
    page.feed(paths["html"].read_text())
    figures = len(list((tmp_path / "out" / "figures").glob("*.png")))
    assert "script" not in page.tags
    assert page.tags.count("img") == figures + len(report.predictions.misclassified)  # the report's own only
    assert page.tags.count("b") == 3  # the lead line's two and the decision's
    assert {name for name, _ in page.attrs} <= {"lang", "charset", "http-equiv", "content", "name", "href", "id",
                                                 "class", "alt", "src", "title"}
    assert all(value.startswith("data:") for name, value in page.attrs if name == "src")
    for name in HOSTILE:
        assert name in page.text  # shown as text
    assert str(data) in page.text

    markdown = paths["md"].read_text()
    assert "<" not in markdown  # no value opens a tag: Markdown passes HTML on
    assert "&lt;code&gt;&lt;img src=x onerror=alert(2)&gt;" in markdown
