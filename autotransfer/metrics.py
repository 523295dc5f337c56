"""Classification metrics from torchmetrics, as plain JSON-able dicts."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean recall over the classes present (scikit-learn's balanced_accuracy_score).

    What autotransfer selects on: unlike accuracy it does not move with the class mix,
    which differs between val, test and deployment (pneumoniamnist: 1:2.9 in val, 1:1.7
    in test), and it equals accuracy when the classes are balanced.
    """
    return balanced_accuracy_of(logits.argmax(dim=1), targets, logits.shape[1])


def balanced_accuracy_of(predicted, targets, num_classes: int | None = None) -> float:
    """balanced_accuracy of class predictions (tensors or lists) rather than logits."""
    p, t = torch.as_tensor(predicted, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)
    if t.numel() == 0:
        return float("nan")
    n = num_classes or int(max(p.max(), t.max())) + 1
    per_class = multiclass_accuracy(p, t, num_classes=n, average="none")
    return float(per_class[torch.bincount(t, minlength=n) > 0].mean())


def classification_report(
    logits: torch.Tensor, targets: torch.Tensor, classes: list[str]
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, cross-entropy, per-class accuracy (recall), confusion matrix."""
    n = len(classes)
    preds = logits.argmax(dim=1)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets) if targets.numel() else torch.tensor(float("nan"))
    per_class = multiclass_accuracy(preds, targets, num_classes=n, average="none")
    counts = torch.bincount(targets, minlength=n)
    return {
        "n": int(targets.numel()),
        "accuracy": float(multiclass_accuracy(preds, targets, num_classes=n, average="micro")),
        "balanced_accuracy": balanced_accuracy(logits, targets),
        "macro_f1": float(multiclass_f1_score(preds, targets, num_classes=n, average="macro")),
        "loss": float(loss),  # breaks accuracy ties: a proper score, finer than a count
        "per_class_accuracy": {
            name: (float(acc) if counts[i] > 0 else None)
            for i, (name, acc) in enumerate(zip(classes, per_class))
        },
        "confusion_matrix": multiclass_confusion_matrix(preds, targets, num_classes=n).tolist(),
    }


def balanced_accuracy_gap_se(predicted_a: list[int], predicted_b: list[int], targets: list[int]) -> float:
    """Standard error of balanced_accuracy(a) - balanced_accuracy(b) on the same images.

    Paired: an image both get right, or both wrong, adds no noise, so the gap between two
    similar models is judged by the images they disagree on. Balanced accuracy is the mean
    over classes of per-class means, so the variance is (1/C^2) * sum_c var_c(d) / n_c for
    d = correct_a - correct_b. 0 when a and b never disagree.
    """
    a, b, t = (torch.as_tensor(x, dtype=torch.long) for x in (predicted_a, predicted_b, targets))
    if not (a.shape == b.shape == t.shape) or t.numel() == 0:
        raise ValueError(f"need predictions for the same images, but got {a.numel()}, {b.numel()} and {t.numel()} targets")
    gap = (a == t).double() - (b == t).double()
    classes = t.unique()
    variance = sum(
        float(gap[t == c].var()) / int((t == c).sum()) for c in classes if int((t == c).sum()) > 1
    )
    return variance ** 0.5 / len(classes)


def accuracy_gap_se(predicted_a: list[int], predicted_b: list[int], targets: list[int]) -> float:
    """Standard error of accuracy(a) - accuracy(b) on the same images (paired).

    The SE of the mean of d = correct_a - correct_b over the images (sample standard
    deviation / sqrt(n)): images both get right, or both wrong, add no noise. 0 when a
    and b never disagree, or on a single image.
    """
    a, b, t = (torch.as_tensor(x, dtype=torch.long) for x in (predicted_a, predicted_b, targets))
    if not (a.shape == b.shape == t.shape) or t.numel() == 0:
        raise ValueError(f"need predictions for the same images, but got {a.numel()}, {b.numel()} and {t.numel()} targets")
    if t.numel() < 2:
        return 0.0
    gap = (a == t).double() - (b == t).double()
    return float(gap.std() / t.numel() ** 0.5)
