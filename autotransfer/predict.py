"""Use a finished run: evaluate it on a labelled folder, or predict single images."""

from __future__ import annotations

from pathlib import Path

import torch

from autotransfer.checkpoint import load_model, read_checkpoint
from autotransfer.data import DatasetScan, load_rgb, scan_folder
from autotransfer.errors import DataError
from autotransfer.features import eval_transform, image_loader
from autotransfer.metrics import classification_report
from autotransfer.plan import Plan


def evaluate_folder(run: str | Path, data: str | Path, split: str = "auto") -> dict:
    """Metrics of the RUN's model on a split of DATA (auto: test, else val, else all).

    DATA without val/ gets its val split drawn again with the run's seed and fraction,
    so `--split val` scores the very images `fit` validated on.
    """
    read_checkpoint(run)  # a RUN that is none fails before the data is scanned
    plan = _run_plan(run) if split == "val" else None
    fraction, seed = (plan.val_fraction, plan.seed) if plan else (None, 0)
    scan = scan_folder(data, fraction, seed)
    if split == "auto":
        split = next(s for s in ("test", "val", "train") if s in scan.splits)
    if split not in scan.splits:
        raise DataError(_missing_split(run, data, split, scan))
    report = evaluate_records(run, scan.splits[split], scan.classes, str(data))
    whole = scan.layout == "class-folders" and split == "train"
    return {"split": "all" if whole else split, **report, "skipped": [s.__dict__ for s in scan.skipped]}


def evaluate_records(run: str | Path, records: list, record_classes: list[str], source: str = "the data") -> dict:
    """Metrics of the RUN's model on labelled records whose labels index `record_classes`."""
    model, classes, prep = load_model(run)
    unknown = [c for c in record_classes if c not in classes]
    if unknown:
        raise DataError(
            f"{source} has classes the model does not know ({', '.join(unknown)}); "
            f"the model knows: {', '.join(classes)}"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    remap = torch.tensor([classes.index(c) for c in record_classes])
    logits, labels = [], []
    with torch.inference_mode():
        for images, targets in image_loader(records, eval_transform(prep), 64):
            logits.append(model(images.to(device)).float().cpu())
            labels.append(remap[targets])
    return classification_report(torch.cat(logits), torch.cat(labels), classes)


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


def predict_images(run: str | Path, images: list[Path], top_k: int = 3) -> list[dict]:
    """Top-k classes and probabilities for each image file."""
    model, classes, prep = load_model(run)
    transform = eval_transform(prep)
    results = []
    for path in images:
        try:
            tensor = transform(load_rgb(path)).unsqueeze(0)
        except FileNotFoundError:
            raise DataError(f"image '{path}' not found") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"'{path}' is not a readable image: {exc}") from None
        with torch.inference_mode():
            probs = model(tensor).softmax(dim=1)[0]
        top = probs.topk(min(top_k, len(classes)))
        results.append({
            "image": str(path),
            "top_k": [{"class": classes[i], "probability": float(p)} for p, i in zip(top.values, top.indices)],
        })
    return results
