import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from autotransfer.metrics import balanced_accuracy, classification_report


def _logits(preds: list[int], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), classes).float()


def test_balanced_accuracy_matches_scikit_learn_on_an_imbalanced_split() -> None:
    targets = [0] * 30 + [1] * 90
    preds = [0] * 20 + [1] * 10 + [1] * 88 + [0] * 2  # the majority class guessed more
    got = balanced_accuracy(_logits(preds, 2), torch.tensor(targets))
    assert got == pytest.approx(balanced_accuracy_score(targets, preds))
    assert got < (sum(p == t for p, t in zip(preds, targets)) / len(targets))


def test_balanced_accuracy_ignores_classes_absent_from_the_targets() -> None:
    """A class the split lacks has no recall: it must not count as 0 (torchmetrics' macro
    average does count a predicted-but-absent class)."""
    targets = torch.tensor([0, 0, 1, 0, 0])
    preds = [0, 0, 1, 1, 2]
    assert balanced_accuracy(_logits(preds, 4), targets) == pytest.approx((0.5 + 1.0) / 2)


def test_report_carries_balanced_accuracy_beside_accuracy() -> None:
    targets = torch.tensor([0, 0, 0, 1])
    report = classification_report(_logits([0, 0, 0, 0], 2), targets, ["a", "b"])
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["balanced_accuracy"] == pytest.approx(0.5)
