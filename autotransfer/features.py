"""Images to tensors, and pooled backbone features computed once and cached on disk.

The cache key holds everything the features depend on: architecture, weights, feature
level, preprocessing and the content hash of the split. A second run on the same data
reuses the file instead of running the backbone again. Each file is one float32 .npy
(images x features), written batch by batch as the forward pass goes and read back
memory-mapped, so the features of 100,000 images never have to fit in memory at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, replace
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torchvision.transforms as T
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from autotransfer.backbones import BackboneSpec, on_device
from autotransfer.data import DatasetScan, ImageRecord, load_rgb
from autotransfer.errors import UsageError
from autotransfer.plan import Plan
from autotransfer.strategies import ALL_LEVELS, MultiLevelNet, Preprocessing, TransferNet, attach_head, build_net

CACHE_ENV = "AUTOTRANSFER_CACHE"
WORKERS_ENV = "AUTOTRANSFER_WORKERS"  # decoding processes per loader; unset: chosen from the machine
MAX_WORKERS = 8


def eval_transform(prep: Preprocessing) -> Callable:
    return create_transform(
        input_size=(3, prep.input_size, prep.input_size),
        is_training=False,
        interpolation=prep.interpolation,
        mean=prep.mean,
        std=prep.std,
        crop_pct=prep.crop_pct,
    )


def train_transform(prep: Preprocessing, augment: str = "crop") -> Callable:
    """Fine-tuning augmentation (Plan.augment). "crop": the eval view, flipped and shifted
    by a reflect-padded random crop (an eighth of the size), what the LP-FT reference of
    issue 15 used; "strong": fastai's `aug_transforms` kind, a random resized crop of 35-100 %
    of the image, flips, rotation up to 10 degrees, brightness and contrast jitter 0.2."""
    size = prep.input_size
    interpolation = T.InterpolationMode(prep.interpolation if prep.interpolation in ("bilinear", "bicubic") else "bilinear")
    finish = [T.ToTensor(), T.Normalize(prep.mean, prep.std)]
    if augment == "strong":
        return T.Compose([
            T.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interpolation), T.RandomHorizontalFlip(),
            T.RandomRotation(10, interpolation=interpolation), T.ColorJitter(0.2, 0.2), *finish,
        ])
    return T.Compose([
        T.Resize(int(size / prep.crop_pct), interpolation=interpolation), T.CenterCrop(size),
        T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"), T.RandomHorizontalFlip(), *finish,
    ])


class ImageDataset(Dataset):
    def __init__(self, records: list[ImageRecord], transform: Callable) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        return self.transform(load_rgb(record.path)), record.label


def loader_workers(n_images: int) -> int:
    """Worker processes for decoding: AUTOTRANSFER_WORKERS if set; else none for tiny sets,
    where start-up costs more than it saves, and one per core this process may use, less
    one for the forward pass, at least 2 and at most MAX_WORKERS (a GPU is fed by 8)."""
    chosen = os.environ.get(WORKERS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit():
            raise UsageError(f"{WORKERS_ENV} must be a whole number of worker processes (0: decode in "
                             f"the main process), but got {chosen!r}; unset it to choose from the machine")
        return int(chosen)
    if n_images < 200:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_WORKERS, max(2, cores - 1))


def image_loader(
    records: list[ImageRecord], transform: Callable, batch_size: int, shuffle: bool = False,
    seed: int = 0, drop_last: bool = False,
) -> DataLoader:
    """Batches of (images, labels); pinned memory where a GPU takes them (faster copies),
    workers kept between epochs (no start-up per epoch)."""
    workers = loader_workers(len(records))
    return DataLoader(
        ImageDataset(records, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block on `n` torch threads. Thousands of tiny steps (a linear head on cached
    features) only make worker threads wait on each other; on a busy machine each wait
    costs a time slice (measured: 3 s on 2 threads vs 0.03 s on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "autotransfer") / "features"



@contextmanager
def use_cache(root: Path) -> Iterator[None]:
    """Point the feature cache at `root` while in the block; restore the caller's setting."""
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old

# Bumped when the same images would give other (if only by rounding) features: 2 = computed
# in channels-last memory on the CPU. A decision must not depend on what the cache holds.
FEATURES_VERSION = 2


def feature_key(
    architecture: str, weights_id: str, feature_level: int | str | None, prep: Preprocessing,
    data_hash: str,
) -> str:
    blob = json.dumps(
        [FEATURES_VERSION, architecture, weights_id, feature_level, asdict(prep), data_hash], sort_keys=True
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def weights_id(spec: BackboneSpec, weights: str, seed: int) -> str:
    """What identifies a backbone's weights in cache keys (features, calibration)."""
    if weights == "pretrained":
        return f"pretrained:{spec.package}:{spec.name}"
    if weights == "random":
        return f"random:seed={seed}"
    path = Path(weights)
    if not path.is_file():
        return f"file:{path}"
    return f"file:{path.resolve()}:{path.stat().st_mtime_ns}:{path.stat().st_size}"


@torch.inference_mode()
def feature_batches(
    net: TransferNet | MultiLevelNet, records: list[ImageRecord], prep: Preprocessing, batch_size: int = 64,
    desc: str = "features", progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Pooled features of `records`, a batch (B x D, float32, on the CPU) at a time,
    backbone in eval mode (its mode restored afterwards)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    loader = image_loader(records, eval_transform(prep), batch_size)
    try:
        for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
            yield net.features(images.to(device, non_blocking=True)).float().cpu()
    finally:
        net.train(was_training)


def extract_features(
    net: TransferNet | MultiLevelNet, records: list[ImageRecord], prep: Preprocessing, batch_size: int = 64,
    desc: str = "features", progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (n x D) and labels of `records` in memory (`cached_features`
    streams them to disk instead)."""
    feats = list(feature_batches(net, records, prep, batch_size, desc, progress))
    return torch.cat(feats), torch.tensor([r.label for r in records], dtype=torch.long)


def cache_path(
    architecture: str, weights_id: str, feature_level: int | str | None, prep: Preprocessing,
    data_hash: str,
) -> Path:
    return cache_dir() / f"{feature_key(architecture, weights_id, feature_level, prep, data_hash)}.npy"


class FeatureWriter:
    """Writes an (rows x D) float32 .npy file batch by batch: only one batch is in memory.

    The file appears under its name when every row is written (`close`); until then it is
    a temporary file beside it, removed if the block fails, so an interrupted run never
    leaves a half-written cache file. Plain appends, not a writable memory map: written
    pages go to the page cache, not to this process's resident memory.
    """

    def __init__(self, path: Path, rows: int) -> None:
        self.path, self.rows, self.written = path, rows, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_suffix(f".{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")

    def add(self, batch: torch.Tensor) -> None:
        array = batch.detach().float().cpu().numpy()
        if self.file.tell() == 0:  # the header, once the width is known
            self._header(array.shape[1:])
        self.file.write(np.ascontiguousarray(array).tobytes())
        self.written += len(array)

    def _header(self, width: tuple[int, ...]) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.rows, *width)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def close(self) -> None:
        if self.file.tell() == 0:  # no rows at all: an empty (0 x 0) array
            self._header((0,))
        self.file.close()
        if self.written != self.rows:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeError(f"feature file {self.path.name}: {self.written} rows written, {self.rows} expected")
        self.tmp.replace(self.path)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


def store_features(path: Path, feats: torch.Tensor) -> None:
    """Write features already in memory as a cache file (atomic, like every cache write)."""
    with FeatureWriter(path, len(feats)) as writer:
        writer.add(feats)


def load_features(path: Path, rows: int) -> torch.Tensor | None:
    """The cached features, memory-mapped copy-on-write (pages are read when touched; a
    caller writing into them changes its copy, never the file); None when the file is
    missing, or damaged, then removed: a damaged cache file is recomputed, never trusted."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        array = None
    if array is None or array.ndim != 2 or array.shape[0] != rows or array.dtype != np.float32:
        path.unlink(missing_ok=True)
        return None
    return torch.from_numpy(array)


def cached_features(
    net: TransferNet | MultiLevelNet, scan: DatasetScan, split: str, prep: Preprocessing, architecture: str,
    weights_id: str, feature_level: int | str | None, batch_size: int = 64, progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features, labels, reused) for one split, computed only when not yet on disk.

    The features come memory-mapped from the cache file, written batch by batch; the
    labels are the records' (the key's content hash covers them)."""
    records = scan.splits[split]
    path = cache_path(architecture, weights_id, feature_level, prep, scan.content_hash(split))
    labels = torch.tensor([r.label for r in records], dtype=torch.long)
    feats = load_features(path, len(records))
    if feats is not None:
        return feats, labels, True
    with FeatureWriter(path, len(records)) as writer:
        for batch in feature_batches(net, records, prep, batch_size, f"{split} features", progress):
            writer.add(batch)
    return load_features(path, len(records)), labels, False


@torch.inference_mode()
def cache_feature_levels(
    spec: BackboneSpec, plan: Plan, scan: DatasetScan, levels: list[int | None],
    batch_size: int = 64, progress: bool = True, all_levels: bool = False,
) -> list[int | str | None]:
    """Cache the pooled features of several depths from one forward pass per image.

    A sweep of frozen extractors over depths then costs one pass over the data instead of
    one per depth (cheap first). A level joins the shared pass only if, on the first
    batch, average-pooling its feature map gives what the truncated network computes;
    any other level is left to `cached_features`. With `all_levels`, the concatenation
    a MultiLevelNet reads (every level pooled, then the top) is cached too, as level
    ALL_LEVELS. Returns the levels cached here.
    """
    prep = Preprocessing.for_plan(spec, plan)
    wid = weights_id(spec, plan.weights, plan.seed)
    splits = [s for s, records in scan.splits.items() if records]
    wanted: list[int | str | None] = [*levels, *([ALL_LEVELS] if all_levels else [])]
    paths = {
        (split, level): cache_path(spec.architecture, wid, level, prep, scan.content_hash(split))
        for split in splits for level in wanted
    }
    if all(path.is_file() for path in paths.values()):
        return []
    net = build_net(spec, replace(plan, strategy="frozen", cut=None, feature_level=None, all_levels=False), len(scan.classes))
    model = on_device(net.eval().model, "cuda" if torch.cuda.is_available() else "cpu")
    if not hasattr(model, "forward_intermediates"):
        return []
    every = list(range(len(model.feature_info)))
    ints = every if all_levels else sorted({level for level in levels if level is not None})
    shared: list[int | str | None] | None = None
    device = next(model.parameters()).device
    for split in splits:
        rows = len(scan.splits[split])
        with ExitStack() as stack:  # each level's file is kept only when the whole split is written
            writers: dict[int | str | None, FeatureWriter] = {}
            loader = image_loader(scan.splits[split], eval_transform(prep), batch_size)
            for images, _ in tqdm(loader, desc=f"{split} features, {len(wanted)} depths", unit="batch", leave=False, disable=not progress):
                images = images.to(device, non_blocking=True)
                final, maps = model.forward_intermediates(images, indices=ints) if ints else (model.forward_features(images), [])
                pooled: dict[int | str | None, torch.Tensor] = {
                    level: f.float().mean(dim=(2, 3)) for level, f in zip(ints, maps) if f.ndim == 4
                }
                pooled[None] = model.forward_head(final, pre_logits=True).float()
                if all_levels and all(level in pooled for level in every):  # what MultiLevelNet.features computes
                    pooled[ALL_LEVELS] = torch.cat([pooled[level] for level in every] + [pooled[None]], dim=1)
                if shared is None:
                    shared = [level for level in wanted if level in pooled and (
                        level == ALL_LEVELS or _matches(model, level, images, pooled[level]))]
                for level in shared:
                    if level not in writers:
                        writers[level] = stack.enter_context(FeatureWriter(paths[(split, level)], rows))
                    writers[level].add(pooled[level])
    return shared or []


def _matches(model: torch.nn.Module, level: int | None, images: torch.Tensor, pooled: torch.Tensor) -> bool:
    """Does the network truncated at `level` compute `pooled` for `images`?"""
    truncated = copy.deepcopy(model)
    attach_head(truncated, level, 2)
    expected = truncated.forward_head(truncated.forward_features(images), pre_logits=True).float()
    return expected.shape == pooled.shape and torch.allclose(expected, pooled, rtol=1e-3, atol=1e-4)
