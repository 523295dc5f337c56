"""The every-level probe, two ways on the same cached features and the same `fit_probe`:
each feature standardised (scikit-learn's StandardScaler: a level weighs by its width,
the 1,280-wide top dominates) vs the product's per-level norm (`MultiLevelNet`: each of
the 6 levels scaled to the same mean norm, LEVEL_NORM). Cross-validated on the cell's
training images, scored on its held-out split (test/, else val/).

    AUTOTRANSFER_CACHE=CELL/cache python benchmarks/bench_level_scaling.py DATA PER_CLASS SEED
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from autotransfer.backbones import get_backbone
from autotransfer.bench import subsample
from autotransfer.data import scan_folder
from autotransfer.plan import Plan
from autotransfer.probe import fit_probe
from autotransfer.references import depth_features
from autotransfer.strategies import ALL_LEVELS, LEVEL_NORM

LEVEL_DIMS = [16, 24, 40, 112, 320, 1280]  # efficientnet_lite0: feature_info channels, then the top


def main(data: str, per_class: int, seed: int) -> None:
    scan = scan_folder(data)
    held = "test" if scan.splits.get("test") else "val"
    cell = subsample(scan, per_class, seed)
    spec = get_backbone("efficientnet_lite0")
    plan = Plan("efficientnet_lite0", image_size=128, seed=seed)
    x_train, y_train = depth_features(spec, plan, cell, ALL_LEVELS, "train")
    x_held, y_held = depth_features(spec, plan, cell, ALL_LEVELS, held)
    mean, std = x_train.mean(0), x_train.std(0)
    varying = std > 1e-6
    per_level = np.concatenate([np.full(d, LEVEL_NORM / max(1, int(alive.sum())) ** 0.5)
                                for d, alive in zip(LEVEL_DIMS, np.split(varying, np.cumsum(LEVEL_DIMS)[:-1]))])

    def standardised(x: np.ndarray) -> np.ndarray:
        return np.where(varying, (x - mean) / np.maximum(std, 1e-6), 0.0)

    for name, scale in [("per-feature", 1.0), ("per-level", per_level)]:
        fit = fit_probe(torch.tensor(standardised(x_train) * scale).float(), torch.tensor(y_train),
                        int(y_train.max()) + 1, seed=seed, standardise=False)
        logits = torch.tensor(standardised(x_held) * scale).float() @ torch.as_tensor(fit.weight).float().T + torch.as_tensor(fit.bias).float()
        accuracy = float((logits.argmax(1) == torch.tensor(y_held)).float().mean())
        print(f"{Path(data).name} {per_class}/class seed {seed} {name}: C {fit.C:g}, "
              f"CV balanced accuracy {fit.cv_balanced_accuracy:.3f}, held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
