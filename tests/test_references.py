"""The bench's independent linear probe: the same choice of C as scikit-learn's own
LogisticRegressionCV, fewer folds for small classes, every depth from the shared feature
cache, and no part of autotransfer's own probe."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from autotransfer.bench import BenchSettings, draw_val, scan_datasets
from autotransfer.plan import Plan
from autotransfer.references import C_GRID, cv_folds, linear_probe, run_probes
from autotransfer.strategies import ALL_LEVELS
from autotransfer.train import fit

from conftest import FAST

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode")


def sklearn_cv(x: np.ndarray, y: np.ndarray, folds: int, seed: int):
    """LogisticRegressionCV with the same grid, folds, solver and scoring (pure L2)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    options = dict(Cs=list(C_GRID), cv=StratifiedKFold(folds, shuffle=True, random_state=seed), solver="lbfgs",
                   max_iter=1000, scoring="accuracy")
    known = inspect.signature(LogisticRegressionCV).parameters
    if "l1_ratios" in known:  # scikit-learn >= 1.8: say "L2" instead of the deprecated penalty
        options["l1_ratios"] = (0.0,)
    if "use_legacy_attributes" in known:
        options["use_legacy_attributes"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegressionCV(**options).fit(x, y)


def test_probe_chooses_c_as_logistic_regression_cv_does() -> None:
    from sklearn.datasets import make_classification
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(n_samples=300, n_features=40, n_informative=8, n_classes=4, n_clusters_per_class=1,
                               class_sep=1.5, flip_y=0.05, random_state=0)
    x = x * np.linspace(0.1, 50, 40) + 7  # scales the probe must standardise away
    train_x, train_y, test_x, test_y = x[:200], y[:200], x[200:], y[200:]
    result = linear_probe(train_x, train_y, test_x, num_classes=4, seed=3)

    scaler = StandardScaler().fit(train_x)
    reference = sklearn_cv(scaler.transform(train_x), train_y, folds=5, seed=3)
    chosen = float(np.ravel(reference.C_)[0])
    assert result.folds == 5 and result.C == pytest.approx(chosen)
    assert C_GRID[0] < result.C < C_GRID[-1]  # the grid brackets the choice: a real optimum, not an edge
    agree = np.mean(np.asarray(result.predicted) == reference.predict(scaler.transform(test_x)))
    assert agree >= 0.98
    assert result.probabilities.shape == (100, 4) and np.allclose(result.probabilities.sum(1), 1)
    assert np.mean(np.asarray(result.predicted) == test_y) > 0.6  # it learnt something


def test_folds_shrink_with_the_smallest_class_and_one_image_fixes_c() -> None:
    assert cv_folds(np.array([0] * 10 + [1] * 3)) == 3
    assert cv_folds(np.array([0] * 10 + [1] * 30 + [2] * 7)) == 5
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), np.array([0, 0, 0, 1, 1, 1, 2])
    x[y == 1] += 3
    result = linear_probe(x, y, x[:2], num_classes=4)  # class 2 has one image; class 3 none
    assert result.folds == 0 and result.cv_accuracy is None and result.C == C_GRID[len(C_GRID) // 2]
    assert result.probabilities.shape == (2, 4) and (result.probabilities[:, 3] == 0).all()
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x[:3], y[:3], x[:1], num_classes=3)


def test_probes_read_every_depth_from_the_cache_the_grid_uses(image_folder: Path, tmp_path: Path) -> None:
    (scan,) = scan_datasets([image_folder], BenchSettings(seed=0))
    cell = draw_val(scan, 0.2, 0)
    plan = Plan(**{**FAST, "backbone": "test_efficientnet"})
    rows = run_probes(cell, plan, [1, 3, None])
    assert [r["recipe"] for r in rows] == ["probe-L1", "probe-L3", "probe-top", "probe-all"]
    assert [r["level"] for r in rows] == [1, 3, None, ALL_LEVELS]
    targets = [r.label for r in cell.splits["test"]]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert len(row["heldout_predicted"]) == len(targets) == 6
        assert row["labelled_images"] == len(cell.splits["train"]) + len(cell.splits["val"]) == 18
        assert row["heldout_accuracy"] == pytest.approx(np.mean(np.asarray(row["heldout_predicted"]) == targets))
        assert row["seconds"] >= row["features_seconds"] > 0
    assert rows[-1]["features"] > rows[-2]["features"]  # every level and the top, concatenated
    # the same cache keys as a frozen fit: the grid's recipe at level 3 finds its features there
    result = fit(cell, Plan(**{**FAST, "backbone": "test_efficientnet", "feature_level": 3}), tmp_path / "run",
                 progress=False, log=lambda _: None)
    assert result.features_reused


def test_the_reference_is_independent_of_autotransfers_own_probe() -> None:
    code = ("import sys, numpy as np; from autotransfer.references import linear_probe, run_probes; "
            "r = np.random.default_rng(0); x = r.normal(size=(40, 4)); y = np.arange(40) % 2; x[y == 1] += 2; "
            "linear_probe(x, y, x, 2); "
            "assert 'autotransfer.probe' not in sys.modules and 'autotransfer.train' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('autotransfer'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    source = (Path(__file__).parents[1] / "autotransfer" / "references.py").read_text()
    assert "autotransfer.probe" not in source.replace("never `autotransfer.probe`", "")
