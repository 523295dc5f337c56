"""The every-level probe, two ways on the same cached features and the same `fit_probe`:
each feature standardised (scikit-learn's StandardScaler: a level weighs by its width,
the 1,280-wide top dominates) vs the product's per-level norm (`MultiLevelNet`: each of
the 6 levels scaled to the same mean norm, LEVEL_NORM). Cross-validated on the cell's
training images, scored on its held-out split (test/, else val/).

    AUTOTRANSFER_CACHE=CELL/cache python benchmarks/bench_level_scaling.py DATA PER_CLASS SEED
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autotransfer.backbones import get_backbone
from autotransfer.bench import subsample
from autotransfer.data import scan_folder
from autotransfer.plan import Plan
from autotransfer.probe import fit_probe
from autotransfer.references import depth_features
from autotransfer.strategies import ALL_LEVELS, build_net


def main(data: str, per_class: int, seed: int) -> None:
    scan = scan_folder(data)
    held = "test" if scan.splits.get("test") else "val"
    cell = subsample(scan, per_class, seed)
    spec = get_backbone("efficientnet_lite0")
    plan = Plan("efficientnet_lite0", image_size=128, seed=seed)
    x_train, y_train = depth_features(spec, plan, cell, ALL_LEVELS, "train")
    x_held, y_held = depth_features(spec, plan, cell, ALL_LEVELS, held)
    net = build_net(spec, replace(plan, all_levels=True), len(cell.classes))
    net.set_standardisation(torch.from_numpy(x_train))  # the product's own scaling: MultiLevelNet's
    mean, per_level = net.classifier[0].mean.numpy(), net.classifier[0].scale.numpy()
    std = x_train.std(0)
    per_feature = np.where(std > 1e-6, 1 / np.maximum(std, 1e-6), 0.0)  # what StandardScaler does

    for name, scale in [("per-feature", per_feature), ("per-level", per_level)]:
        fit = fit_probe(torch.tensor((x_train - mean) * scale).float(), torch.tensor(y_train),
                        int(y_train.max()) + 1, seed=seed, standardise=False)
        held_in = torch.tensor((x_held - mean) * scale).float()
        logits = held_in @ torch.as_tensor(fit.weight).float().T + torch.as_tensor(fit.bias).float()
        accuracy = float((logits.argmax(1) == torch.tensor(y_held)).float().mean())
        print(f"{Path(data).name} {per_class}/class seed {seed} {name}: C {fit.C:g}, "
              f"CV balanced accuracy {fit.cv_balanced_accuracy:.3f}, held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
