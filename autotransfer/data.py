"""Scan an image folder into a DatasetScan: classes, splits, per-file facts, skipped files.

Layouts: `DATA/train/<class>/*` with optional `val/` and `test/`, or `DATA/<class>/*`
directly (then a seeded, stratified validation split is drawn, exact duplicates kept on
one side). Every file is decoded once (JPEG at reduced scale), so unreadable, truncated
and non-image files are found before training, and its content hash keys the feature
cache. What is not DATA is skipped and listed, never read: symlinks that leave DATA
(unless followed on request), symlink loops, and RUN folders written into DATA.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from autotransfer.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"valid": "val", "validation": "val"}
_THUMB = 64  # decode size for checks: enough to count colours, cheap for JPEG
SCAN_CHUNK = 1024  # files in flight in the scan's thread pool: memory stays flat on 100,000 files
FOLLOW_SYMLINKS_ENV = "AUTOTRANSFER_FOLLOW_SYMLINKS"  # "1": follow symlinks that leave DATA
RUN_MARKERS = ("plan.json", "model.pt", "search.json")  # a folder holding one is a RUN, not data


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

    def median_side(self) -> float:
        """The smaller of the median width and the median height over every split, in px
        (read from the file headers at scan time: no image is decoded)."""
        records = [r for rs in self.splits.values() for r in rs]
        if not records:
            return 0.0
        return float(min(median(r.width for r in records), median(r.height for r in records)))

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
    try:  # runs in worker threads: PIL's warnings are silenced around the pool, not here
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


class _Walk:
    """Lists DATA's folders and files and notes what it leaves out, and why.

    A symlink is followed when its target is inside DATA (or `follow` is set); one to a
    folder that holds it (DATA itself, `/`) would loop and is never followed. A folder
    holding a RUN (RUN_MARKERS) or named in `exclude` is not data.
    """

    def __init__(self, root: Path, follow: bool, exclude: Iterable[str | Path]) -> None:
        self.real_root = root.resolve()
        self.follow = follow
        self.exclude = {Path(p).resolve() for p in exclude}
        self.notes: dict[str, str] = {}  # path -> why it was not read

    def folders(self, folder: Path, chain: tuple[Path, ...]) -> list[Path]:
        """Sub-folders of `folder` that are classes or splits (`chain`: the real folders
        walked down to `folder`, DATA's first)."""
        found = []
        for child in self._children(folder):
            if child.is_dir() or (child.is_symlink() and not child.exists()):
                why = self._blocked(child, chain) or self._only_runs(child)
                if why:
                    self.notes[str(child)] = why
                else:
                    found.append(child)
        return found

    def files(self, folder: Path, chain: tuple[Path, ...]) -> list[Path]:
        """Every file under `folder`, hidden files aside (hidden folders are read)."""
        found = []
        for child in self._children(folder, hidden_folders=True):
            if why := self._blocked(child, chain):
                self.notes[str(child)] = why
            elif child.is_dir():
                found += self.files(child, (*chain, child.resolve()))
            elif child.is_file():
                found.append(child)
        return found

    def hint(self, under: Path) -> str:
        """' (N symlinks out of DATA skipped; how to follow them)' for those under `under`."""
        prefix = str(under) + os.sep
        n = sum(p.startswith(prefix) and "outside DATA" in why for p, why in self.notes.items())
        return f" ({n} symlink(s) out of DATA skipped; {FOLLOW_SYMLINKS_ENV}=1 follows them)" if n else ""

    def _children(self, folder: Path, hidden_folders: bool = False) -> list[Path]:
        try:
            children = sorted(folder.iterdir())
        except OSError as exc:
            self.notes[str(folder)] = f"unreadable folder: {exc.strerror or exc}"
            return []
        return [c for c in children if not c.name.startswith(".") or (hidden_folders and c.is_dir())]

    def _blocked(self, path: Path, chain: tuple[Path, ...]) -> str:
        """Why `path` is not read ('' if it is)."""
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            if not target.exists():
                return "broken symlink (missing target, or a link to itself): skipped"
            if target.is_dir() and any(c == target or target in c.parents for c in chain):
                return f"symlink to {target}, a folder that holds it: a loop, never followed"
            if not self.follow and not target.is_relative_to(self.real_root):
                return f"symlink to {target}, outside DATA: skipped ({FOLLOW_SYMLINKS_ENV}=1 follows it)"
        return self._run(path) if path.is_dir() else ""

    def _run(self, folder: Path) -> str:
        if folder.resolve() in self.exclude:
            return "the RUN folder this command writes: not data"
        marker = next((m for m in RUN_MARKERS if (folder / m).is_file()), None)
        return f"a RUN folder (has {marker}): not data" if marker else ""

    def _only_runs(self, folder: Path) -> str:
        """A folder of RUN folders (`runs/` when `fit` ran inside DATA) is not a class."""
        children = self._children(folder)
        if children and all(c.is_dir() and self._run(c) for c in children):  # stops at the first file
            return f"holds only RUN folders ({', '.join(c.name for c in children)}): not a class"
        return ""


def _find_splits(folders: list[Path]) -> dict[str, Path]:
    splits = {}
    for child in folders:
        name = _SPLIT_ALIASES.get(child.name.lower(), child.name.lower())
        if name in SPLIT_NAMES:
            splits[name] = child
    return splits


def check_data_root(root: str | Path) -> Path:
    """DATA as a Path, or DataError if it is not a folder: the command line says so before
    it imports torch and timm (seconds)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist; expected a folder like {root}/<class>/<image>.jpg")
    if not root.is_dir():
        raise DataError(f"{root} is a file; expected a folder like {root}/<class>/<image>.jpg")
    return root


def scan_folder(
    root: str | Path, val_fraction: float | None = 0.2, seed: int = 0, workers: int | None = None,
    follow_symlinks: bool | None = None, exclude: Iterable[str | Path] = (),
) -> DatasetScan:
    """Read the folder layout and decode every file once; raise DataError on bad layouts.

    Without a val/ folder, `val_fraction` of train is drawn as validation (None: not).
    Symlinks that leave DATA are skipped and listed in `skipped` unless `follow_symlinks`
    (None: the AUTOTRANSFER_FOLLOW_SYMLINKS environment variable, so every command that
    rescans DATA sees the same files); so are RUN folders and the folders in `exclude`.
    """
    root = check_data_root(root)
    if follow_symlinks is None:
        follow_symlinks = os.environ.get(FOLLOW_SYMLINKS_ENV, "") not in ("", "0")
    walk = _Walk(root, follow_symlinks, exclude)
    top = walk.folders(root, (walk.real_root,))
    split_dirs = _find_splits(top)
    if split_dirs and "train" not in split_dirs:
        found = ", ".join(sorted(split_dirs))
        raise DataError(
            f"{root} has {found}/ but no train/; add {root}/train/<class>/<image>.jpg{walk.hint(root)}"
        )
    layout = "splits" if split_dirs else "class-folders"
    where = split_dirs.get("train", root)
    chains = {split: (walk.real_root, folder.resolve()) for split, folder in split_dirs.items()}
    class_dirs = {split: walk.folders(folder, chains[split]) for split, folder in split_dirs.items()}
    if not split_dirs:
        split_dirs, chains, class_dirs = {"train": root}, {"train": (walk.real_root,)}, {"train": top}

    class_names = [d.name for d in class_dirs["train"]]
    if len(class_names) < 2:
        found = f"{len(class_names)} class folder" + ("s" if len(class_names) != 1 else "")
        named = f" ('{class_names[0]}')" if class_names else ""
        raise DataError(
            f"{where} has {found}{named}; need at least 2: {where}/<class>/<image>.jpg{walk.hint(where)}"
        )

    files: list[tuple[str, int, Path]] = []
    for split in split_dirs:
        for class_dir in class_dirs[split]:
            if class_dir.name not in class_names:
                raise DataError(
                    f"{class_dir} is a class that {where} does not have; "
                    f"classes in train/: {', '.join(class_names)}"
                )
            label = class_names.index(class_dir.name)
            for path in walk.files(class_dir, (*chains[split], class_dir.resolve())):
                files.append((split, label, path))

    # PIL's warnings (EXIF, sizes) are silenced in this thread, around the pool: catch_warnings
    # is not thread-safe, and in the workers it left a global "ignore" behind
    splits: dict[str, list[ImageRecord]] = {name: [] for name in split_dirs}
    skipped = [SkippedFile(path, why) for path, why in walk.notes.items()]
    with warnings.catch_warnings(), ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        warnings.simplefilter("ignore")
        for start in range(0, len(files), SCAN_CHUNK):  # Executor.map queues every file at once
            chunk = files[start:start + SCAN_CHUNK]
            for (split, label, path), (record, reason) in zip(chunk, pool.map(lambda item: _inspect(item[2]), chunk)):
                if record is None:
                    skipped.append(SkippedFile(str(path), reason))
                else:
                    splits[split].append(replace(record, label=label))
    for split in list(splits):
        kept, odd = _drop_graphic_outliers(splits[split])
        splits[split] = kept
        skipped.extend(odd)

    for label, name in enumerate(class_names):
        if not any(r.label == label for r in splits["train"]):
            raise DataError(
                f"class '{name}' has no readable image in {where / name}; "
                f"add images or remove the folder{walk.hint(where / name)}"
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
    """Seeded per-class split that keeps exact duplicates (same sha1) on one side: a copy
    of a training image in val would score memory. Every class with 2+ distinct images
    keeps one on each side, and a class with one keeps it in train.

    Copies are drawn as one unit, counted in the class of their first path; without
    duplicates the split is the one drawn image by image."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, but got {fraction}")
    rng = random.Random(seed)
    copies: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.path):
        copies[record.sha1].append(record)
    by_class: dict[int, list[list[ImageRecord]]] = defaultdict(list)
    for unit in copies.values():
        by_class[unit[0].label].append(unit)
    train, val = [], []
    for label in sorted(by_class):
        units = sorted(by_class[label], key=lambda u: u[0].path)
        rng.shuffle(units)
        n = sum(map(len, units))
        n_val = 0  # a single image trains: a class missing from train could never be predicted
        if len(units) >= 2:
            n_val = min(max(round(n * fraction), 1), n - 1)
        to_val, taken = [False] * len(units), 0
        for i, unit in enumerate(units):
            if taken + len(unit) <= n_val:
                to_val[i], taken = True, taken + len(unit)
        if n_val and not taken:  # every unit is larger than the share: the smallest goes
            to_val[min(range(len(units)), key=lambda i: len(units[i]))] = True
        for unit, drawn in zip(units, to_val):
            (val if drawn else train).extend(unit)
    return train, val
