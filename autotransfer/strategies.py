"""Turn a Plan into a network: truncate, attach the head, freeze groups, pin BN modes.

Depends on torch and timm alone, so freezing can be tested without a Trainer. The
network stays a plain timm model inside `TransferNet`, which only adds the rule that
frozen modules (and, with bn_mode 'frozen', every BatchNorm) stay in eval mode whatever
`.train()` a framework calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from timm.models import group_modules, group_parameters
from torch import nn

from autotransfer.backbones import BackboneSpec, classifier_names, create_model, get_backbone
from autotransfer.errors import PlanError
from autotransfer.plan import Plan


@dataclass(frozen=True)
class Preprocessing:
    """What an image must go through before the network; stored with every model."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @classmethod
    def for_plan(cls, spec: BackboneSpec, plan: Plan) -> "Preprocessing":
        return cls(
            plan.image_size or spec.input_size,
            tuple(spec.mean),
            tuple(spec.std),
            spec.interpolation,
            spec.crop_pct,
        )


class TransferNet(nn.Module):
    """A timm classifier whose frozen part stays frozen, in eval mode, under any trainer."""

    def __init__(self, model: nn.Module, frozen_groups: int, bn_mode: str) -> None:
        super().__init__()
        self.model = model
        self.groups = coarse_groups(model)
        self.frozen_groups = frozen_groups
        self.bn_mode = bn_mode
        frozen = {name for group in self.groups[:frozen_groups] for name in group.params}
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)
        self._frozen_modules = [m for g in self.groups[:frozen_groups] for m in g.modules]
        # whole blocks whose parameters are all frozen, so that parameter-less modules in
        # them (dropout, drop-path, activations) follow the block into eval mode too
        self._frozen_modules += [
            name for name, module in model.named_modules()
            if name and _all_frozen(module) and name not in self._frozen_modules
        ]
        self.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features just below the classifier (what the frozen head is trained on)."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @property
    def classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def train(self, mode: bool = True) -> "TransferNet":
        super().train(mode)
        for name in self._frozen_modules:
            self.model.get_submodule(name).eval()
        if self.bn_mode == "frozen":
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


# Each level's standardised features are scaled to this norm (about that of the raw top
# features of EfficientNet-Lite, 10-75), so every level weighs the same in the head and
# the head learns at the pace of a head on one level.
LEVEL_NORM = 10.0
ALL_LEVELS = "all"  # the feature-cache key of the concatenated levels


class Standardise(nn.Module):
    """(x - mean) * scale, per feature; set from the training features, saved with the head."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.scale


class MultiLevelNet(nn.Module):
    """A frozen timm backbone read at every feature level and the top at once (Head2Toe,
    Evci et al. 2022, without its feature selection): each level's map mean-pooled, all
    standardised, concatenated, one linear classifier. Far from ImageNet the top features
    are too specific and the early ones too generic; the head weighs them itself."""

    def __init__(self, model: nn.Module, num_classes: int, input_size: int) -> None:
        super().__init__()
        self.model = model  # timm, num_classes=0, every parameter frozen
        self.levels = list(range(len(model.feature_info)))
        for param in model.parameters():
            param.requires_grad_(False)
        with torch.inference_mode():
            was_training = model.training
            probe = self._pooled(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
            model.train(was_training)
        self.dims = [int(p.shape[1]) for p in probe]
        self.classifier = nn.Sequential(Standardise(sum(self.dims)), nn.Linear(sum(self.dims), num_classes))
        self.train(self.training)

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.model.eval()
        final, maps = self.model.forward_intermediates(x, indices=self.levels)
        top = self.model.forward_head(final, pre_logits=True)
        return [m.float().mean(dim=(2, 3)) for m in maps] + [top.float()]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Every level's pooled features, concatenated (stem first, top last): what the
        head is trained on from the cache."""
        return torch.cat(self._pooled(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def set_standardisation(self, train_features: torch.Tensor, scaling: str = "level") -> None:
        """Standardise each feature with the training set's mean and spread; with scaling
        "level", then scale each level to a mean norm of LEVEL_NORM (a level of d varying
        features: LEVEL_NORM / sqrt(d)), with "feature" leave it so (Plan.all_levels_mode;
        an "ensemble" head sets this layer to identity, `train.ensemble_probe`).
        Features constant on the training set (dead units) count for nothing."""
        standardise = self.classifier[0]
        std = train_features.float().std(dim=0, unbiased=False)
        varying = std > 1e-6
        if scaling == "level":
            weight = torch.cat([
                torch.full((d,), LEVEL_NORM / max(1, int(alive.sum())) ** 0.5)
                for d, alive in zip(self.dims, varying.split(self.dims))
            ])
        elif scaling == "feature":
            weight = torch.ones(sum(self.dims))
        else:
            raise ValueError(f"scaling must be 'level' or 'feature', not {scaling!r}")
        standardise.mean.copy_(train_features.float().mean(dim=0))
        standardise.scale.copy_(torch.where(varying, weight / std.clamp(min=1e-6), 0.0))

    def train(self, mode: bool = True) -> "MultiLevelNet":
        super().train(mode)
        self.model.eval()
        return self


def supports_all_levels(model: nn.Module) -> bool:
    """Can MultiLevelNet read this timm model (feature maps from forward_intermediates)?"""
    return callable(getattr(model, "forward_intermediates", None)) and len(getattr(model, "feature_info", [])) > 0


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


@dataclass(frozen=True)
class Group:
    """One coarse group of the backbone (stem first): its parameter and module names."""

    params: list[str]
    modules: list[str]


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = classifier_names(model)
    return tuple(f"{name}." for name in names) + names


def coarse_groups(model: nn.Module) -> list[Group]:
    """The backbone's coarse groups from timm's group_matcher, classifier left out."""
    matcher = model.group_matcher(coarse=True)
    head = _classifier_prefixes(model)
    params = group_parameters(model, matcher)
    modules = group_modules(model, matcher)
    groups = []
    for gid in sorted(params):
        p = [n for n in params[gid] if not n.startswith(head)]
        m = [n for n in modules.get(gid, []) if not (n in head or n.startswith(head))]
        if p:
            groups.append(Group(p, m))
    return groups


def attach_head(model: nn.Module, feature_level: int | None, num_classes: int) -> nn.Module:
    """Drop the blocks above `feature_level` (if set) and put a fresh classifier on top.

    The result is still a plain timm model: loading a trained one needs only this and timm.
    """
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # prune_head resets the pool; keep the original
    if feature_level is not None:
        model.prune_intermediate_layers(indices=[feature_level], prune_norm=False, prune_head=True)
    if pool is None:
        model.reset_classifier(num_classes)
    else:
        model.reset_classifier(num_classes, pool)
    return model


def build_net(spec: BackboneSpec, plan: Plan, num_classes: int) -> TransferNet | MultiLevelNet:
    """The network the Plan describes, with weights loaded and groups frozen."""
    torch.manual_seed(plan.seed)
    model = create_model(spec, plan.weights, num_classes=0)
    if plan.all_levels:
        if not supports_all_levels(model):
            raise PlanError(f"all_levels needs timm feature maps (forward_intermediates), which {spec.name} does not offer")
        return MultiLevelNet(model, num_classes, Preprocessing.for_plan(spec, plan).input_size)
    levels = len(model.feature_info)
    if plan.feature_level is not None and not 0 <= plan.feature_level < levels:
        raise PlanError(
            f"feature_level must be between 0 and {levels - 1} for {spec.name} "
            f"({levels} feature levels), but got {plan.feature_level}"
        )
    attach_head(model, plan.feature_level, num_classes)
    n_groups = len(coarse_groups(model))
    frozen = {"frozen": n_groups, "full": 0}.get(plan.strategy, plan.cut)
    if plan.strategy == "partial" and not 1 <= plan.cut <= n_groups - 1:
        raise PlanError(
            f"cut must be between 1 and {n_groups - 1} for {spec.name} with feature level "
            f"{plan.feature_level} ({n_groups} coarse groups), but got {plan.cut}; "
            "use strategy 'frozen' to freeze all, 'full' to freeze none"
        )
    return TransferNet(model, frozen, plan.bn_mode)


def describe_backbone(spec: BackboneSpec) -> dict:
    """A listing row: the spec plus size and depth read off a randomly initialised model."""
    model = create_model(spec, "random", num_classes=0)
    return {
        "name": spec.name,
        "package": spec.package,
        "architecture": spec.architecture,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "pretrained_on": spec.pretrained_on,
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "groups": len(coarse_groups(model)),
        "levels": len(model.feature_info),
    }


@lru_cache(maxsize=None)
def all_levels_supported(backbone: str) -> bool:
    """Whether a Plan with all_levels can run on this backbone; random init is enough."""
    return supports_all_levels(create_model(get_backbone(backbone), "random", num_classes=0))


@lru_cache(maxsize=None)
def depth_of(backbone: str, feature_level: int | None) -> tuple[int, int]:
    """(coarse groups at this level, feature levels) of a backbone; random init is enough."""
    spec = get_backbone(backbone)
    model = create_model(spec, "random", num_classes=0)
    levels = len(model.feature_info)
    attach_head(model, feature_level, 2)
    return len(coarse_groups(model)), levels
