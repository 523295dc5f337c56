"""Scan an image folder into a DatasetScan: classes, splits, per-file facts, skipped files.

Layouts: `DATA/train/<class>/*` with optional `val/` and `test/`, or `DATA/<class>/*`
directly (then a seeded, stratified validation split is drawn). Every file is decoded
once (JPEG at reduced scale), so unreadable, truncated and non-image files are found
before training, and its content hash keys the feature cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import numpy as np
from PIL import Image, ImageOps

from autotransfer.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"valid": "val", "validation": "val"}
_THUMB = 64  # decode size for checks: enough to count colours, cheap for JPEG


@dataclass(frozen=True)
class ImageRecord:
    """One readable image and what the scan learnt about it."""

    path: str
    label: int
    sha1: str
    format: str
    mode: str
    width: int
    height: int
    colours: int  # distinct colours in a small thumbnail


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class DatasetScan:
    root: str
    classes: list[str]
    splits: dict[str, list[ImageRecord]]
    skipped: list[SkippedFile] = field(default_factory=list)
    layout: str = "splits"  # "splits" or "class-folders"
    val_drawn: bool = False  # val was drawn from train by us (no val/ folder): the model may refit on both (Plan.refit)

    def content_hash(self, split: str) -> str:
        """Hash of the split's file contents and labels: changes iff the data changes."""
        digest = hashlib.sha1()
        for record in sorted(self.splits[split], key=lambda r: r.path):
            digest.update(f"{record.sha1}:{record.label}\n".encode())
        return digest.hexdigest()


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image as 8-bit RGB: palette, alpha, grayscale and 16-bit modes converted."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        if image.mode.startswith("I;16") or peak > 255:
            high = 65535.0
        elif image.mode == "F" and peak <= 1.0:
            high = 1.0  # float images in 0..1
        else:
            high = 255.0
        return Image.fromarray(np.clip(array / high * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _inspect(path: Path) -> tuple[ImageRecord | None, str]:
    """Decode one file; return its record (label filled in later) or why it is unusable."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw)) as image:
                fmt, mode, (width, height) = image.format or "?", image.mode, image.size
                image.draft("RGB", (_THUMB, _THUMB))
                image.load()
                thumb = to_rgb(image)
    except Image.DecompressionBombError:
        return None, "image too large (decompression bomb guard)"
    except (OSError, SyntaxError, ValueError) as exc:
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(exc))
        kind = "truncated image" if "truncated" in message else "not a readable image"
        return None, f"{kind}: {message}"
    thumb.thumbnail((_THUMB, _THUMB), Image.Resampling.NEAREST)
    colours = len(np.unique(np.asarray(thumb).reshape(-1, 3), axis=0))
    record = ImageRecord(
        str(path), -1, hashlib.sha1(raw).hexdigest(), fmt, mode, width, height, colours
    )
    return record, ""


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _find_splits(root: Path) -> dict[str, Path]:
    splits = {}
    for child in _class_dirs(root):
        name = _SPLIT_ALIASES.get(child.name.lower(), child.name.lower())
        if name in SPLIT_NAMES:
            splits[name] = child
    return splits


def scan_folder(
    root: str | Path, val_fraction: float | None = 0.2, seed: int = 0, workers: int | None = None
) -> DatasetScan:
    """Read the folder layout and decode every file once; raise DataError on bad layouts.

    Without a val/ folder, `val_fraction` of train is drawn as validation (None: not).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist; expected a folder like {root}/<class>/<image>.jpg")
    if not root.is_dir():
        raise DataError(f"{root} is a file; expected a folder like {root}/<class>/<image>.jpg")
    split_dirs = _find_splits(root)
    if split_dirs and "train" not in split_dirs:
        found = ", ".join(sorted(split_dirs))
        raise DataError(f"{root} has {found}/ but no train/; add {root}/train/<class>/<image>.jpg")
    layout = "splits" if split_dirs else "class-folders"
    if not split_dirs:
        split_dirs = {"train": root}

    class_names = [d.name for d in _class_dirs(split_dirs["train"])]
    where = split_dirs["train"]
    if len(class_names) < 2:
        found = f"{len(class_names)} class folder" + ("s" if len(class_names) != 1 else "")
        named = f" ('{class_names[0]}')" if class_names else ""
        raise DataError(
            f"{where} has {found}{named}; need at least 2: {where}/<class>/<image>.jpg"
        )

    files: list[tuple[str, int, Path]] = []
    for split, folder in split_dirs.items():
        for class_dir in _class_dirs(folder):
            if class_dir.name not in class_names:
                raise DataError(
                    f"{class_dir} is a class that {where} does not have; "
                    f"classes in train/: {', '.join(class_names)}"
                )
            label = class_names.index(class_dir.name)
            for path in sorted(class_dir.rglob("*")):
                if _is_file(path):
                    files.append((split, label, path))

    with ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        inspected = list(pool.map(lambda item: _inspect(item[2]), files))

    splits: dict[str, list[ImageRecord]] = {name: [] for name in split_dirs}
    skipped: list[SkippedFile] = []
    for (split, label, path), (record, reason) in zip(files, inspected):
        if record is None:
            skipped.append(SkippedFile(str(path), reason))
        else:
            splits[split].append(ImageRecord(**{**record.__dict__, "label": label}))
    for split in list(splits):
        kept, odd = _drop_graphic_outliers(splits[split])
        splits[split] = kept
        skipped.extend(odd)

    for label, name in enumerate(class_names):
        if not any(r.label == label for r in splits["train"]):
            raise DataError(
                f"class '{name}' has no readable image in {where / name}; "
                "add images or remove the folder"
            )
    scan = DatasetScan(str(root), class_names, splits, skipped, layout)
    if "val" not in scan.splits and val_fraction is not None:
        scan.splits["train"], scan.splits["val"] = stratified_split(
            scan.splits["train"], val_fraction, seed
        )
        scan.val_drawn = True
    return scan


def _drop_graphic_outliers(
    records: list[ImageRecord],
) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """Skip files unlike the rest of their class: another format *and* almost no colours.

    This catches placeholders ("image not found" GIFs) without judging a dataset whose
    images are all small or grayscale: the test is relative to the class's own median.
    """
    by_class: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in records:
        by_class[record.label].append(record)
    kept, odd = [], []
    for members in by_class.values():
        usual_format = Counter(r.format for r in members).most_common(1)[0][0]
        usual_colours = median(r.colours for r in members)
        for r in members:
            if len(members) >= 10 and r.format != usual_format and r.colours < usual_colours / 10:
                odd.append(
                    SkippedFile(
                        r.path,
                        f"looks like a placeholder, not a photo: a {r.format} with "
                        f"{r.colours} colours among {usual_format}s with ~{usual_colours:.0f}",
                    )
                )
            else:
                kept.append(r)
    kept.sort(key=lambda r: (r.label, r.path))
    return kept, odd


def stratified_split(
    records: list[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Seeded per-class split; every class with 2+ images keeps one on each side, and a
    class with one image keeps it in train."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, but got {fraction}")
    rng = random.Random(seed)
    train, val = [], []
    by_class: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in records:
        by_class[record.label].append(record)
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda r: r.path)
        rng.shuffle(members)
        n_val = round(len(members) * fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        else:  # a single image trains: a class missing from train could never be predicted
            n_val = 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return train, val
