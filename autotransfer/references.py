"""The bench's independent reference: a scikit-learn linear probe at every depth.

The linear-probe protocol of CLIP (Radford et al. 2021), SimCLR and VTAB, with nothing
of autotransfer's own training in it:

1. pooled features of the frozen backbone at one depth (a timm feature level, the top,
   or every level and the top concatenated), the same cached features the bench's grid
   reads (`autotransfer.features`, same cache keys);
2. standardised (`StandardScaler`, fit on the labelled images);
3. multinomial logistic regression (`LogisticRegression`, lbfgs, L2), its inverse
   strength `C` chosen from `C_GRID` by stratified k-fold cross-validation (accuracy;
   `MAX_FOLDS` folds, fewer when a class has fewer images; ties go to the stronger
   penalty) on *every* labelled image of the cell (train and the selection split);
4. refit with that `C` on all of them, scored once on the held-out images.

It imports scikit-learn and the feature cache only, never `autotransfer.probe` (the
product's head, which this judges) nor Lightning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import numpy as np

# Inverse L2 strength on standardised features, summed loss: 1e-5 (the head stays near
# zero) to 1e2 (barely regularised), in half-decade steps.
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-5, 2, 15))
MAX_FOLDS = 5
MAX_ITER = 1000
PROTOCOL = (
    "sklearn linear probe (CLIP/VTAB protocol): standardised pooled features, multinomial "
    f"LogisticRegression (lbfgs, L2), C from {C_GRID[0]:g}..{C_GRID[-1]:g} ({len(C_GRID)} log steps) "
    f"by stratified {MAX_FOLDS}-fold CV accuracy on every labelled image (train + val), refit on all"
)


@dataclass
class ProbeResult:
    C: float
    folds: int  # 0: too few images per class to cross-validate; C_GRID's middle was used
    cv_accuracy: float | None  # mean out-of-fold accuracy at C
    predicted: list[int]  # held-out class indices
    probabilities: np.ndarray  # held-out, images x classes (columns: every class index)
    seconds: float


def cv_folds(labels: np.ndarray, max_folds: int = MAX_FOLDS) -> int:
    """Stratified folds possible: at most `max_folds`, at most the smallest class's count."""
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    return min(max_folds, smallest)


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int, seed: int = 0,
    c_grid: tuple[float, ...] = C_GRID, max_folds: int = MAX_FOLDS,
) -> ProbeResult:
    """Fit the reference probe on (train_x, train_y) as the module says; predict test_x."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    train_x = np.asarray(train_x, dtype=np.float64)
    train_y = np.asarray(train_y, dtype=np.int64)
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"the linear probe needs at least 2 classes among its images, but got {len(np.unique(train_y))}")
    scaler = StandardScaler().fit(train_x)
    x = scaler.transform(train_x)
    folds = cv_folds(train_y, max_folds)

    def model(c: float, warm: bool = False) -> LogisticRegression:
        return LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER, warm_start=warm)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if folds >= 2:
            correct = np.zeros(len(c_grid))
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
            for fit_idx, score_idx in splitter.split(x, train_y):
                head = model(c_grid[0], warm=True)  # strong to weak penalty, each from the last
                for i, c in enumerate(c_grid):
                    head.set_params(C=c)
                    head.fit(x[fit_idx], train_y[fit_idx])
                    correct[i] += int((head.predict(x[score_idx]) == train_y[score_idx]).sum())
            best = int(np.argmax(correct))  # first maximum: the strongest penalty among ties
            c, cv_accuracy = c_grid[best], float(correct[best] / len(train_y))
        else:
            c, cv_accuracy = c_grid[len(c_grid) // 2], None
        head = model(c).fit(x, train_y)
    test_x = scaler.transform(np.asarray(test_x, dtype=np.float64))
    probabilities = np.zeros((len(test_x), num_classes))
    probabilities[:, head.classes_] = head.predict_proba(test_x)
    return ProbeResult(
        c, folds if folds >= 2 else 0, cv_accuracy, probabilities.argmax(1).tolist(), probabilities,
        time.perf_counter() - start,
    )


# ------------------------------------------------------------------------ in the bench


def probe_depths(levels: list[int | None], all_levels: bool = True) -> list[int | str | None]:
    """The depths of one cell: the grid's levels (None: the top) and, last, every level at once."""
    from autotransfer.strategies import ALL_LEVELS

    return [*levels, *([ALL_LEVELS] if all_levels else [])]


def depth_name(level: int | str | None) -> str:
    from autotransfer.strategies import ALL_LEVELS

    if level == ALL_LEVELS:
        return "probe-all"
    return "probe-top" if level is None else f"probe-L{level}"


def depth_features(spec, plan, scan, level: int | str | None, split: str):
    """(features, labels) of one split at one depth, from the feature cache (computed and
    cached with the network `plan` truncated at `level` only when not there yet)."""
    from autotransfer.features import cache_path, cached_features, weights_id
    from autotransfer.strategies import ALL_LEVELS, Preprocessing, build_net

    prep = Preprocessing.for_plan(spec, plan)
    wid = weights_id(spec, plan.weights, plan.seed)
    net = None
    if not cache_path(spec.architecture, wid, level, prep, scan.content_hash(split)).is_file():
        depth = replace(plan, strategy="frozen", cut=None, reasons=[],
                        feature_level=None if level in (None, ALL_LEVELS) else level, all_levels=level == ALL_LEVELS)
        net = build_net(spec, depth, len(scan.classes))
    feats, labels, _ = cached_features(net, scan, split, prep, spec.architecture, wid, level, progress=False)
    return feats.numpy(), labels.numpy()


def run_probes(
    scan, plan, levels: list[int | None], heldout: str = "test", log=lambda _: None,
) -> list[dict]:
    """The reference probe at each depth of `levels` and at every level at once, on one
    cell: one bench row each (held-out predictions, accuracy, C, CV accuracy, seconds).

    The features of every depth come from one forward pass over the images where the
    backbone allows (`cache_feature_levels`); each row's seconds are that shared pass plus
    its own cross-validation and fit.
    """
    from autotransfer.backbones import get_backbone
    from autotransfer.features import cache_feature_levels

    spec = get_backbone(plan.backbone)
    start = time.perf_counter()
    labelled = replace(scan, splits={s: r for s, r in scan.splits.items() if s in ("train", "val", heldout)})
    try:
        shared = cache_feature_levels(spec, plan, labelled, [lv for lv in levels], progress=False, all_levels=True)
    except Exception:  # a backbone without feature maps: each depth is computed on its own below
        shared = []
    depths = probe_depths(levels, all_levels=True)
    features_seconds = time.perf_counter() - start
    targets = [r.label for r in scan.splits[heldout]]
    rows = []
    for level in depths:
        row = {"recipe": depth_name(level), "level": level, "title": _title(level)}
        try:
            t0 = time.perf_counter()
            parts = [depth_features(spec, plan, labelled, level, split) for split in ("train", "val") if scan.splits.get(split)]
            test_x, test_y = depth_features(spec, plan, labelled, level, heldout)
            extra = time.perf_counter() - t0 if level not in shared else 0.0  # features not from the shared pass
            x = np.concatenate([p[0] for p in parts])
            y = np.concatenate([p[1] for p in parts])
            result = linear_probe(x, y, test_x, len(scan.classes), plan.seed)
        except Exception as exc:  # one depth that cannot be read must not lose the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {row['recipe']}: FAILED {row['error']}")
            rows.append(row)
            continue
        if list(test_y) != targets:
            raise RuntimeError(f"{row['recipe']}: cached held-out labels do not match the scan's")
        accuracy = float(np.mean(np.asarray(result.predicted) == test_y))
        row.update({
            "C": result.C, "folds": result.folds, "cv_accuracy": result.cv_accuracy,
            "labelled_images": int(len(y)), "features": int(x.shape[1]),
            "heldout_accuracy": accuracy, "heldout_macro_f1": _macro_f1(result.predicted, targets, len(scan.classes)),
            "heldout_predicted": result.predicted,
            "seconds": round(features_seconds + extra + result.seconds, 2),
            "features_seconds": round(features_seconds + extra, 2),
        })
        rows.append(row)
        log(f"  {row['recipe']:<18} held-out {accuracy:.4f}, CV {result.cv_accuracy if result.cv_accuracy is not None else float('nan'):.4f} "
            f"(C {result.C:.2g}, {result.folds}-fold on {len(y)} images), {row['seconds']:.0f}s")
    return rows


def _title(level: int | str | None) -> str:
    from autotransfer.strategies import ALL_LEVELS

    where = ("every feature level and the top, concatenated" if level == ALL_LEVELS
             else "the top" if level is None else f"feature level {level}")
    return f"sklearn linear probe at {where}"


def _macro_f1(predicted: list[int], targets: list[int], num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(targets, predicted, labels=list(range(num_classes)), average="macro", zero_division=0))
