"""Export a RUN's model to a file that runs without autotransfer, timm or the plugin.

TorchScript (torch.jit.trace: torch alone loads it) or ONNX (any ONNX runtime; needs the
optional `onnx` and `onnxruntime` packages). What an image must go through first is
written beside it as JSON (`<file>.json`): classes, input size, mean, std,
interpolation, crop. Every export is loaded back and compared with the PyTorch model on a
few photos before it is reported done: a trace that silently baked in a shape or a
branch would otherwise ship.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from autotransfer.checkpoint import MODEL_FILE, load_model, read_checkpoint
from autotransfer.errors import AutotransferError
from autotransfer.features import eval_transform
from autotransfer.strategies import Preprocessing

FORMATS = ("torchscript", "onnx")
METADATA_FORMAT = "autotransfer.export/1"
DEFAULT_NAMES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
TOLERANCE = 1e-4  # max abs difference of logits between the export and the PyTorch model
CHECK_PHOTOS = ("chelsea", "astronaut", "coffee")  # bundled with scikit-image: no download


@dataclass(frozen=True)
class Export:
    """What `export` wrote and how closely it matches the PyTorch model."""

    path: Path
    metadata: Path
    format: str
    images: int  # how many images the check compared
    max_abs_diff: float


def metadata_path(path: str | Path) -> Path:
    """The preprocessing JSON of an exported file: `<file>.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def export(run: str | Path, format: str = "torchscript", out: str | Path | None = None) -> Export:
    """Write RUN's model as `format` to `out` (default RUN/model.torchscript.pt or
    RUN/model.onnx) with its preprocessing JSON, and check it against the PyTorch model."""
    if format not in FORMATS:
        raise AutotransferError(f"export format must be one of {', '.join(FORMATS)}, but got '{format}'")
    if format == "onnx":
        _need_onnx()
    net, classes, prep = load_model(run)
    net = net.float().cpu().eval()
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    path = Path(out) if out is not None else run_dir / DEFAULT_NAMES[format]
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = check_images(prep)
    with torch.no_grad():
        expected = net(batch)
        if format == "torchscript":
            _write_torchscript(net, batch[:2], path)
            with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; it still loads everywhere
                warnings.simplefilter("ignore", FutureWarning)
                got = torch.jit.load(str(path), map_location="cpu")(batch)
        else:
            _write_onnx(net, batch[:2], path)
            got = torch.from_numpy(_onnx_logits(path, batch.numpy()))
    diff = float((got.float() - expected).abs().max())
    if not diff < TOLERANCE:
        raise AutotransferError(
            f"the {format} export of {run} differs from the PyTorch model by {diff:.2g} on {len(batch)} images "
            f"(at most {TOLERANCE:g} expected); it was not written as usable ({path}); try the other --format, "
            "and report this with the backbone's name"
        )
    meta = metadata_path(path)
    meta.write_text(json.dumps(_metadata(run, format, classes, prep), indent=2) + "\n")
    return Export(path, meta, format, len(batch), diff)


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise AutotransferError(
            f"--format onnx needs the {exc.name} package, which is not installed: "
            "pip install 'autotransfer[export]' (onnx and onnxruntime), or use --format torchscript"
        ) from None


def check_images(prep: Preprocessing) -> torch.Tensor:
    """Photos through the model's own preprocessing, and one of noise: what an export
    is compared on (a batch of 4, while the trace saw 2, so a baked-in batch size fails)."""
    from skimage import data

    transform = eval_transform(prep)
    photos = [transform(Image.fromarray(getattr(data, name)())) for name in CHECK_PHOTOS]
    noise = torch.Generator().manual_seed(0)
    return torch.stack([*photos, torch.randn(photos[0].shape, generator=noise)])


def _write_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # tracer notes on shape arithmetic; the check below decides
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
    tmp = path.with_name(path.name + ".tmp")
    traced.save(str(tmp))
    tmp.replace(path)


def _write_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(tmp), dynamo=False, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        )
    tmp.replace(path)


def _onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images.astype(np.float32)})[0]


def _metadata(run: str | Path, format: str, classes: list[str], prep: Preprocessing) -> dict:
    payload = read_checkpoint(run)
    return {
        "format": METADATA_FORMAT,
        "model_format": format,
        "source": str(Path(run) / MODEL_FILE if Path(run).is_dir() else Path(run)),
        "backbone": payload.get("backbone"),
        "architecture": payload["architecture"],
        "classes": list(classes),
        "input": "float32 NCHW RGB: resize the shorter side to input_size / crop_pct (interpolation), "
                 "centre-crop input_size, scale to [0, 1], subtract mean, divide by std",
        "output": "logits, one per class in the order of classes (softmax for probabilities)",
        **asdict(prep),
    }
