"""Profile a dataset for a backbone: the facts the strategy choice rests on.

How much data (per split and class), what the images are like, what is wrong with them
(unreadable files, duplicates, train/val leakage) and how far they are from the
backbone's pretraining data at every depth (timm's coarse groups, the coordinate of
`--cut`), with LogME and k-NN transferability at the same depths. It costs one scan of
the files (`scan_folder`) and one forward pass over (a stratified sample of) the images,
with hooks that accumulate per-channel moments at every BatchNorm input and pool each
group's output. See README, "How it decides", for the method and its calibration.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import time
import types
import typing
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from statistics import median
from typing import Callable, Iterable

import timm
import torch
from torch import nn
from tqdm.auto import tqdm

from autotransfer import __version__
from autotransfer.backbones import BackboneSpec, create_model, get_backbone, on_device
from autotransfer.data import DatasetScan, ImageRecord, SkippedFile, load_rgb, scan_folder
from autotransfer.errors import DataError
from autotransfer.features import cache_dir, cache_path, eval_transform, image_loader, store_features, weights_id
from autotransfer.plan import Plan
from autotransfer.strategies import Preprocessing, coarse_groups
from autotransfer.transferability import constant_logme, knn_accuracy, logme, majority_accuracy

SCHEMA = "autotransfer.profile/1"
DEFAULT_MAX_IMAGES = 1000
KNN_K = 10
GRAY_TOLERANCE = 3 / 255  # largest channel difference of an image still called grayscale
CALIBRATION_VERSION = 2  # 2: computed in channels-last memory (backbones.on_device)


# ---------------------------------------------------------------------------- schema


@dataclass
class Spread:
    min: float
    median: float
    max: float


@dataclass
class SizeStats:
    classes: list[str]
    images: dict[str, int]  # split -> readable images
    per_class: dict[str, dict[str, int]]  # split -> class -> images
    imbalance_ratio: float  # largest / smallest class in train
    train_per_class: Spread  # images per class in train


@dataclass
class ImageStats:
    width: Spread  # over every readable file
    height: Spread
    formats: dict[str, int]
    modes: dict[str, int]
    # over the profiled images as the network sees them (resized, cropped; 0..1 scale)
    grayscale_fraction: float
    channel_mean: list[float]
    channel_std: list[float]


@dataclass
class DuplicateGroup:
    """Files with identical content; `leak` when they sit in more than one split."""

    sha1: str
    paths: list[str]
    splits: list[str]
    classes: list[str]
    leak: bool
    label_conflict: bool


@dataclass
class Quality:
    skipped: list[SkippedFile]  # unreadable, truncated, non-image, placeholder files
    duplicates: list[DuplicateGroup]
    duplicate_files: int  # copies beyond the first of each group
    leaked_files: int  # files of groups that span splits


@dataclass
class Sample:
    images: int  # profiled (forward pass)
    available: int  # readable images in the splits the sample is drawn from
    splits: list[str]  # test/ is never used for the profile's measurements
    stratified: bool  # True when a stratified sample was drawn (available > max_images)
    seed: int


@dataclass
class Depth:
    """One coarse group (stem first): its distance to ImageNet and its transferability."""

    group: int
    module: str  # the module whose output is pooled
    feature_level: int | None  # timm feature_info index of that module, if it is one
    channels: int
    bn_layers: int
    bn_gap: float | None  # mean per-channel KL(data || running stats) over the group's BN inputs
    bn_gap_relative: float | None  # bn_gap / the same gap on the calibration images
    frechet: float | None  # diagonal Frechet distance to the calibration features / their variance
    logme: float
    knn_accuracy: float
    knn_balanced_accuracy: float


@dataclass
class HeadStats:
    """The pretrained head's predictions on the data: confident on familiar images."""

    classes: int
    entropy: float  # mean entropy / log(classes): 0 certain, 1 uniform
    energy: float  # mean -logsumexp(logits): lower is more familiar (Liu et al. 2020)
    max_probability: float


@dataclass
class Baselines:
    """Trivial values to read LogME and k-NN against."""

    knn_accuracy: float  # always the majority class
    knn_balanced_accuracy: float  # 1 / classes
    logme: float  # LogME of a constant feature (class frequencies only)
    k: int


@dataclass
class Calibration:
    source: str
    images: int
    bn_gap: list[float | None]  # per depth: the reference level of bn_gap_relative


@dataclass
class Summary:
    distance: float | None  # see `method`; higher is farther from the pretraining data
    method: str  # "bn_gap_relative" | "frechet" | "head_entropy" | "bn_gap" | "none"
    best_knn_depth: int
    best_logme_depth: int
    notes: list[str]


@dataclass
class Profile:
    schema: str
    root: str
    layout: str
    backbone: str
    architecture: str
    weights: str
    image_size: int
    size: SizeStats
    images: ImageStats
    quality: Quality
    sample: Sample
    depths: list[Depth]
    head: HeadStats | None
    baselines: Baselines
    calibration: Calibration | None
    summary: Summary
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DataError(
                f"profile has schema {found!r}; expected {SCHEMA!r}; "
                "run `autotransfer profile DATA` again to write a current one"
            )
        return _decode(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            return cls.from_json(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(f"profile '{path}' not found; write one with `autotransfer profile DATA`") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"profile '{path}' is not valid JSON ({exc}); write it again") from None


def _decode(kind, value):
    """JSON value -> `kind` (dataclasses, list[X], dict[str, X], X | None, scalars)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value) if len(inner) == 1 else value
    if origin is list:
        return [_decode(args[0], v) for v in value]
    if origin is dict:
        return {k: _decode(args[1], v) for k, v in value.items()}
    if is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _decode(hints[f.name], value[f.name]) for f in fields(kind) if f.name in value})
    if kind is float and isinstance(value, int):
        return float(value)
    return value


# ------------------------------------------------------------------ what is measured


def _spread(values: Iterable[float]) -> Spread:
    values = list(values)
    if not values:
        return Spread(0, 0, 0)
    return Spread(min(values), float(median(values)), max(values))


def size_stats(scan: DatasetScan) -> SizeStats:
    per_class = {
        split: {name: sum(r.label == i for r in records) for i, name in enumerate(scan.classes)}
        for split, records in scan.splits.items()
    }
    train = list(per_class["train"].values())
    return SizeStats(
        classes=list(scan.classes),
        images={split: len(records) for split, records in scan.splits.items()},
        per_class=per_class,
        imbalance_ratio=max(train) / max(min(train), 1),
        train_per_class=_spread(train),
    )


def quality(scan: DatasetScan) -> Quality:
    """Skipped files and exact duplicates (sha1 of the bytes, from the scan), by path."""
    by_hash: dict[str, list[tuple[str, ImageRecord]]] = defaultdict(list)
    for split, records in scan.splits.items():
        for record in records:
            by_hash[record.sha1].append((split, record))
    groups = []
    for sha1, members in by_hash.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: m[1].path)
        splits = [split for split, _ in members]
        groups.append(DuplicateGroup(
            sha1=sha1,
            paths=[r.path for _, r in members],
            splits=splits,
            classes=[scan.classes[r.label] for _, r in members],
            leak=len(set(splits)) > 1,
            label_conflict=len({r.label for _, r in members}) > 1,
        ))
    groups.sort(key=lambda g: (not g.leak, g.paths[0]))
    return Quality(
        skipped=list(scan.skipped),
        duplicates=groups,
        duplicate_files=sum(len(g.paths) - 1 for g in groups),
        leaked_files=sum(len(g.paths) for g in groups if g.leak),
    )


def stratified_sample(records: list[ImageRecord], max_images: int, seed: int) -> list[ImageRecord]:
    """At most `max_images` records, each class in proportion (at least 2 where it has them).

    The input order is kept, so an unsampled profile sees the records as `fit` does.
    """
    if len(records) <= max_images:
        return list(records)
    by_class: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in records:
        by_class[record.label].append(record)
    share = {c: max_images * len(m) / len(records) for c, m in by_class.items()}
    quota = {c: min(len(by_class[c]), max(2, int(s))) for c, s in share.items()}
    for c in sorted(share, key=lambda c: share[c] - int(share[c]), reverse=True):
        if sum(quota.values()) >= max_images:
            break
        quota[c] = min(len(by_class[c]), quota[c] + 1)
    rng = random.Random(seed)
    chosen = {
        r.path for c in sorted(by_class) for r in rng.sample(sorted(by_class[c], key=lambda r: r.path), quota[c])
    }
    return [r for r in records if r.path in chosen]


class _Moments:
    """Per-channel count, mean and M2 in float64, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """`x`: (B, C, ...) values; moments over every dimension but C.

        Per image and channel: the mean and the mean square (one fused reduction each,
        no temporary copy; torch.var_mean is several times slower on CPU). Then the law
        of total variance in float64: within-image plus between-image variance.
        """
        x = x.float()
        spatial = tuple(range(2, x.dim()))
        positions = math.prod(x.shape[2:])
        if spatial:
            means = x.mean(spatial).double()
            squares = torch.linalg.vector_norm(x, dim=spatial).double().square() / positions
        else:
            means, squares = x.double(), x.double().square()
        mean = means.mean(0)
        var = (squares - means.square()).clamp_min(0).mean(0) + (means - mean).square().mean(0)
        n = x.shape[0] * positions
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, var * n
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.n * n / total)
        self.n = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)


def _is_bn(module: nn.Module) -> bool:
    """BatchNorm of any flavour with stored running statistics (timm's BatchNormAct too)."""
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    return isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and hasattr(module, "eps")


def _bn_layers(model: nn.Module, groups) -> list[tuple[str, nn.Module, int]]:
    """(name, module, group) of every BatchNorm; one without parameters joins the group
    of the nearest layer before it."""
    group_of = {m: g for g, group in enumerate(groups) for m in group.modules}
    found, current = [], None
    for name, module in model.named_modules():
        current = group_of.get(name, current)
        if _is_bn(module) and current is not None:
            found.append((name, module, group_of.get(name, current)))
    return found


def _group_outputs(model: nn.Module, groups) -> list[tuple[str, int | None]]:
    """For each coarse group, the module whose output is the group's output.

    A timm feature_info module that contains the group's last layer, or follows it
    before the next group starts (e.g. ResNet's act1), wins; else the container shared
    by the whole group (a stage); else the group's last layer in definition order.
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    levels = {info["module"]: i for i, info in enumerate(getattr(model, "feature_info", []))}
    picks = []
    for g, group in enumerate(groups):
        if not group.modules:  # parameters only (e.g. a position embedding): no output of its own
            picks.append(picks[-1] if picks else (next(iter(order)), None))
            continue
        last = max(group.modules, key=lambda m: order.get(m, -1))
        later = [m for other in groups[g + 1:] for m in other.modules]
        end = min((order[m] for m in later if m in order), default=len(order))
        pick = None
        for name, level in levels.items():
            if name not in order or any(m == name or m.startswith(name + ".") for m in later):
                continue
            if last.startswith(name + ".") or order[last] < order[name] < end:
                pick = (name, level)
        if pick is None:
            prefix = os.path.commonprefix([m.split(".") for m in group.modules])
            name = ".".join(prefix)
            pick = (name, None) if name in order and name else (last, None)
        picks.append(pick)
    return picks


def _pool(output, channels_last: bool) -> torch.Tensor:
    """(B, C) from a module output: spatial mean of maps, mean over tokens."""
    if isinstance(output, (tuple, list)):
        output = next(o for o in output if isinstance(o, torch.Tensor))
    if output.dim() == 4:
        return output.mean((1, 2) if channels_last else (2, 3))
    if output.dim() == 3:
        return output.mean(1)
    return output.flatten(1)


class _Probe:
    """Hooks that turn forward passes into BN-input moments and pooled features per depth."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.groups = coarse_groups(model)
        self.outputs = _group_outputs(model, self.groups)
        self.bns = {
            name: (module, g) for name, module, g in _bn_layers(model, self.groups)
        }
        self.moments = {name: _Moments() for name in self.bns}
        self.pooled: list[list[torch.Tensor]] = [[] for _ in self.groups]
        self._handles: list = []
        self._channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def __enter__(self) -> "_Probe":
        for name, (module, _) in self.bns.items():
            self._handles.append(module.register_forward_pre_hook(self._bn_hook(name)))
        for g, (name, _) in enumerate(self.outputs[:-1]):  # the top is the head's input
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._pool_hook(g)))
        return self

    def __exit__(self, *_) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _bn_hook(self, name: str) -> Callable:
        def hook(_module, inputs) -> None:
            self.moments[name].add(inputs[0])
        return hook

    def _pool_hook(self, g: int) -> Callable:
        def hook(_module, _inputs, output) -> None:
            self.pooled[g].append(_pool(output, self._channels_last).float().cpu())
        return hook

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pre-logits) of a batch; hooks record everything else on the way."""
        features = self.model.forward_features(images)
        pre_logits = self.model.forward_head(features, pre_logits=True)
        logits = self.model.forward_head(features)
        self.pooled[-1].append(pre_logits.float().cpu())
        return logits, pre_logits

    def features(self) -> list[torch.Tensor]:
        return [torch.cat(p) if p else torch.empty(0) for p in self.pooled]

    def bn_gaps(self) -> list[float | None]:
        """Per group: mean over its BN inputs of the mean per-channel Gaussian KL."""
        per_group: list[list[float]] = [[] for _ in self.groups]
        for name, (module, g) in self.bns.items():
            moments = self.moments[name]
            if moments.mean is None:
                continue
            per_group[g].append(float(gaussian_kl(
                moments.mean, moments.var, module.running_mean, module.running_var, module.eps
            ).mean()))
        return [sum(v) / len(v) if v else None for v in per_group]

    def bn_layers(self) -> list[int]:
        counts = Counter(g for _, g in self.bns.values())
        return [counts.get(g, 0) for g in range(len(self.groups))]


def gaussian_kl(
    mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-channel KL(N(mean, var + eps) || N(ref_mean, ref_var + eps)), float64.

    eps is BatchNorm's own: the variance it divides by, so a channel dead on both sides
    is no distance at all.
    """
    var = var.double() + eps
    ref_var = ref_var.double().to(var.device) + eps
    ref_mean = ref_mean.double().to(var.device)
    return 0.5 * (torch.log(ref_var / var) + (var + (mean.double() - ref_mean) ** 2) / ref_var - 1.0)


def frechet_diagonal(
    mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor
) -> float:
    """Frechet distance of diagonal Gaussians, over the reference's total variance (scale-free)."""
    mean, var, ref_mean, ref_var = (t.double() for t in (mean, var, ref_mean, ref_var))
    distance = (mean - ref_mean).square().sum() + (var.sqrt() - ref_var.sqrt()).square().sum()
    return float(distance / ref_var.sum().clamp_min(1e-12))


class _PixelMoments:
    """Channel mean/std (0..1) and grayscale count of input batches, on every 4th pixel."""

    def __init__(self, prep: Preprocessing) -> None:
        self.norm_mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        self.norm_std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self.sum = torch.zeros(3, dtype=torch.float64)
        self.sq = torch.zeros(3, dtype=torch.float64)
        self.pixels = self.images = self.gray = 0

    def add(self, images: torch.Tensor) -> None:
        x = images[:, :, ::2, ::2] * self.norm_std + self.norm_mean  # undo the normalisation
        self.sum += x.sum((0, 2, 3)).double()
        self.sq += x.square().sum((0, 2, 3)).double()
        self.pixels += x[:, 0].numel()
        self.images += x.shape[0]
        spread = torch.maximum((x[:, 0] - x[:, 1]).abs(), (x[:, 1] - x[:, 2]).abs()).amax((1, 2))
        self.gray += int((spread <= GRAY_TOLERANCE).sum())

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.pixels, 1)

    @property
    def std(self) -> torch.Tensor:
        return (self.sq / max(self.pixels, 1) - self.mean.square()).clamp_min(0).sqrt()


class _HeadMoments:
    """Running means of the pretrained head's entropy, energy and top probability."""

    def __init__(self) -> None:
        self.n = self.classes = 0
        self.entropy = self.energy = self.max_prob = 0.0

    def add(self, logits: torch.Tensor) -> None:
        logits = logits.float()
        log_p = logits.log_softmax(1)
        self.classes = logits.shape[1]
        self.n += logits.shape[0]
        self.entropy += float(-(log_p.exp() * log_p).sum()) / math.log(max(self.classes, 2))
        self.energy += float(-torch.logsumexp(logits, 1).sum())
        self.max_prob += float(log_p.max(1).values.exp().sum())

    def result(self) -> HeadStats | None:
        if not self.n:
            return None
        return HeadStats(self.classes, self.entropy / self.n, self.energy / self.n, self.max_prob / self.n)


# --------------------------------------------------------------------- calibration


def _builtin_photos() -> list:
    """Everyday colour photographs shipped with scikit-image / scikit-learn, as arrays."""
    photos = []
    try:
        import skimage.data as sk

        photos += [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket(), sk.stereo_motorcycle()[0]]
    except Exception:  # optional: no scikit-image, or an older one
        pass
    try:
        from sklearn.datasets import load_sample_images

        photos += list(load_sample_images().images)
    except Exception:
        pass
    return [p[..., :3] for p in photos]


def calibration_images(source: str | Path | None = None, crops: int = 12, limit: int = 256) -> tuple[str, list]:
    """(source id, PIL images) of near-ImageNet photos that set the reference level.

    Default: 12 seeded random crops (30-100 % of the area) of each of the seven colour
    photos bundled with scikit-image and scikit-learn. A folder: up to `limit` of its
    images (sorted by path), e.g. a few hundred ImageNet validation images.
    """
    from PIL import Image

    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(f"calibration folder {folder} not found; pass a folder of near-ImageNet photos")
        images, digest = [], hashlib.sha1()
        for path in sorted(p for p in folder.rglob("*") if p.is_file())[:limit * 2]:
            try:
                images.append(load_rgb(path))
            except (OSError, SyntaxError, ValueError):
                continue
            digest.update(path.read_bytes())
            if len(images) == limit:
                break
        if len(images) < 8:
            raise DataError(
                f"calibration folder {folder} has {len(images)} readable images; need at least 8 photos"
            )
        return f"folder:{folder.resolve()}:{digest.hexdigest()[:12]}", images
    photos = _builtin_photos()
    if not photos:
        return "", []
    generator = torch.Generator().manual_seed(0)
    images = []
    for photo in photos:
        image = Image.fromarray(photo)
        width, height = image.size
        for _ in range(crops):
            side = math.sqrt(0.3 + 0.7 * float(torch.rand(1, generator=generator)))
            w, h = int(width * side), int(height * side)
            x0 = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            y0 = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            images.append(image.crop((x0, y0, x0 + w, y0 + h)))
    return f"builtin-photos/{len(photos)}x{crops}", images


def _folder_id(folder: Path) -> str:
    """Changes when any file of the folder is added, removed or rewritten."""
    digest = hashlib.sha1(str(folder.resolve()).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _calibration_dir() -> Path:
    return cache_dir().parent / "calibration"


@torch.inference_mode()
def calibrate(
    model: nn.Module, prep: Preprocessing, weights_id: str, architecture: str,
    source: str | Path | None = None, batch_size: int = 32,
) -> dict | None:
    """The reference per depth (BN gap, pooled-feature moments) on calibration images.

    Cached per backbone, weights, preprocessing and calibration source: it is a property
    of the backbone, computed once. None when no calibration images are available.
    """
    folder_id = _folder_id(Path(source)) if source is not None else "builtin"
    blob = json.dumps([CALIBRATION_VERSION, architecture, weights_id, asdict(prep), folder_id])
    path = _calibration_dir() / f"{hashlib.sha1(blob.encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(cached, dict) and {"bn_gap", "feature_mean", "feature_var"} <= cached.keys():
                return cached
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
        path.unlink(missing_ok=True)
    source_id, images = calibration_images(source)
    if not images:
        return None
    transform = eval_transform(prep)
    model.eval()
    with _Probe(model) as probe:
        for start in range(0, len(images), batch_size):
            probe.forward(torch.stack([transform(im) for im in images[start:start + batch_size]]))
    feats = probe.features()
    reference = {
        "source": source_id,
        "images": len(images),
        "bn_gap": [float("nan") if g is None else g for g in probe.bn_gaps()],
        "feature_mean": [f.double().mean(0) for f in feats],
        "feature_var": [f.double().var(0, correction=0) for f in feats],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(reference, tmp)
    tmp.replace(path)
    return reference


# ------------------------------------------------------------------------ the profile


def _classifier_model(spec: BackboneSpec, weights: str, seed: int) -> nn.Module:
    """The backbone with its pretraining head (ImageNet's 1000 classes for most)."""
    cfg = timm.models.get_pretrained_cfg(spec.architecture)
    n_classes = getattr(cfg, "num_classes", None) or 1000
    torch.manual_seed(seed)
    return on_device(create_model(spec, weights, num_classes=n_classes).eval(), "cpu")


def _store_top_features(
    scan: DatasetScan, prep: Preprocessing, spec: BackboneSpec, wid: str,
    sampled: list[ImageRecord], pre_logits: torch.Tensor,
) -> bool:
    """Hand the top features to the feature cache `fit` reads, when whole splits were seen."""
    start, stored = 0, False
    for split in ("train", "val"):
        records = scan.splits.get(split, [])
        chunk = sampled[start:start + len(records)]
        if [r.path for r in chunk] != [r.path for r in records]:
            return stored
        path = cache_path(spec.architecture, wid, None, prep, scan.content_hash(split))
        if not path.is_file():
            store_features(path, pre_logits[start:start + len(records)])
            stored = True
        start += len(records)
    return stored


def _depths(
    probe: _Probe, feats: list[torch.Tensor], labels: torch.Tensor, reference: dict | None, k: int
) -> list[Depth]:
    """Distance and transferability at every coarse group, from what the probe recorded."""
    gaps, bn_layers = probe.bn_gaps(), probe.bn_layers()
    depths = []
    for g, ((module, level), f) in enumerate(zip(probe.outputs, feats)):
        ref_gap = reference["bn_gap"][g] if reference else None
        relative = gaps[g] / ref_gap if gaps[g] is not None and ref_gap and ref_gap > 0 else None
        frechet = None
        if reference is not None:
            frechet = frechet_diagonal(
                f.double().mean(0), f.double().var(0, correction=0),
                reference["feature_mean"][g], reference["feature_var"][g],
            )
        acc, balanced = knn_accuracy(f, labels, k)
        depths.append(Depth(
            group=g, module=module if g < len(feats) - 1 else f"{module} (pre-logits)",
            feature_level=level, channels=int(f.shape[1]), bn_layers=bn_layers[g],
            bn_gap=gaps[g], bn_gap_relative=relative, frechet=frechet,
            logme=logme(f, labels), knn_accuracy=acc, knn_balanced_accuracy=balanced,
        ))
    return depths


PROFILE_FILE = "profile.json"
PROFILES_DIR = "profiles"


def save_profiles(profiles: list[Profile], run_dir: Path) -> None:
    """RUN/profile.json is the leading backbone's profile (the one the rules led with);
    with several candidates every one is also in RUN/profiles/<backbone>.json."""
    profiles[0].save(run_dir / PROFILE_FILE)
    if len(profiles) > 1:
        (run_dir / PROFILES_DIR).mkdir(exist_ok=True)
        for profile in profiles:
            profile.save(run_dir / PROFILES_DIR / f"{profile.backbone}.json")


def load_profile(run_dir: Path, backbone: str | None) -> Profile | None:
    """The profile of `backbone` in RUN (that of the leading backbone if None), if any."""
    for path in (run_dir / PROFILES_DIR / f"{backbone}.json", run_dir / PROFILE_FILE):
        if path.is_file():
            profile = Profile.load(path)
            if backbone is None or profile.backbone == backbone:
                return profile
    return None


def profile_dataset(
    data: str | Path,
    backbone: str = "efficientnet_lite0",
    weights: str = "pretrained",
    max_images: int = DEFAULT_MAX_IMAGES,
    image_size: int | None = None,
    calibration: str | Path | None = None,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    k: int = KNN_K,
    progress: bool = True,
    scan: DatasetScan | None = None,
) -> Profile:
    """Scan DATA (unless `scan` is given), run the backbone once over (a stratified sample
    of) train+val, measure."""
    start = time.perf_counter()
    if max_images < 2:
        raise DataError(f"max_images must be at least 2, but got {max_images}")
    scan = scan or scan_folder(data, val_fraction, seed)
    spec = get_backbone(backbone)
    prep = Preprocessing.for_plan(spec, Plan(backbone, image_size=image_size, weights=weights))
    model = _classifier_model(spec, weights, seed)
    wid = weights_id(spec, weights, seed)

    splits = [s for s in ("train", "val") if s in scan.splits]
    pool = [r for s in splits for r in scan.splits[s]]
    sampled = stratified_sample(pool, max_images, seed)
    reference = calibrate(model, prep, wid, spec.architecture, calibration, batch_size)

    pixels, head = _PixelMoments(prep), _HeadMoments()
    loader = image_loader(sampled, eval_transform(prep), batch_size)
    bar = tqdm(total=len(sampled), desc="profile", unit="img", disable=not progress, leave=False)
    with torch.inference_mode(), _Probe(model) as probe:
        for images, _ in loader:
            pixels.add(images)
            logits, _ = probe.forward(images)
            head.add(logits)
            bar.update(images.shape[0])
    bar.close()
    n = len(sampled)
    labels = torch.tensor([r.label for r in sampled], dtype=torch.long)
    feats = probe.features()
    depths = _depths(probe, feats, labels, reference, k)

    records = [r for rs in scan.splits.values() for r in rs]
    image_stats = ImageStats(
        width=_spread(r.width for r in records),
        height=_spread(r.height for r in records),
        formats=dict(Counter(r.format for r in records).most_common()),
        modes=dict(Counter(r.mode for r in records).most_common()),
        grayscale_fraction=pixels.gray / max(pixels.images, 1),
        channel_mean=[round(float(v), 6) for v in pixels.mean],
        channel_std=[round(float(v), 6) for v in pixels.std],
    )
    n_labels = len(scan.classes)
    baselines = Baselines(majority_accuracy(labels), 1.0 / n_labels, constant_logme(labels), max(1, min(k, n - 1)))
    calibration_info = None
    if reference is not None:
        calibration_info = Calibration(
            reference["source"], reference["images"],
            [None if math.isnan(v) else v for v in reference["bn_gap"]],
        )
    sample = Sample(n, len(pool), splits, len(sampled) < len(pool), seed)
    size, qual = size_stats(scan), quality(scan)

    if weights != "random" and not sample.stratified:
        _store_top_features(scan, prep, spec, wid, sampled, feats[-1])

    head_stats = head.result()
    summary = _summarise(depths, head_stats, size, image_stats, qual, sample, calibration_info)
    return Profile(
        schema=SCHEMA, root=str(data), layout=scan.layout, backbone=backbone,
        architecture=spec.architecture, weights=weights, image_size=prep.input_size,
        size=size, images=image_stats, quality=qual, sample=sample, depths=depths, head=head_stats,
        baselines=baselines, calibration=calibration_info, summary=summary,
        seconds=round(time.perf_counter() - start, 2),
        versions={"autotransfer": __version__, "torch": torch.__version__, "timm": timm.__version__,
                  "python": platform.python_version()},
    )


def _geometric_mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _summarise(
    depths: list[Depth], head: HeadStats | None, size: SizeStats, images: ImageStats,
    qual: Quality, sample: Sample, calibration: Calibration | None,
) -> Summary:
    """One distance and the findings worth a sentence."""
    relative = [d.bn_gap_relative for d in depths if d.bn_gap_relative is not None]
    if relative:
        distance, method = _geometric_mean(relative), "bn_gap_relative"
    elif any(d.frechet is not None for d in depths):
        distance, method = _geometric_mean([d.frechet for d in depths]), "frechet"
    elif any(d.bn_gap is not None for d in depths):
        distance, method = _geometric_mean([d.bn_gap for d in depths]), "bn_gap"
    elif head is not None:
        distance, method = head.entropy, "head_entropy"
    else:
        distance, method = None, "none"
    notes = []
    if sample.stratified:
        notes.append(
            f"sampled {sample.images} of {sample.available} images of {'+'.join(sample.splits)}, "
            f"stratified by class (seed {sample.seed}); sizes and quality checks cover every file"
        )
    if calibration is None:
        notes.append(
            "no calibration images (install scikit-image or pass --calibration DIR): "
            "distances are not relative to a reference level"
        )
    if size.imbalance_ratio >= 2:
        notes.append(f"classes are imbalanced: largest/smallest train class = {size.imbalance_ratio:.1f}")
    if images.grayscale_fraction >= 0.5:
        notes.append(f"{images.grayscale_fraction:.0%} of the profiled images are grayscale")
    if images.width.median < 64 or images.height.median < 64:
        notes.append(
            f"small images (median {images.width.median:g}x{images.height.median:g} px) "
            "are upsampled for the backbone"
        )
    if qual.skipped:
        notes.append(f"{len(qual.skipped)} file(s) skipped as unusable")
    if qual.leaked_files:
        notes.append(f"{qual.leaked_files} files are identical across splits (leakage)")
    elif qual.duplicates:
        notes.append(f"{qual.duplicate_files} exact duplicate file(s)")
    if any(g.label_conflict for g in qual.duplicates):
        notes.append("identical files carry different labels")
    return Summary(
        distance=distance,
        method=method,
        best_knn_depth=max(depths, key=lambda d: d.knn_accuracy).group,
        best_logme_depth=max(depths, key=lambda d: d.logme).group,
        notes=notes,
    )


# --------------------------------------------------------------------------- display


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_profile(profile: Profile, max_listed: int = 10) -> str:
    """The terminal summary: size, images, quality (by path), per-depth curves, verdicts."""
    p, size, img, q = profile, profile.size, profile.images, profile.quality
    lines = []
    splits = ", ".join(f"{s} {n}" for s, n in size.images.items())
    lines.append(f"{p.root}: {len(size.classes)} classes ({', '.join(size.classes[:8])}"
                 f"{', ...' if len(size.classes) > 8 else ''}); images: {splits}")
    tpc = size.train_per_class
    lines.append(f"train images per class: min {tpc.min:g}, median {tpc.median:g}, max {tpc.max:g} "
                 f"(imbalance {size.imbalance_ratio:.1f})")
    formats = ", ".join(f"{k} {v}" for k, v in img.formats.items())
    lines.append(
        f"image size: width {img.width.min:g}/{img.width.median:g}/{img.width.max:g}, height "
        f"{img.height.min:g}/{img.height.median:g}/{img.height.max:g} (min/median/max); {formats}"
    )
    lines.append(
        f"grayscale {img.grayscale_fraction:.0%}; channel mean {_join(img.channel_mean)}, "
        f"std {_join(img.channel_std)} (0..1, as the network sees them)"
    )
    if q.skipped:
        lines.append(f"skipped {len(q.skipped)} file(s):")
        lines += [f"  {s.path}: {s.reason}" for s in q.skipped[:max_listed]]
    else:
        lines.append("skipped files: none")
    if q.duplicates:
        leaks = [g for g in q.duplicates if g.leak]
        lines.append(f"exact duplicates: {len(q.duplicates)} group(s), {q.duplicate_files} extra file(s); "
                     f"{len(leaks)} group(s) across splits (leakage)")
        for g in q.duplicates[:max_listed]:
            tag = "LEAK " if g.leak else ""
            tag += "LABELS DIFFER " if g.label_conflict else ""
            lines.append(f"  {tag}" + " = ".join(f"{path} [{s}]" for path, s in zip(g.paths, g.splits)))
    else:
        lines.append("exact duplicates: none")
    s = p.sample
    lines.append(
        f"profiled {s.images} images of {'+'.join(s.splits)}"
        + (f" (stratified sample of {s.available})" if s.stratified else " (all)")
        + f" with {p.backbone} ({p.weights}) at {p.image_size} px in {p.seconds:.0f} s"
    )
    lines.append("")
    lines.append(f"{'depth':>5} {'module':<28} {'lvl':>3} {'ch':>5} {'BN gap':>7} {'rel':>6} "
                 f"{'Frechet':>7} {'LogME':>7} {'kNN':>6} {'bal':>6}  relative BN gap")
    top = max((d.bn_gap_relative or 0 for d in p.depths), default=0) or 1
    for d in p.depths:
        bar = "#" * round(20 * (d.bn_gap_relative or 0) / top) if d.bn_gap_relative else ""
        lines.append(
            f"{d.group:>5} {d.module[:28]:<28} {_f(d.feature_level, 'd'):>3} {d.channels:>5} "
            f"{_f(d.bn_gap, '.3f'):>7} {_f(d.bn_gap_relative, '.2f'):>6} {_f(d.frechet, '.3f'):>7} "
            f"{d.logme:>7.3f} {d.knn_accuracy:>6.3f} {d.knn_balanced_accuracy:>6.3f}  {bar}"
        )
    b = p.baselines
    lines.append(f"{'':>5} {'baseline (trivial)':<28} {'':>3} {'':>5} {'':>7} {'':>6} {'':>7} "
                 f"{b.logme:>7.3f} {b.knn_accuracy:>6.3f} {b.knn_balanced_accuracy:>6.3f}")
    lines.append(f"(kNN: leave-one-out, k={b.k}; baselines: LogME of a constant feature, majority class, 1/classes)")
    if p.head:
        lines.append(f"pretrained head ({p.head.classes} classes): entropy {p.head.entropy:.3f} (0 sure, 1 uniform), "
                     f"energy {p.head.energy:.2f}, max probability {p.head.max_probability:.3f}")
    sm = p.summary
    explain = {
        "bn_gap_relative": "geometric mean over depths of the relative BN gap; 1 = as near as the calibration photos",
        "frechet": "geometric mean over depths of the Frechet distance to the calibration photos",
        "bn_gap": "geometric mean over depths of the raw BN gap (no calibration)",
        "head_entropy": "entropy of the pretrained head",
        "none": "nothing to measure it with",
    }[sm.method]
    lines.append(f"distance to the pretraining data: {_f(sm.distance, '.2f')} ({explain})")
    lines.append(f"best depth: kNN {sm.best_knn_depth}, LogME {sm.best_logme_depth}")
    lines += [f"note: {n}" for n in sm.notes]
    return "\n".join(lines)


def quality_warnings(qual: Quality, max_listed: int = 10) -> list[str]:
    """The profile's notes that make scores untrustworthy, with their files: copies across
    splits (val or test then scores memory) and copies with different labels. `fit`
    prints them, and needs no profile for it (`quality` reads the scan alone)."""
    lines = []
    leaks = [g for g in qual.duplicates if g.leak]
    conflicts = [g for g in qual.duplicates if g.label_conflict]
    for groups, headline in (
        (leaks, f"{qual.leaked_files} files are identical across splits (leakage); keep one copy"),
        (conflicts, f"identical files carry different labels ({len(conflicts)} group(s)); keep the right one"),
    ):
        if groups:
            lines.append(f"warning: {headline}:")
            lines += ["  " + " = ".join(f"{path} [{split}]" for path, split in zip(g.paths, g.splits))
                      for g in groups[:max_listed]]
            lines += [f"  ... and {len(groups) - max_listed} more group(s)"] if len(groups) > max_listed else []
    return lines


def _join(values: list[float]) -> str:
    return ",".join(f"{v:.3f}" for v in values)
