"""Other libraries' own training, run side by side with autotransfer in `autotransfer bench`.

fastai (the optional extra `pip install 'autotransfer[peers]'`): its documented
quick-start, `vision_learner(dls, "<timm arch>")` then `learn.fine_tune(epochs)` (one
frozen epoch for the new head, then every layer at discriminative learning rates, one
cycle each), with fastai's defaults for everything the bench does not share. What it
shares with every recipe of a cell: the training images (train; the selection split is
fastai's `valid` set, which `fine_tune` only reports on), the image size, the seed, the
epoch count, the batch size and the backbone's weights; it is scored on the same held-out
images.

The weights: fastai asks timm for the architecture with `pretrained=True`, and timm reads
them from a file given as `pretrained_cfg_overlay=dict(file=...)` (a keyword fastai passes
through to `timm.create_model`). The bench writes that file from the backbone's
`BackboneSpec` (a plugin's shipped weights, timm's own, random ones or a state-dict file),
with the spec's mean and std, so fastai normalises as the backbone expects.

fastai is imported inside the functions: without it the bench still runs, and its row
says "not installed".
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

NOT_INSTALLED = "fastai is not installed: pip install 'autotransfer[peers]' (or pip install 'fastai>=2.8')"
FASTAI_TITLE = ("fastai fine_tune (the real library): vision_learner on the timm architecture with the same "
                "weights, Resize + aug_transforms, 1 frozen epoch then {epochs} unfrozen, fastai's default lrs")


def fastai_version() -> str | None:
    """The installed fastai's version, None when it cannot be imported."""
    try:
        import fastai  # noqa: F401
    except ImportError:
        return None
    try:
        return importlib.metadata.version("fastai")
    except importlib.metadata.PackageNotFoundError:
        return getattr(fastai, "__version__", "?")


def timm_weights_file(spec, weights: str, seed: int, path: Path) -> Path:
    """The backbone's weights as a plain timm state dict file (no classifier), for timm's
    `pretrained_cfg_overlay=dict(file=...)`."""
    import torch

    from autotransfer.backbones import create_model

    torch.manual_seed(seed)  # random weights: the same draw for the same seed
    model = create_model(spec, weights, num_classes=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def run_fastai(
    scan, plan, out: Path, heldout: str = "test", log=lambda _: None,
) -> dict:
    """fastai's fine_tune on the cell `scan` with `plan`'s backbone, weights, image size,
    seed, epochs and batch size; one bench row (held-out predictions, accuracy, seconds).

    Raises ImportError (with NOT_INSTALLED) when fastai is missing.
    """
    try:
        from fastai.callback.schedule import fine_tune  # noqa: F401  (patches Learner.fine_tune)
        from fastai.data.block import CategoryBlock, DataBlock
        from fastai.metrics import accuracy
        from fastai.torch_core import set_seed
        from fastai.vision.augment import Resize, aug_transforms
        from fastai.vision.data import ImageBlock
        from fastai.vision.learner import vision_learner
    except ImportError as exc:
        raise ImportError(NOT_INSTALLED) from exc

    from autotransfer.backbones import get_backbone
    from autotransfer.features import loader_workers
    from autotransfer.strategies import Preprocessing

    start = time.perf_counter()
    spec = get_backbone(plan.backbone)
    size = Preprocessing.for_plan(spec, plan).input_size
    weights_file = timm_weights_file(spec, plan.weights, plan.seed, out / "timm_weights.pth")
    classes = list(scan.classes)
    train, val = scan.splits["train"], scan.splits.get("val") or []
    items = [r.path for r in [*train, *val]]
    labels = {r.path: classes[r.label] for r in [*train, *val]}
    n_train = len(train)

    def splitter(_items):
        return list(range(n_train)), list(range(n_train, len(items)))

    def label(path):
        return labels[path]

    set_seed(plan.seed, reproducible=True)
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=classes)), get_y=label, splitter=splitter,
        item_tfms=Resize(size), batch_tfms=aug_transforms(size=size, min_scale=0.75),
    )
    # fastai drops the last partial training batch: fewer images than a batch would train nothing
    batch = max(2, min(plan.batch_size, n_train))
    dls = block.dataloaders(items, bs=batch, num_workers=loader_workers(len(items)), path=out)
    overlay = dict(file=str(weights_file), mean=tuple(spec.mean), std=tuple(spec.std), num_classes=0)
    learn = vision_learner(dls, spec.architecture, pretrained=True, metrics=accuracy, path=out,
                           pretrained_cfg_overlay=overlay)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(plan.epochs)
        train_seconds = time.perf_counter() - start
        values = [list(v) for v in learn.recorder.values]  # last cycle, per epoch: train loss, valid loss, accuracy
        test_items = [r.path for r in scan.splits[heldout]]
        probabilities, _ = learn.get_preds(dl=dls.test_dl(test_items, num_workers=loader_workers(len(test_items))))
    vocab = list(dls.vocab)
    predicted = [classes.index(vocab[i]) for i in probabilities.argmax(1).tolist()]
    targets = [r.label for r in scan.splits[heldout]]
    seconds = time.perf_counter() - start
    from autotransfer.references import _macro_f1

    return {
        "heldout_accuracy": sum(p == t for p, t in zip(predicted, targets)) / len(targets),
        "heldout_macro_f1": _macro_f1(predicted, targets, len(classes)),
        "heldout_predicted": predicted,
        "val_accuracy": float(values[-1][2]) if values and val else None,
        "epochs": {"frozen": 1, "unfrozen": plan.epochs}, "image_size": size, "batch_size": batch,
        "fastai": fastai_version(), "seconds": round(seconds, 2), "train_seconds": round(train_seconds, 2),
    }
