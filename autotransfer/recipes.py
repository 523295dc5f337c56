"""The recipes `autotransfer bench` compares: what a user would otherwise pick, and the
per-depth grid that defines the best reachable accuracy.

Each recipe is a Plan (so it runs through the same `train.fit` as everything else) plus
the words and the depth coordinate the report needs. Depth is the number of timm coarse
groups frozen below the cut: a frozen extractor at a feature level freezes every group of
the truncated network; `partial` with cut c freezes c groups; `full` freezes none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autotransfer.plan import Plan
from autotransfer.strategies import depth_of

FIXED = "fixed"  # a recipe users pick by hand
GRID = "grid"  # one point of the per-depth grid
AUTO = "auto"  # autotransfer's own choice
REFERENCE = "reference"  # the independent scikit-learn linear probe (`autotransfer.references`)
PEER = "peer"  # another library's own training (`autotransfer.peers`)


@dataclass(frozen=True)
class Recipe:
    name: str  # short key, e.g. "keras-two-stage", "frozen-L2", "partial-cut4"
    kind: str  # FIXED, GRID or AUTO
    family: str  # "frozen" or "finetune": which layer-transfer curve a grid point is on
    title: str  # what it is, in words (the report's legend)
    plan: Plan | None  # None for AUTO: the selector decides
    depth: float | None = None  # groups frozen below the cut (curves); frozen top = groups + 1


def fixed_recipes(base: Plan) -> list[Recipe]:
    """The recipes from the guides, with the same epochs, image size and seed as `base`.

    fastai's fine_tune is not imitated here: the bench runs the real library beside these
    (`autotransfer.peers`)."""
    frozen = replace(base, strategy="frozen", cut=None, feature_level=None, all_levels=False, reasons=[])
    full = replace(frozen, strategy="full")
    return [
        Recipe("frozen-top", FIXED, "frozen", "frozen extractor + linear head on the top features", frozen),
        Recipe(
            "keras-two-stage", FIXED, "finetune",
            "Keras guide: train the head, then unfreeze everything at a low lr "
            "(backbone lr = head lr x 0.01, BN kept in inference mode)",
            replace(full, backbone_lr_ratio=0.01, bn_mode="frozen"),
        ),
        Recipe(
            "plain-full-ft", FIXED, "finetune",
            "plain fine-tuning (PyTorch tutorial): random head, everything trained from the "
            "first step (backbone lr x 0.1), BatchNorm training; no linear probe",
            replace(full, lp_init=False, backbone_lr_ratio=0.1, bn_mode="train"),
        ),
    ]


def grid_recipes(base: Plan, levels: list[int | None] | None = None, cuts: list[int] | None = None) -> list[Recipe]:
    """Frozen at each feature level (and the top), and fine-tuned from each cut (and full).

    `levels` None: every timm feature level plus the top; `cuts` None: every cut from 1 to
    groups - 1. Fine-tuned points are LP-FT with `base`'s hyperparameters (what `partial`
    and `full` do by default); cut 0 is `full`.
    """
    groups, n_levels = depth_of(base.backbone, None)
    levels = [*range(n_levels), None] if levels is None else levels
    cuts = list(range(1, groups)) if cuts is None else cuts
    bad = [c for c in cuts if not 0 <= c < groups]
    if bad:
        raise ValueError(f"cuts must be between 0 and {groups - 1} for {base.backbone}, but got {bad}")
    frozen = replace(base, strategy="frozen", cut=None, feature_level=None, all_levels=False, reasons=[])
    recipes = []
    for level in levels:
        if level is None:
            recipes.append(Recipe("frozen-top", GRID, "frozen", "frozen extractor at the top", frozen, groups + 1))
        else:
            depth = depth_of(base.backbone, level)[0]
            recipes.append(Recipe(
                f"frozen-L{level}", GRID, "frozen",
                f"frozen extractor at feature level {level} ({depth} groups)",
                replace(frozen, feature_level=level), depth,
            ))
    for cut in sorted(set(cuts) - {0}):
        recipes.append(Recipe(
            f"partial-cut{cut}", GRID, "finetune",
            f"LP-FT of the top {groups - cut} of {groups} groups (cut {cut})",
            replace(frozen, strategy="partial", cut=cut), cut,
        ))
    recipes.append(Recipe("full", GRID, "finetune", "LP-FT of every group (cut 0)", replace(frozen, strategy="full"), 0))
    return recipes


def auto_recipe() -> Recipe:
    return Recipe("autotransfer", AUTO, "auto", "autotransfer: profile -> rules -> search -> winner on val", None)
