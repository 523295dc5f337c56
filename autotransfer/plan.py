"""The Plan: one typed, serialisable description of a transfer-learning run.

`plan.json` in, the same run out. Depth has two coordinates, both from timm:
- `cut`: how many of the lowest coarse groups (`group_matcher(coarse=True)`, stem first)
  stay frozen; `frozen` freezes all of them, `full` none;
- `feature_level`: classify from `feature_info[feature_level]` instead of the top,
  dropping the blocks above it (None keeps the whole backbone).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from autotransfer.errors import PlanError

STRATEGIES = ("frozen", "partial", "full")
BN_MODES = ("frozen", "train")
AUGMENTS = ("crop", "strong")  # features.train_transform
ALL_LEVELS_MODES = ("level", "feature", "ensemble")  # train.probe_head
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")  # Lightning's names
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
# What every command uses when no --backbone is given (`fit` without --strategy chooses
# among it and the installed default candidates, this one first).
DEFAULT_BACKBONE = "efficientnet_lite0"
# fit(logger=...): Lightning's loggers, and the package each needs beyond Lightning
LOGGERS = {"csv": (), "tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


# What each numeric field must be, besides finite. Plan checks them all; the CLI's options
# call `check_number` as they are parsed, so both say the same thing. `cut` and
# `feature_level` are checked against the backbone's own range when the network is built
# (strategies.py), which can say what the range is.
LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "image_size": (lambda v: v >= 16, "at least 16 px"),
    "epochs": (lambda v: v >= 0, "at least 0"),  # 0: partial/full keep their linear head
    "lr": (lambda v: v > 0, "positive"),
    "backbone_lr_ratio": (lambda v: v > 0, "positive"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "val_fraction": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    "seed": (lambda v: 0 <= v < 2**32, "between 0 and 2**32 - 1"),  # numpy's seed range
}


def check_number(name: str, value: float | None, label: str | None = None) -> None:
    """PlanError unless `value` suits Plan field `name` (None passes: "not set").

    `label` names the value as the user typed it (`--lr`); the field name otherwise.
    """
    label = label or name
    if value is None:
        return
    if not math.isfinite(value):
        raise PlanError(f"{label} must be a finite number, but got {value}")
    test, expected = LIMITS[name]
    if not test(value):
        raise PlanError(f"{label} must be {expected}, but got {value}")


@dataclass
class Compute:
    """Where and in what precision a Plan trains, not what it trains: Lightning's Trainer
    takes these as they are. More than one device trains with DDP, one process each, and
    the Plan's batch_size stays the batch of one step (each device takes a share), so a
    Plan means the same on one device or eight. Whether this machine has what they name is
    checked when training starts (`train.trainer_devices`)."""

    accelerator: str = "auto"
    devices: int | str = 1  # or "auto": every device of the accelerator
    precision: str = "32"

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise PlanError(f"accelerator must be one of {', '.join(ACCELERATORS)}, but got {self.accelerator!r}")
        if self.devices != "auto" and (not isinstance(self.devices, int) or isinstance(self.devices, bool) or self.devices < 1):
            raise PlanError(f"devices must be a whole number of at least 1 or 'auto', but got {self.devices!r}")
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, but got {self.precision!r}")

    @classmethod
    def parse_devices(cls, text: str) -> int | str:
        """--devices as typed: 'auto' or a count; PlanError naming the option otherwise."""
        value = text.strip()
        try:
            return cls(devices=int(value) if value.isdigit() else value).devices
        except PlanError as exc:
            raise PlanError(f"--{exc}") from None


@dataclass
class Plan:
    backbone: str
    strategy: str = "frozen"
    cut: int | None = None
    feature_level: int | None = None
    # frozen only: classify from every feature level and the top at once, each level's map
    # mean-pooled and standardised, one linear head on them all (Head2Toe, Evci et al. 2022)
    all_levels: bool = False
    # all_levels only: how the head reads every level. One probe on all of them, each
    # feature standardised, then "level": each level scaled to the same norm (a level of
    # 16 features counts as much as one of 1,280), or "feature": left so (the wide top
    # levels dominate: the plain linear-probe protocol); neither wins everywhere
    # (benchmarks/results/level_scaling.md). "ensemble": the mean of the 3 best probes by
    # CV among each level alone, the top and both of those (one linear layer all the same)
    all_levels_mode: str = "level"
    # "ensemble" only: its members are chosen among the feature levels alone, the top and the
    # every-level heads (dominated by the top's 1,280 features) left out. The rules set it far
    # from ImageNet, where the top layers transfer worst (Yosinski et al. 2014), when a level
    # below the top matches the best depth on k-NN: on
    # pneumoniamnist at 10/class it gained 3.8 ± 1.7 held-out points (rules.ENSEMBLE_FAR_REASON).
    ensemble_levels_only: bool = False
    # BatchNorm of the blocks being fine-tuned: "frozen" keeps ImageNet running statistics
    # (eval mode); "train" lets them adapt. Frozen blocks are always in eval mode.
    bn_mode: str = "frozen"
    # fine-tuning augmentation: "crop" (flip + reflect-padded shift) or "strong" (fastai's
    # aug_transforms kind: resized crop, rotation, lighting)
    augment: str = "crop"
    # fine-tuning loss: cross-entropy with label smoothing (Szegedy et al. 2016)
    label_smoothing: float = 0.1
    weights: str = "pretrained"  # "pretrained", "random" or a state-dict file
    image_size: int | None = None  # None: the backbone's pretrained input size
    # Every strategy starts from a linear probe on cached features (its penalty chosen by
    # cross-validation, `autotransfer.probe`); these are the fine-tuning stage's settings.
    epochs: int = 6  # fine-tuning epochs (partial/full)
    lr: float = 1e-3  # head learning rate while fine-tuning
    backbone_lr_ratio: float = 0.3  # backbone lr = lr * ratio (issue 15's LP-FT reference: 3e-4 / 1e-3)
    weight_decay: float = 1e-4
    class_weighting: bool = False  # inverse-frequency loss weights for imbalanced classes
    # partial/full: train the linear head on cached features first (LP-FT). False starts
    # fine-tuning from a random head, as plain fine-tuning does (a baseline for benchmarks).
    lp_init: bool = True
    # When autotransfer drew val from train (no val/ folder): a frozen probe is refit on
    # train and val together after cross-validating on them, and a search's fine-tuned
    # winner is retrained on both for the epoch count that was best on the split
    refit: bool = True
    batch_size: int = 32
    val_fraction: float = 0.2
    seed: int = 0
    reasons: list[str] = field(default_factory=list)
    compute: Compute = field(default_factory=Compute)  # how to run it, not what: `fit --plan` may replace it

    def __post_init__(self) -> None:
        if isinstance(self.compute, dict):  # from plan.json or search.json
            known = [f.name for f in fields(Compute)]
            unknown = sorted(set(self.compute) - set(known))
            if unknown:
                raise PlanError(f"compute has unknown keys {unknown}; known: {known}")
            self.compute = Compute(**self.compute)
        self._check_types()
        if self.strategy not in STRATEGIES:
            raise PlanError(f"strategy must be one of {', '.join(STRATEGIES)}, but got '{self.strategy}'")
        if self.bn_mode not in BN_MODES:
            raise PlanError(f"bn_mode must be one of {', '.join(BN_MODES)}, but got '{self.bn_mode}'")
        if self.all_levels_mode not in ALL_LEVELS_MODES:
            raise PlanError(f"all_levels_mode must be one of {', '.join(ALL_LEVELS_MODES)}, but got '{self.all_levels_mode}'")
        if self.all_levels_mode != "level" and not self.all_levels:
            raise PlanError(f"all_levels_mode '{self.all_levels_mode}' says how every level is read at once; it needs all_levels true")
        if self.augment not in AUGMENTS:
            raise PlanError(f"augment must be one of {', '.join(AUGMENTS)}, but got '{self.augment}'")
        for name in LIMITS:
            check_number(name, getattr(self, name))
        if self.strategy == "partial" and self.cut is None:
            raise PlanError("strategy 'partial' needs a cut: --cut N freezes the N lowest groups")
        if self.strategy != "partial" and self.cut is not None:
            raise PlanError(
                f"--cut {self.cut} only applies to strategy 'partial', not '{self.strategy}'; "
                "use --feature-level to classify from an earlier block"
            )
        if self.all_levels and (self.strategy != "frozen" or self.feature_level is not None):
            raise PlanError(
                f"all_levels reads every feature level of a frozen backbone; it needs strategy 'frozen' "
                f"and no feature_level, but got strategy '{self.strategy}', feature_level {self.feature_level}"
            )
        if not self.lp_init and (self.strategy == "frozen" or self.epochs < 1):
            raise PlanError(
                f"lp_init false (fine-tune from a random head) needs strategy partial or full "
                f"with epochs >= 1, but got strategy '{self.strategy}' with {self.epochs} epochs"
            )

    def _check_types(self) -> None:
        """plan.json is edited by hand: say which value has the wrong type, and how."""
        kinds = {
            int: ("epochs", "batch_size", "seed"),
            (int, type(None)): ("cut", "feature_level", "image_size"),
            (int, float): ("lr", "backbone_lr_ratio", "weight_decay", "val_fraction", "label_smoothing"),
            str: ("backbone", "strategy", "bn_mode", "weights", "augment", "all_levels_mode"),
            bool: ("all_levels", "class_weighting", "lp_init", "refit", "ensemble_levels_only"),
            list: ("reasons",),
            Compute: ("compute",),
        }
        for kind, names in kinds.items():
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                    raise PlanError(f"{name} has the wrong type: got {value!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"plan file '{path}' not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan file '{path}' is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlanError(
                f"plan file '{path}' holds {type(data).__name__} {json.dumps(data)[:40]}, not a Plan; "
                "expected an object like the plan.json `autotransfer plan` writes"
            )
        data.pop("head_epochs", None)  # plans from before the probe replaced the SGD head
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"plan file '{path}' has unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise PlanError(f"plan file '{path}' has a value of the wrong type: {exc}") from None


def describe(plan: Plan) -> str:
    """The Plan in one line, as `fit`, `plan` and reports print it."""
    depth = ("every feature level" + {"level": "", "feature": ", per-feature scaling",
                                      "ensemble": ", mean of the 3 best probes"}[plan.all_levels_mode]
             + (" of single levels" if plan.all_levels_mode == "ensemble" and plan.ensemble_levels_only else "")
             if plan.all_levels else "top" if plan.feature_level is None else f"feature level {plan.feature_level}")
    what = {"frozen": "frozen extractor", "partial": f"partial fine-tuning (cut {plan.cut})",
            "full": "full fine-tuning"}[plan.strategy]
    return f"{plan.backbone}, {what} at {depth}" + (
        f", lr {plan.lr:.2g}, {plan.epochs} epochs, bn {plan.bn_mode}, {plan.augment} augmentation"
        if plan.strategy != "frozen" else ""
    )


def ranked_lines(plans: list[Plan]) -> list[str]:
    """Ranked Plans, each with its reasons, as `fit` and `plan` print them."""
    return [line for rank, plan in enumerate(plans, start=1)
            for line in (f"{rank}. {describe(plan)}", *(f"     - {reason}" for reason in plan.reasons))]
