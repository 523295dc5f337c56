"""How well frozen features suit the labels, from features alone (no training).

- LogME (You et al. 2021): the log marginal evidence per sample of a Bayesian linear
  model from features to each one-hot label column, maximised over its two precisions
  by MacKay's fixed-point iteration after one eigendecomposition; averaged over classes.
- Leave-one-out k-NN accuracy on centred, L2-normalised features (cosine similarity).

Neither number means much alone, so each comes with a trivial baseline in the same units:
the LogME of a constant feature (what the class frequencies alone explain) and the
majority-class accuracy (balanced accuracy: 1 / classes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_LOG_2PI = math.log(2.0 * math.pi)


def _as_float64(features: torch.Tensor | np.ndarray) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
    return np.asarray(array, dtype=np.float64)


def _as_labels(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    return np.asarray(array, dtype=np.int64).reshape(-1)


def _spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigma, U): squared singular values > 0 of f and its left singular vectors."""
    n, d = f.shape
    if n <= d:
        sigma, u = np.linalg.eigh(f @ f.T)
    else:
        sigma, v = np.linalg.eigh(f.T @ f)
    keep = sigma > max(sigma.max(initial=0.0), 1e-300) * 1e-10
    sigma = sigma[keep]
    if n <= d:
        return sigma, u[:, keep]
    return sigma, (f @ v[:, keep]) / np.sqrt(sigma)


def _evidence(y: np.ndarray, sigma: np.ndarray, u: np.ndarray, d: int) -> float:
    """Max log evidence / n of y ~ N(F w, 1/beta), w ~ N(0, 1/alpha) over alpha, beta."""
    n = y.shape[0]
    x2 = (u.T @ y) ** 2  # y's energy along each singular direction
    rest = max(float(y @ y - x2.sum()), 0.0)  # energy outside the span of F
    k = sigma.shape[0]
    alpha, beta = 1.0, 1.0
    for _ in range(50):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())  # effective number of parameters
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())  # |w|^2 at the posterior mean
        res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + rest  # |y - F w|^2
        alpha = gamma / (m2 + 1e-10)
        beta = max(n - gamma, 1e-10) / (res2 + 1e-10)
        if abs(alpha / beta - t) <= 1e-4 * t:
            break
    t = alpha / beta
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + rest
    # log|A|, A = alpha I + beta F^T F: the d - k zero directions contribute log(alpha) each
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - k) * math.log(alpha)
    evidence = (
        d / 2 * math.log(alpha) + n / 2 * math.log(beta) - log_det / 2
        - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * _LOG_2PI
    )
    return evidence / n


def logme(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """LogME of `features` (n x D) for integer `labels`: higher transfers better.

    Unlike the reference implementation, log|A| also counts the D - rank directions
    the data do not reach, so values stay comparable between depths of different width.
    """
    f, y = _as_float64(features), _as_labels(labels)
    if f.shape[0] != y.shape[0] or f.shape[0] < 2:
        raise ValueError(f"need n >= 2 features and as many labels, but got {f.shape} and {y.shape}")
    sigma, u = _spectrum(f)
    classes = np.unique(y)
    return float(np.mean([_evidence((y == c).astype(np.float64), sigma, u, f.shape[1]) for c in classes]))


def constant_logme(labels: torch.Tensor | np.ndarray) -> float:
    """LogME of a feature that is 1 for every image: the baseline any real feature must beat."""
    y = _as_labels(labels)
    return logme(np.ones((y.shape[0], 1)), y)


def knn_accuracy(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, k: int = 10
) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of leave-one-out k-NN, cosine similarity, weighted votes."""
    f = torch.as_tensor(_as_float64(features), dtype=torch.float32)
    y = torch.as_tensor(_as_labels(labels))
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"k-NN needs at least 2 samples, but got {n}")
    k = max(1, min(k, n - 1))
    f = torch.nn.functional.normalize(f - f.mean(0), dim=1)  # centred: cosine of deviations
    n_classes = int(y.max()) + 1
    predictions = torch.empty(n, dtype=torch.long)
    for start in range(0, n, 1024):  # bounded memory: 1024 x n similarities at a time
        sim = f[start:start + 1024] @ f.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")  # leave the image itself out
        top, index = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], n_classes)
        votes.scatter_add_(1, y[index], (top + 1.0).clamp_min(1e-6))  # weights in (0, 2]
        predictions[start:start + sim.shape[0]] = votes.argmax(1)
    correct = predictions == y
    recalls = [float(correct[y == c].float().mean()) for c in torch.unique(y)]
    return float(correct.float().mean()), float(np.mean(recalls))


def majority_accuracy(labels: torch.Tensor | np.ndarray) -> float:
    """Accuracy of always answering the most frequent class."""
    y = _as_labels(labels)
    return float(np.bincount(y).max() / y.shape[0])
