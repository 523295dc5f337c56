"""The built-in backbone plugin: any timm model name, weights through timm's own loading.

It advertises the timm models whose weights already sit in the local Hugging Face cache
(usable offline) and resolves every other timm name on demand.
"""

from __future__ import annotations

from pathlib import Path

import timm
from timm.models import get_pretrained_cfg, split_model_name_tag

from autotransfer.backbones import BackboneSpec

_DATASETS = {"in1k": "imagenet-1k", "in22k": "imagenet-22k", "in21k": "imagenet-21k"}


def _pretrained_on(tag: str) -> str:
    for short, long in _DATASETS.items():
        if short in tag:
            return long
    return tag or "unknown"


def resolve(name: str) -> BackboneSpec | None:
    """A spec for any timm model name (optionally `arch.tag`), None if timm has no such model."""
    if not timm.is_model(name):
        return None
    architecture, tag = split_model_name_tag(name)
    cfg = get_pretrained_cfg(name) or get_pretrained_cfg(architecture)
    if cfg is None:
        return BackboneSpec(name, name, "none", 224, (0.5,) * 3, (0.5,) * 3)
    return BackboneSpec(
        name=name,
        architecture=name,
        pretrained_on=_pretrained_on(cfg.tag or tag),
        input_size=int(cfg.input_size[-1]),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
    )


def backbones() -> list[BackboneSpec]:
    """timm models with weights in the local Hugging Face cache."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    names = [d.name.removeprefix("models--timm--") for d in cache.glob("models--timm--*")]
    return [spec for spec in map(resolve, sorted(names)) if spec is not None]
