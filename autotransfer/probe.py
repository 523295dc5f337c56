"""The linear probe: multinomial logistic regression on standardised features, its L2
strength chosen by stratified k-fold cross-validation, then refit on every image given.

This is the standard linear-probe protocol (CLIP, SimCLR, VTAB): a head trained to
convergence with a tuned penalty, not a fixed number of SGD epochs with a fixed weight
decay. It is the head of every frozen Plan and the LP stage of every LP-FT. The
out-of-fold predictions it returns let the selector compare depths, backbones and
fine-tuning on the same images, with a paired standard error.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from autotransfer.metrics import balanced_accuracy_of

# Inverse L2 strength (scikit-learn's C, loss summed over images) on standardised
# features: from a penalty that keeps the head near zero to one that barely regularises.
# Half-decade steps; the path is walked strong-to-weak with warm starts.
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 1, 11))
MAX_FOLDS = 5
MAX_ITER = 500
# Relative tolerance of L-BFGS. 1e-3 halves the time on 1,800 images x 1,280 features,
# but cost up to 2 points against LogisticRegressionCV on tests/test_probe.py's sets.
TOL = 1e-4
LOG_ZERO = -1e4  # log-probability of a class a fold's head never saw
BLOCK_ROWS = 8192  # rows standardised at a time (a float64 block of 1,280 features: 80 MB)
# Images the search over C cross-validates on. Beyond, C is chosen on a stratified sample
# of this many and only the k folds and the final head see every image, at that one C:
# the probe's cost then grows linearly with the images (issue 19: 11 values of C x 5 folds
# on 30,000 images made a frozen fit 3.6x slower per image than on 10,000).
SELECT_MAX = 10_000


@dataclass
class ProbeFit:
    """A fitted probe: the head on raw features (standardisation folded in) and what the
    cross-validation said about it."""

    C: float
    weight: torch.Tensor  # classes x features, on raw (unstandardised) features
    bias: torch.Tensor
    folds: int
    cv_logits: torch.Tensor  # out-of-fold log-probabilities of every image, at C
    cv_balanced_accuracy: float
    cv_accuracy: float
    cv_scores: dict[float, float]  # C -> mean out-of-fold balanced accuracy (on the sample past SELECT_MAX)
    members: list[str] = field(default_factory=list)  # a mean of probes (`mean_of_best`): which
    member_scales: list[float] = field(default_factory=list)  # and each one's logit scale


def cv_log_loss(log_proba: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean log-loss of out-of-fold log-probabilities (a ProbeFit's cv_logits), each
    image's capped at 20 (a class a fold never saw)."""
    picked = log_proba.float()[torch.arange(len(labels)), labels.long()]
    return float(-picked.clamp(min=-20.0).mean())


# The logit scales `logit_scale` chooses among (Guo et al. 2017's temperature, inverted).
LOGIT_SCALES = np.geomspace(0.02, 50, 81)


def logit_scale(cv_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The factor on a probe's logits with the lowest out-of-fold log-loss: its
    temperature, as a scale. A probe's logits grow with its C (the least regularised of
    several probes has the largest), so members are put on one footing before averaging."""
    losses = [float(torch.nn.functional.cross_entropy(cv_logits.float() * scale, labels.long())) for scale in LOGIT_SCALES]
    return float(LOGIT_SCALES[int(np.argmin(losses))])


def mean_of_best(fits: dict[str, ProbeFit], labels: torch.Tensor, k: int) -> ProbeFit:
    """The k best probes by CV (balanced accuracy, ties to the lower log-loss) as one: their
    logits, each scaled to its lowest out-of-fold log-loss (`logit_scale`), averaged,
    which for heads on the same features is one linear layer. Its CV scores are those of
    the averaged out-of-fold log-probabilities, on the same folds.

    Averaging the best few frozen depths beat picking the best one (selection by CV on
    few images is noisy): benchmarks/results/frozen_selection.md. Unscaled, the member of
    the largest logits (often the least regularised, C 10-300x the others') decided alone
    where the members disagreed: scaling gained on average over 4 sets, most on
    hymenoptera 10/class (frozen_selection_scaled.md)."""
    ranked = sorted(fits, key=lambda name: (-fits[name].cv_balanced_accuracy, cv_log_loss(fits[name].cv_logits, labels)))[:k]
    chosen = [fits[name] for name in ranked]
    scales = [logit_scale(f.cv_logits, labels) for f in chosen]
    cv_logits = torch.log_softmax(torch.stack([s * f.cv_logits.float() for s, f in zip(scales, chosen)]).mean(0), dim=1)
    predicted = cv_logits.argmax(1)
    return ProbeFit(
        C=chosen[0].C,
        weight=torch.stack([s * f.weight for s, f in zip(scales, chosen)]).mean(0),
        bias=torch.stack([s * f.bias for s, f in zip(scales, chosen)]).mean(0),
        folds=chosen[0].folds,
        cv_logits=cv_logits,
        cv_balanced_accuracy=balanced_accuracy_of(predicted.tolist(), labels.tolist()),
        cv_accuracy=float((predicted == labels).float().mean()),
        cv_scores=chosen[0].cv_scores,
        members=ranked,
        member_scales=[round(s, 4) for s in scales],
    )



def folds_for(labels: np.ndarray, max_folds: int = MAX_FOLDS) -> int:
    """As many folds as the smallest class allows (each fold holds one of its images),
    at most `max_folds`, at least 2."""
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    return max(2, min(max_folds, smallest))


def cv_splits(labels: np.ndarray, seed: int, max_folds: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified folds (train indices, held-out indices) of `labels`: the same for the
    probe and for cross-validated fine-tuning of the same images and seed, so their
    out-of-fold predictions compare fold by fold."""
    splitter = StratifiedKFold(n_splits=folds_for(labels, max_folds), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a class smaller than the folds
        return list(splitter.split(labels, labels))


def _model(C: float, class_weighting: bool) -> LogisticRegression:
    return LogisticRegression(
        C=C, max_iter=MAX_ITER, tol=TOL, warm_start=True,
        class_weight="balanced" if class_weighting else None,
    )


def _fit_path(
    x: np.ndarray, y: np.ndarray, class_weighting: bool, grid: tuple[float, ...] = C_GRID,
    start: LogisticRegression | None = None,
) -> list[LogisticRegression]:
    """One model per C of `grid`, strongest penalty first, each warm-started from the last
    (the first from `start` when it has the same classes)."""
    model, path = _model(grid[0], class_weighting), []
    if start is not None and np.array_equal(start.classes_, np.unique(y)):
        model.coef_, model.intercept_ = start.coef_.copy(), start.intercept_.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in grid:
            model.set_params(C=C)
            model.fit(x, y)
            path.append(_snapshot(model))
    return path


def _out_of_fold(
    z: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]], grid: tuple[float, ...],
    num_classes: int, class_weighting: bool, start: LogisticRegression | None = None,
) -> np.ndarray:
    """Out-of-fold log-probabilities (len(grid) x images x classes) of the path over `grid`."""
    log_proba = np.zeros((len(grid), len(y), num_classes), dtype=np.float32)
    for train_idx, test_idx in splits:
        for i, model in enumerate(_fit_path(z[train_idx], y[train_idx], class_weighting, grid, start)):
            log_proba[i, test_idx] = LOG_ZERO
            with np.errstate(divide="ignore"):  # a certain prediction's log(0) is -inf: capped in `_best`
                log_proba[i][np.ix_(test_idx, model.classes_)] = model.predict_log_proba(z[test_idx])
    return log_proba


def _scores(log_proba: np.ndarray, y: np.ndarray) -> list[float]:
    return [balanced_accuracy_of(p.tolist(), y.tolist()) for p in log_proba.argmax(2)]


def _best(scores: list[float], log_proba: np.ndarray, y: np.ndarray) -> int:
    """The best score; ties (common on few images) go to the lower out-of-fold log-loss:
    the strongest penalty among them would shrink the head to a scale-less one that only
    its bias moves, useless to start fine-tuning from."""
    losses = -np.maximum(log_proba[:, np.arange(len(y)), y], -20.0).mean(1)
    return max(range(len(scores)), key=lambda i: (scores[i], -losses[i]))


def stratified_sample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of about `size` images drawn class by class in proportion (at least
    MAX_FOLDS of a class, or all it has), the same for the same labels and seed."""
    rng = np.random.default_rng(seed)
    fraction = size / len(labels)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(len(members), max(MAX_FOLDS, round(fraction * len(members))))
        picked.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(picked))


def _snapshot(model: LogisticRegression) -> LogisticRegression:
    copy = LogisticRegression(**model.get_params())
    copy.coef_, copy.intercept_, copy.classes_ = model.coef_.copy(), model.intercept_.copy(), model.classes_
    return copy


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, class_weighting: bool = False,
    seed: int = 0, max_folds: int = MAX_FOLDS, standardise: bool = True,
    fit_on: torch.Tensor | None = None,
) -> ProbeFit:
    """Cross-validate C over C_GRID on all of (features, labels), then fit the head at the
    C with the best mean out-of-fold balanced accuracy (ties: the lower log-loss) on the
    images `fit_on` selects (a boolean mask; default all of them). Past SELECT_MAX images
    C is chosen on a stratified sample; the out-of-fold predictions still cover every image.

    `standardise` False: the features come standardised already (a MultiLevelNet's
    per-level scaling, which per-feature standardisation would undo).

    The same arguments give the same fit, remembered for the process's last MEMO_SIZE
    ones: an "ensemble" trial's members are the probes the search's other frozen trials
    fit on the same features, folds and seed.
    """
    if features.dtype not in (torch.float32, torch.float64):
        features = features.float()
    x = features.detach().cpu().numpy()  # no copy: features memory-mapped from the cache stay on disk
    y = labels.numpy().astype(int)
    keep = np.ones(len(y), dtype=bool) if fit_on is None else fit_on.numpy().astype(bool)
    settings = (x.shape, str(x.dtype), num_classes, class_weighting, seed, max_folds, standardise,
                C_GRID, MAX_ITER, TOL, SELECT_MAX, BLOCK_ROWS)  # the module's settings too: tests change them
    digest = hashlib.sha1(repr(settings).encode())
    for array in (x, y, keep):
        digest.update(np.ascontiguousarray(array).data)
    key = digest.hexdigest()
    if key not in _MEMO:
        _MEMO[key] = _fit(x, y, keep, num_classes, class_weighting, seed, max_folds, standardise)
        while len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(key)
    return copy.deepcopy(_MEMO[key])  # callers may change what they get, never the memo


MEMO_SIZE = 32
_MEMO: OrderedDict[str, ProbeFit] = OrderedDict()


def _fit(
    x: np.ndarray, y: np.ndarray, keep: np.ndarray, num_classes: int, class_weighting: bool,
    seed: int, max_folds: int, standardise: bool,
) -> ProbeFit:
    mean, scale = _moments(x, keep)
    if not standardise:
        mean, scale = np.zeros_like(mean), np.ones_like(scale)
    scale[scale < 1e-12] = 1.0  # constant features: left at zero after centring
    basis = None
    if len(x) < x.shape[1]:  # fewer images than features: fit in the span of the images
        # (exact for an L2 penalty: the optimum lies there), many times faster
        z = (x.astype(np.float64) - mean) / scale
        basis = np.linalg.svd(z - z.mean(0), full_matrices=False)[2].T
        z = (z @ basis).astype(np.float32)
    else:  # scikit-learn keeps float32: half the memory traffic of each L-BFGS step
        z = _standardised(x, mean, scale)
    splits = cv_splits(y, seed, max_folds)
    start = None
    if len(y) > SELECT_MAX:  # C from a sample, then the folds of every image at that C alone
        sample = stratified_sample(y, SELECT_MAX, seed)
        sample_proba = _out_of_fold(z[sample], y[sample], cv_splits(y[sample], seed, max_folds),
                                    C_GRID, num_classes, class_weighting)
        sample_scores = _scores(sample_proba, y[sample])
        best_C = C_GRID[_best(sample_scores, sample_proba, y[sample])]
        start = _fit_path(z[sample], y[sample], class_weighting, (best_C,))[0]
        grid = (best_C,)
    else:
        grid = C_GRID
    log_proba = _out_of_fold(z, y, splits, grid, num_classes, class_weighting, start)
    scores = _scores(log_proba, y)
    best = _best(scores, log_proba, y)
    cv_scores = dict(zip(C_GRID, scores if start is None else sample_scores))
    predicted = log_proba.argmax(2)
    final = _fit_path(z if keep.all() else z[keep], y[keep], class_weighting, (grid[best],), start)[0]
    weight, bias = _full_classes(final, num_classes)
    if basis is not None:
        weight = weight @ basis.T
    weight = weight / scale  # fold the standardisation into the layer
    bias = bias - weight @ mean
    return ProbeFit(
        C=grid[best],
        weight=torch.tensor(weight, dtype=torch.float32),
        bias=torch.tensor(bias, dtype=torch.float32),
        folds=len(splits),
        cv_logits=torch.from_numpy(log_proba[best]),
        cv_balanced_accuracy=scores[best],
        cv_accuracy=float((predicted[best] == y).mean()),
        cv_scores=cv_scores,
    )


def _moments(x: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (float64, two passes) of the rows `keep`
    selects, a block of rows at a time: no float64 copy of all the features."""
    def blocks():
        for start in range(0, len(x), BLOCK_ROWS):
            yield np.asarray(x[start:start + BLOCK_ROWS], dtype=np.float64)[keep[start:start + BLOCK_ROWS]]
    n = max(int(keep.sum()), 1)
    mean = sum((b.sum(0) for b in blocks()), np.zeros(x.shape[1])) / n
    var = sum((np.square(b - mean).sum(0) for b in blocks()), np.zeros(x.shape[1])) / n
    return mean, np.sqrt(var)


def _standardised(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(x - mean) / scale as float32, computed in float64 a block of rows at a time."""
    z = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), BLOCK_ROWS):
        z[start:start + BLOCK_ROWS] = (np.asarray(x[start:start + BLOCK_ROWS], dtype=np.float64) - mean) / scale
    return z


def _full_classes(model: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) with one row per class of the dataset. Binary problems have one
    logit in scikit-learn; as two softmax logits it is (-w/2, +w/2). A class absent from
    the images gets a logit that never wins."""
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2 and coef.shape[0] == 1:
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, LOG_ZERO)
    weight[model.classes_] = coef
    bias[model.classes_] = intercept
    return weight, bias
