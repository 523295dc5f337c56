"""LogME and leave-one-out k-NN against cases that can be checked by hand."""

import math

import numpy as np
import pytest

from autotransfer.transferability import constant_logme, knn_accuracy, logme, majority_accuracy


def _clusters(n_per_class: int = 30, classes: int = 3, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    features = rng.normal(size=(labels.size, dim))
    features[np.arange(labels.size), labels] += 6.0  # each class far out along its own axis
    return features, labels


def _exact_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y | 0, I/beta + F F^T/alpha) / n, straight from the definition."""
    n = y.size
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y))) / n


@pytest.mark.parametrize("dim", [3, 40])  # fewer and more dimensions than samples
def test_logme_is_the_maximised_evidence(dim: int) -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(25, dim))
    y = (f[:, 0] + 0.5 * rng.normal(size=25) > 0).astype(int)
    grid = np.logspace(-3, 3, 61)
    best = [
        max(_exact_log_evidence(f, (y == c).astype(float), a, b) for a in grid for b in grid)
        for c in (0, 1)
    ]
    # the fixed point finds the maximum the grid brackets, for every width of F
    assert logme(f, y) == pytest.approx(np.mean(best), abs=2e-3)


def test_logme_separable_beats_random_labels_and_baseline() -> None:
    features, labels = _clusters()
    shuffled = np.random.default_rng(0).permutation(labels)
    assert logme(features, labels) > constant_logme(labels) + 0.3
    assert logme(features, labels) > logme(features, shuffled) + 0.3
    assert logme(features, shuffled) < constant_logme(shuffled) + 0.05  # noise explains nothing


def test_constant_logme_is_logme_of_ones() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert constant_logme(labels) == pytest.approx(logme(np.ones((6, 1)), labels))


def test_knn_by_hand() -> None:
    f = np.array([[10.0, 0.0], [10.0, 1.0], [0.0, 10.0], [1.0, 10.0]])
    assert knn_accuracy(f, np.array([0, 0, 1, 1]), k=1) == (1.0, 1.0)
    # every point's nearest neighbour carries the other label
    assert knn_accuracy(f, np.array([0, 1, 0, 1]), k=1) == (0.0, 0.0)


def test_knn_separable_vs_random() -> None:
    features, labels = _clusters()
    assert knn_accuracy(features, labels) == (1.0, 1.0)
    shuffled = np.random.default_rng(0).permutation(labels)
    accuracy, balanced = knn_accuracy(features, shuffled)
    assert accuracy < 0.6 and balanced < 0.6  # chance is 1/3


def test_knn_k_larger_than_data_is_clamped() -> None:
    f = np.array([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0]])
    accuracy, _ = knn_accuracy(f, np.array([0, 0, 1]), k=50)
    assert 0.0 <= accuracy <= 1.0


def test_majority_accuracy() -> None:
    assert majority_accuracy(np.array([0, 0, 0, 1])) == 0.75
    assert majority_accuracy(np.array([2, 1])) == 0.5


def test_too_few_samples() -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        logme(np.ones((1, 3)), np.array([0]))
    with pytest.raises(ValueError, match="at least 2"):
        knn_accuracy(np.ones((1, 3)), np.array([0]))
