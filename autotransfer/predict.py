"""Use a finished run: load its model, predict images, evaluate it on a labelled folder.

`load(RUN)` gives a `Model`; `Model.predict` takes paths, PIL images or numpy arrays and
returns `Prediction`s (class names, most probable first, with probabilities);
`Model.evaluate` scores a split of a labelled folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union, overload

import numpy as np
import torch
from PIL import Image
from torch import nn

from autotransfer.backbones import on_device
from autotransfer.checkpoint import load_model
from autotransfer.data import DatasetScan, load_rgb, scan_folder, to_rgb
from autotransfer.errors import DataError
from autotransfer.features import eval_transform, image_loader
from autotransfer.metrics import classification_report
from autotransfer.plan import Plan
from autotransfer.strategies import Preprocessing

ImageInput = Union[str, Path, Image.Image, np.ndarray]
BATCH_SIZE = 64


@dataclass
class Prediction:
    """One image's classes, most probable first, and their probabilities."""

    image: str | None  # the path given; None for an in-memory image
    classes: list[str]
    probabilities: list[float]

    @property
    def label(self) -> str:
        return self.classes[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_dict(self) -> dict:
        """As `autotransfer predict --json` prints it."""
        return {"image": self.image, "top_k": [
            {"class": name, "probability": p} for name, p in zip(self.classes, self.probabilities)
        ]}


@dataclass
class Model:
    """A RUN's trained classifier in eval mode, with its class names and preprocessing."""

    path: Path  # the RUN folder (or model.pt) it was loaded from
    classes: list[str]
    preprocessing: Preprocessing
    net: nn.Module = field(repr=False)
    device: str = "cpu"

    @overload
    def predict(self, images: ImageInput, top_k: int | None = None) -> Prediction: ...
    @overload
    def predict(self, images: Iterable[ImageInput], top_k: int | None = None) -> list[Prediction]: ...

    def predict(self, images, top_k=None):
        """Classes and probabilities of one image (a path, a PIL image, an HxW or HxWxC
        numpy array, uint8 or floats in [0, 1]) or of a list of them (or an NxHxWxC array).

        One image gives one Prediction, several a list. `top_k` keeps the k most probable
        classes (default: all of them). DataError for a file that is missing or no image.
        """
        single = isinstance(images, (str, Path, Image.Image)) or not isinstance(images, Iterable) or (
            isinstance(images, np.ndarray) and images.ndim != 4)
        items = [images] if single else list(images)
        if top_k is not None and top_k < 1:
            raise DataError(f"top_k must be at least 1, but got {top_k}")
        k = len(self.classes) if top_k is None else min(top_k, len(self.classes))
        transform = eval_transform(self.preprocessing)
        results = []
        for start in range(0, len(items), BATCH_SIZE):
            chunk = items[start:start + BATCH_SIZE]
            batch = torch.stack([transform(_rgb(item)) for item in chunk])
            with torch.inference_mode():
                probs = self.net(batch.to(self.device)).float().softmax(dim=1).cpu()
            for item, row in zip(chunk, probs):
                top = row.topk(k)
                results.append(Prediction(
                    str(item) if isinstance(item, (str, Path)) else None,
                    [self.classes[i] for i in top.indices], [float(p) for p in top.values],
                ))
        return results[0] if single else results

    def evaluate(self, data: str | Path, split: str = "auto") -> dict:
        """Metrics on a split of DATA (auto: test, else val, else all): accuracy, balanced
        accuracy, macro-F1, loss, per-class accuracy, confusion matrix, skipped files.

        DATA without val/ gets its val split drawn again with the run's seed and fraction,
        so `split="val"` scores the very images `fit` validated on.
        """
        plan = _run_plan(self.path) if split == "val" else None
        fraction, seed = (plan.val_fraction, plan.seed) if plan else (None, 0)
        scan = scan_folder(data, fraction, seed)
        if split == "auto":
            split = next(s for s in ("test", "val", "train") if s in scan.splits)
        if split not in scan.splits:
            raise DataError(_missing_split(self.path, data, split, scan))
        report = self.score(scan.splits[split], scan.classes, str(data))
        whole = scan.layout == "class-folders" and split == "train"
        return {"split": "all" if whole else split, **report, "skipped": [s.__dict__ for s in scan.skipped]}

    def score(self, records: list, record_classes: list[str], source: str = "the data") -> dict:
        """Metrics on labelled records whose labels index `record_classes`."""
        unknown = [c for c in record_classes if c not in self.classes]
        if unknown:
            raise DataError(
                f"{source} has classes the model does not know ({', '.join(unknown)}); "
                f"the model knows: {', '.join(self.classes)}"
            )
        remap = torch.tensor([self.classes.index(c) for c in record_classes])
        logits, labels = [], []
        with torch.inference_mode():
            for images, targets in image_loader(records, eval_transform(self.preprocessing), BATCH_SIZE):
                logits.append(self.net(images.to(self.device)).float().cpu())
                labels.append(remap[targets])
        return classification_report(torch.cat(logits), torch.cat(labels), self.classes)


def load(run: str | Path) -> Model:
    """The model of a RUN folder (or its model.pt), on the GPU when there is one.

    RunError if RUN holds no autotransfer model, or one that was changed after `fit`.
    """
    net, classes, prep = load_model(run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Model(Path(run), classes, prep, on_device(net, device), device)


def _rgb(item: ImageInput) -> Image.Image:
    """An 8-bit RGB PIL image of a path, a PIL image or a numpy array; DataError if none."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        return _from_array(item)
    if not isinstance(item, (str, Path)):
        raise DataError(f"expected an image path, a PIL image or a numpy array, but got {type(item).__name__}")
    try:
        return load_rgb(item)
    except FileNotFoundError:
        raise DataError(f"image '{item}' not found") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"'{item}' is too large to decode safely ({exc}); resize it") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"'{item}' is not a readable image: {exc}") from None


def _from_array(array: np.ndarray) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 (channels last, as PIL and matplotlib hold them); uint8,
    or floats in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise DataError(
            f"an image array must be HxW or HxWxC with C 1, 3 or 4 (channels last), but got shape {array.shape}; "
            "for a CxHxW array pass array.transpose(1, 2, 0)"
        )
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.size and not np.isfinite(array).all():
            raise DataError("an image array holds NaN or infinite values")
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0  # floats in [0, 1], else 0..255
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    return to_rgb(Image.fromarray(array))


def evaluate_folder(run: str | Path, data: str | Path, split: str = "auto") -> dict:
    """`Model.evaluate` of the RUN's model."""
    return load(run).evaluate(data, split)


def evaluate_records(run: str | Path, records: list, record_classes: list[str], source: str = "the data") -> dict:
    """`Model.score` of the RUN's model."""
    return load(run).score(records, record_classes, source)


def predict_images(run: str | Path, images: list[Path], top_k: int = 3) -> list[dict]:
    """Top-k classes and probabilities for each image file, as `predict --json` prints them."""
    return [p.to_dict() for p in load(run).predict(list(images), top_k)]


def _run_plan(run: str | Path) -> Plan | None:
    """The Plan beside the RUN's model.pt (None without one): its seed and val fraction."""
    run = Path(run)
    path = (run if run.is_dir() else run.parent) / "plan.json"
    return Plan.load(path) if path.is_file() else None


def _missing_split(run: str | Path, data: str | Path, split: str, scan: DatasetScan) -> str:
    if split == "val":  # only without plan.json: otherwise a val split is drawn
        return (f"{data} has no val/ folder and {run} has no plan.json with the seed and fraction "
                "`fit` drew its val split with; pass --split train, or a folder with val/")
    if scan.layout == "class-folders":
        return (f"{data} has no {split}/ folder, only class folders; pass --split val (the split "
                f"`fit` validated on) or train (every image), or a folder with {split}/")
    found = ", ".join(f"{s}/" for s in scan.splits)
    return f"{data} has no {split}/ folder (found {found}); pass --split with one of those, or a folder with {split}/"
