"""The portable model file: a plain timm model's state dict plus what it needs to run.

`model.pt` loads with torch and timm alone (see README, "Use the model without
autotransfer"): create the architecture with num_classes=0, prune it at
`feature_level` if set, reset the classifier to the class count, load `state_dict`.
A model that reads every level (`all_levels_head`) needs `MultiLevelNet` on top.
`plugin` names the backbone plugin (distribution, entry point, module): an architecture
that a plugin registers or creates exists only once that plugin is imported, so
`load_model` imports it first.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import timm
import torch
from torch import nn

from autotransfer.backbones import BUILTIN_PACKAGE, BackboneSpec, load_plugins, new_model, plugin_backbone
from autotransfer.errors import BackboneError, RunError
from autotransfer.strategies import MultiLevelNet, Preprocessing, TransferNet, attach_head

FORMAT = "autotransfer.model/1"
MODEL_FILE = "model.pt"


def save_model(
    path: str | Path,
    net: TransferNet | MultiLevelNet,
    spec: BackboneSpec,
    feature_level: int | None,
    classes: list[str],
    preprocessing: Preprocessing,
) -> None:
    """`state_dict` is always a plain timm model's. A MultiLevelNet's is the backbone
    without classifier, and its head (standardisation and linear layer) is `all_levels_head`."""
    payload = {
        "format": FORMAT,
        "architecture": spec.architecture,
        "backbone": spec.name,
        "plugin": {"distribution": spec.package, "entry_point": spec.entry, "module": spec.module},
        "feature_level": feature_level,
        "classes": list(classes),
        "preprocessing": asdict(preprocessing),
        "state_dict": _cpu(net.model.state_dict()),
    }
    if isinstance(net, MultiLevelNet):
        payload["all_levels_head"] = _cpu(net.classifier.state_dict())
    tmp = Path(path).with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}  # the default layout, whatever it ran in


def read_checkpoint(run_dir: str | Path) -> dict:
    """The checkpoint dict of a RUN folder (or a model.pt path); RunError if it is none."""
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise RunError(
            f"{run_dir} is not an autotransfer run (no {MODEL_FILE}); "
            "create one with `autotransfer fit DATA --out RUN`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(  # torch's message spans lines; the CLI prints one
            f"{path} could not be read as a model file ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}); expected the {MODEL_FILE} of `autotransfer fit`"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RunError(f"{path} is not an autotransfer model file (format {FORMAT})")
    return payload


def load_model(run_dir: str | Path) -> tuple[nn.Module, list[str], Preprocessing]:
    """The trained classifier in eval mode, its class names and its preprocessing.

    RunError when the file's weights do not fit its own description (architecture,
    class count, keys): it was edited or damaged after `fit`.
    """
    payload = read_checkpoint(run_dir)
    path = Path(run_dir) / MODEL_FILE if Path(run_dir).is_dir() else Path(run_dir)
    try:
        return _build(payload)
    except BackboneError as exc:  # its plugin is missing or broken
        raise BackboneError(f"{path}: {exc}") from exc
    except (LookupError, TypeError, ValueError, RuntimeError) as exc:
        first = " ".join(line.strip() for line in str(exc).splitlines()[:2])[:240]  # torch's: title, first problem
        raise RunError(
            f"{path} does not fit its own description ({type(exc).__name__}: {first}); "
            f"it was changed after `autotransfer fit`: train it again, or restore the file"
        ) from exc


def _architecture(payload: dict) -> nn.Module:
    """The bare model (num_classes=0) of the file, its plugin imported first. A file from
    before `plugin` was recorded gets every installed plugin imported instead."""
    plugin, architecture = payload.get("plugin") or {}, payload["architecture"]
    distribution, entry, backbone = plugin.get("distribution"), plugin.get("entry_point", ""), payload.get("backbone")
    if distribution and backbone:
        spec = plugin_backbone(distribution, entry, backbone)
        if spec is not None and spec.create is not None:
            return new_model(spec, num_classes=0)
        if distribution != BUILTIN_PACKAGE and not timm.is_model(architecture):
            raise BackboneError(
                f"architecture '{architecture}' is not a timm model, and the installed plugin "
                f"{distribution}[{entry}] neither registers it nor offers '{backbone}'; "
                "install the plugin version the model was trained with"
            )
    elif not timm.is_model(architecture):
        load_plugins()
    return timm.create_model(architecture, pretrained=False, num_classes=0)


def _build(payload: dict) -> tuple[nn.Module, list[str], Preprocessing]:
    model = _architecture(payload)
    prep = payload["preprocessing"]
    preprocessing = Preprocessing(
        prep["input_size"], tuple(prep["mean"]), tuple(prep["std"]),
        prep["interpolation"], prep["crop_pct"],
    )
    if "all_levels_head" in payload:
        model.load_state_dict(payload["state_dict"])
        net = MultiLevelNet(model, len(payload["classes"]), preprocessing.input_size)
        net.classifier.load_state_dict(payload["all_levels_head"])
        return net.eval(), list(payload["classes"]), preprocessing
    attach_head(model, payload["feature_level"], len(payload["classes"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), list(payload["classes"]), preprocessing
