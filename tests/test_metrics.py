import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from autotransfer.metrics import balanced_accuracy, balanced_accuracy_gap_se, classification_report


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


def test_gap_standard_error_is_zero_for_models_that_agree_on_every_image() -> None:
    targets = [0, 0, 1, 1, 1]
    assert balanced_accuracy_gap_se([0, 1, 1, 1, 0], [0, 1, 1, 1, 0], targets) == 0.0


def test_gap_standard_error_matches_a_stratified_bootstrap() -> None:
    """The closed form against resampling each class's images with replacement."""
    rng = np.random.default_rng(0)
    targets = np.array([0] * 40 + [1] * 120 + [2] * 60)
    a = np.where(rng.random(targets.size) < 0.8, targets, (targets + 1) % 3)
    b = np.where(rng.random(targets.size) < 0.7, targets, (targets + 2) % 3)
    gaps = []
    for _ in range(4000):
        idx = np.concatenate([rng.choice(np.flatnonzero(targets == c), (targets == c).sum()) for c in range(3)])
        gaps.append(balanced_accuracy_score(targets[idx], a[idx]) - balanced_accuracy_score(targets[idx], b[idx]))
    se = balanced_accuracy_gap_se(a.tolist(), b.tolist(), targets.tolist())
    assert se == pytest.approx(np.std(gaps), rel=0.08)


def test_gap_standard_error_is_smaller_when_the_models_disagree_less() -> None:
    """Same 3-image lead: three extra images right is clearer than 20 gained and 17 lost."""
    targets = [0] * 50 + [1] * 50
    rule = [t if i < 80 else 1 - t for i, t in enumerate(targets)]
    close = [t if i < 83 else 1 - t for i, t in enumerate(targets)]
    scattered = [t if i >= 17 else 1 - t for i, t in enumerate(targets)]
    assert balanced_accuracy_gap_se(close, rule, targets) < balanced_accuracy_gap_se(scattered, rule, targets) / 2


def test_gap_standard_error_refuses_predictions_of_different_images() -> None:
    with pytest.raises(ValueError, match="same images"):
        balanced_accuracy_gap_se([0, 1], [0, 1, 1], [0, 1])
