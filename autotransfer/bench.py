"""`autotransfer bench`: autotransfer's choice against independent references, the real
fastai, the recipes users pick by hand and the per-depth grid, on each dataset at several
training-set sizes.

Each cell is one dataset at one size (a seeded, stratified subsample of the labelled
training images). Its rows, all on the same images, image size, seed and epochs:

- the **reference**: a scikit-learn linear probe at every depth the grid uses and on every
  level at once (`autotransfer.references`: standardised features, multinomial
  LogisticRegression, C by stratified k-fold CV on every labelled image, refit on all);
- the **peer**: the real fastai `vision_learner` + `fine_tune` (`autotransfer.peers`; the
  row says "not installed" without the `peers` extra);
- the **fixed recipes** users pick from the guides, and the **grid** (frozen at each depth,
  LP-FT from each cut and full), each through `train.fit`;
- **autotransfer** itself (profile -> rules -> search -> adopt, `autotransfer.selector`),
  with `fit`'s default budget: a count of trials, no wall clock.

Held-out images judge every row and nothing selects on them: test/ where the dataset has
one; else its val/, all of it (capped only in --quick, which says so); else a stratified
quarter of the class folders. Without a val/ beside test/, the selection split is drawn
from the cell's training images as `fit` draws it (`data.stratified_split`, `val_drawn`).
Regret is in accuracy points below the cell's best row (every row but autotransfer), with
the paired standard error of that difference on the held-out images; a difference counts
as a win or a loss only beyond it.

Output in OUT: bench.json (everything, with per-image held-out predictions), bench.md
(tables), bench.html (tables and plots, self-contained), and runs/ with each recipe's RUN
folder (models deleted unless kept).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import platform
import random
import shutil
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Callable, Collection

from autotransfer import __version__
from autotransfer.data import DatasetScan, ImageRecord, scan_folder, stratified_split
from autotransfer.errors import DataError, UsageError
from autotransfer.features import use_cache
from autotransfer.plan import Plan, describe
from autotransfer.recipes import AUTO, FIXED, GRID, PEER, REFERENCE, Recipe, auto_recipe, fixed_recipes, grid_recipes
from autotransfer.rules import THRESHOLDS, input_size

SCHEMA = "autotransfer.bench/2"
WITHIN_POINTS = 1.0  # issue 4: the selector's pick must be within 1 point of the cell's best
HOLDOUT_FRACTION = 0.25  # class folders only (no val/, no test/): the share held out before anything runs
VAL_FOLDERS = ("val", "valid", "validation")  # what scan_folder reads as val/


@dataclass
class BenchSettings:
    """What every recipe shares in one bench run (all of it is written to the report)."""

    backbone: str = "efficientnet_lite0"
    weights: str = "pretrained"
    image_size: int | None = None  # None: what fit chooses per dataset (128 px for small images, else the backbone's)
    epochs: int = 6
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    trials: int | None = None  # autotransfer's search; None: fit's default (a count of trials, no clock)
    max_images: int = 400  # images the selector's profile forwards
    # Caps, as images per class on average (cap x classes in all, class proportions kept):
    train_cap: int | None = None  # what size "all" keeps of train
    val_cap: int | None = None  # applied to a dataset's own val/ (beside a test/) before anything runs
    test_cap: int | None = None  # applied to the held-out images
    levels: list[int | None] | None = None  # frozen grid and probes: None = every feature level + top
    cuts: list[int] | None = None  # fine-tuned grid: None = every cut (quick: the middle one)
    coarse_cuts: bool = False  # one cut in the middle of the groups (and full)
    peers: bool = True  # run the real fastai beside the recipes (its row says when it is not installed)
    quick: bool = False
    keep_models: bool = False

    @classmethod
    def quick_mode(cls, **overrides) -> "BenchSettings":
        """CPU-sized: 64 px, 2 fine-tuning epochs, hard caps, coarse grid; autotransfer
        searches within `fit`'s default budget, as a user's run would."""
        base = dict(
            image_size=64, epochs=2, max_images=200,
            train_cap=100, val_cap=50, test_cap=200, coarse_cuts=True, quick=True,
        )
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def full_mode(cls, **overrides) -> "BenchSettings":
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        size = f"{self.image_size} px" if self.image_size else f"what fit chooses ({THRESHOLDS.small_image_size} px for images under {THRESHOLDS.small_image_side} px, else the backbone's)"
        caps = []
        if self.train_cap:
            caps.append(f"size 'all' = at most {self.train_cap} train images/class on average")
        if self.val_cap:
            caps.append(f"a dataset's own val/ capped at {self.val_cap}/class on average")
        if self.test_cap:
            caps.append(f"held-out images capped at {self.test_cap}/class on average")
        if caps:
            caps[-1] += " (stratified, class proportions kept)"
        grid = "the middle cut (half the groups) and full" if self.coarse_cuts and self.cuts is None else (
            f"cuts {self.cuts} and full" if self.cuts is not None else "every cut and full")
        levels = "every feature level and the top" if self.levels is None else f"levels {self.levels}"
        search = f"{self.trials} trials" if self.trials else "fit's default budget (a count of trials, no clock)"
        return (
            f"{'quick' if self.quick else 'full'} mode: {self.backbone} ({self.weights} weights), {size}, "
            f"{self.epochs} fine-tuning epoch{'s' if self.epochs != 1 else ''}, lr {self.lr:g}, batch {self.batch_size}, seed {self.seed}; "
            + (", ".join(caps) + "; " if caps else "every held-out image; ")
            + f"grid: frozen at {levels}, fine-tuned from {grid}; sklearn probe at the same depths and all "
            f"levels at once; {'real fastai fine_tune' if self.peers else 'no fastai'}; autotransfer: {search}, "
            f"profile of at most {self.max_images} images"
        )

    def tag(self) -> str:
        """The settings in a few words, for every table's title."""
        size = f"{self.image_size} px" if self.image_size else "fit's px"
        caps = [f"'all' <= {self.train_cap}/class"] if self.train_cap else []
        caps += [f"held-out <= {self.test_cap}/class"] if self.test_cap else []
        return (f"{'QUICK' if self.quick else 'full'}: {size}, {self.epochs} epoch{'s' if self.epochs != 1 else ''}, seed {self.seed}"
                + (", " + ", ".join(caps) if caps else ""))


# ----------------------------------------------------------------------------- data


def parse_sizes(values: list[str] | tuple[str, ...]) -> list[int | None]:
    """'10', '50', 'all' -> 10, 50, None (None: the whole training split)."""
    sizes: list[int | None] = []
    for value in values:
        text = str(value).strip().lower()
        if text == "all":
            size = None
        elif text.isdigit() and int(text) >= 1:
            size = int(text)
        else:
            raise DataError(f"--per-class must be a positive number or 'all', but got '{value}'")
        if size not in sizes:
            sizes.append(size)
    return sizes


def subsample(scan: DatasetScan, per_class: int | None, seed: int, split: str = "train") -> DatasetScan:
    """A copy of `scan` whose `split` keeps at most `per_class` images of each class.

    Seeded and stratified: each class is shuffled once by `seed` and its first
    `per_class` images are kept, so smaller sizes are subsets of larger ones. The other
    splits are the same lists, untouched. Record order is kept (label, then path).
    """
    if per_class is None or split not in scan.splits:
        return scan
    if per_class < 1:
        raise DataError(f"per-class size must be at least 1, but got {per_class}")
    by_class: dict[int, list[ImageRecord]] = defaultdict(list)
    for record in scan.splits[split]:
        by_class[record.label].append(record)
    rng = random.Random(seed)
    keep: set[str] = set()
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda r: r.path)
        rng.shuffle(members)
        keep.update(r.path for r in members[:per_class])
    splits = dict(scan.splits)
    splits[split] = [r for r in scan.splits[split] if r.path in keep]
    return replace(scan, splits=splits)


def cap_split(scan: DatasetScan, split: str, per_class: int | None, seed: int) -> DatasetScan:
    """A copy of `scan` whose `split` keeps at most `per_class` x classes images, each
    class in proportion (so an imbalanced split stays as imbalanced); others untouched."""
    from autotransfer.profile import stratified_sample

    if per_class is None or split not in scan.splits:
        return scan
    splits = dict(scan.splits)
    splits[split] = stratified_sample(scan.splits[split], per_class * len(scan.classes), seed)
    return replace(scan, splits=splits)


def heldout_split(scan: DatasetScan) -> str:
    return "test" if scan.splits.get("test") else "val"


def resolve_image_size(scan: DatasetScan, settings: BenchSettings) -> int | None:
    """The input size for every recipe on this dataset: the setting, else the rules' own
    choice (small images upsampled to 128 px), so the selector and the recipes agree."""
    if settings.image_size is not None:
        return settings.image_size
    return input_size(scan.median_side())


def has_test_folder(scan: DatasetScan) -> bool:
    return scan.layout == "splits" and (Path(scan.root) / "test").is_dir()


def has_val_folder(scan: DatasetScan) -> bool:
    return scan.layout == "splits" and any((Path(scan.root) / name).is_dir() for name in VAL_FOLDERS)


def heldout_source(scan: DatasetScan) -> str:
    """Where a dataset's held-out images come from, in words (see `set_heldout`)."""
    if has_test_folder(scan):
        return "test/"
    if has_val_folder(scan):
        return "val/"
    return f"{HOLDOUT_FRACTION:.0%} of the labelled images"


def set_heldout(scan: DatasetScan, seed: int) -> DatasetScan:
    """Make "test" the held-out split, set aside before anything runs.

    test/ where the dataset has one (its val/, if any, joins the labelled pool the cells
    are drawn from: "10/class" means 10 labelled images per class, as for a user, not 10
    to train on beside a val/ of 50 per class); else its val/, all of it; else a stratified
    HOLDOUT_FRACTION of the class folders. Every cell then draws its selection split from
    its own labelled images, as `fit` draws it (the scan is marked `val_drawn`).
    """
    splits = dict(scan.splits)
    if splits.get("test") and splits.get("val"):
        splits["train"] = splits["train"] + splits.pop("val")
    if not splits.get("test"):
        if splits.get("val"):
            splits["test"] = splits.pop("val")
        else:
            splits["train"], splits["test"] = stratified_split(splits["train"], HOLDOUT_FRACTION, seed)
            splits.pop("val", None)
    return replace(scan, splits=splits, val_drawn=not splits.get("val"))


def draw_val(scan: DatasetScan, fraction: float, seed: int) -> DatasetScan:
    """The selection split of a cell without a val/ folder: drawn from its training images
    as `fit` draws it (`data.stratified_split`), so the scan is what `fit` would see."""
    if scan.splits.get("val"):
        return scan
    train, val = stratified_split(scan.splits["train"], fraction, seed)
    return replace(scan, splits={**scan.splits, "train": train, "val": val}, val_drawn=True)


def scan_datasets(paths: list[Path], settings: BenchSettings) -> list[DatasetScan]:
    """Scan every dataset first, so a bad path fails before any training; set the held-out
    images aside (`set_heldout`); apply the caps."""
    scans = []
    for path in paths:
        scan = scan_folder(path, None, settings.seed)  # no val drawn yet: each cell draws its own
        scan = set_heldout(scan, settings.seed)
        scan = cap_split(scan, "val", settings.val_cap, settings.seed)
        scan = cap_split(scan, "test", settings.test_cap, settings.seed)
        scans.append(scan)
    return scans


# --------------------------------------------------------------------------- running


def empty_feature_cache() -> None:
    """Each recipe pays for its own features; calibration (once per backbone) is kept."""
    from autotransfer.features import cache_dir

    shutil.rmtree(cache_dir(), ignore_errors=True)


def warm_calibration(base: Plan) -> float:
    """Compute the profile's one-time calibration reference now; returns its seconds."""
    from autotransfer.backbones import get_backbone
    from autotransfer.features import weights_id
    from autotransfer.profile import _classifier_model, calibrate
    from autotransfer.strategies import Preprocessing

    start = time.perf_counter()
    spec = get_backbone(base.backbone)
    model = _classifier_model(spec, base.weights, base.seed)
    calibrate(model, Preprocessing.for_plan(spec, base), weights_id(spec, base.weights, base.seed), spec.architecture)
    return time.perf_counter() - start


def _drop_models(folder: Path) -> None:
    for path in folder.rglob("model.pt"):
        path.unlink()


def _scores(metrics: dict, split: str) -> dict:
    held = metrics.get(split) or {}
    return {
        "val_accuracy": metrics["val"]["accuracy"],
        "val_balanced_accuracy": metrics["val"].get("balanced_accuracy"),
        "heldout_accuracy": held.get("accuracy"),
        "heldout_macro_f1": held.get("macro_f1"),
    }


def heldout_predictions(run_dir: Path, metrics: dict, records: list[ImageRecord], classes: list[str]) -> list[int]:
    """Per-image held-out predictions of a RUN (class indices of `classes`), for paired
    standard errors: the run's own record where `fit` kept one, else its model.pt run again
    on the held-out images (after the run's wall time was taken)."""
    saved = metrics.get("test_predictions")
    if saved and len(saved.get("predicted", [])) == len(records):
        return [int(p) for p in saved["predicted"]]
    import torch

    from autotransfer.features import eval_transform, image_loader
    from autotransfer.predict import load

    model = load(run_dir)  # placed where and how predict computes
    remap = [classes.index(c) for c in model.classes]
    predicted: list[int] = []
    with torch.inference_mode():
        for images, _ in image_loader(records, eval_transform(model.preprocessing), 64):
            predicted += [remap[i] for i in model.net(images.to(model.device)).argmax(1).cpu().tolist()]
    return predicted


def run_recipe(recipe: Recipe, scan: DatasetScan, out: Path) -> dict:
    """Train one fixed or grid recipe from an empty feature cache; its row of the report."""
    from autotransfer.train import fit

    empty_feature_cache()
    start = time.perf_counter()
    result = fit(scan, recipe.plan, out, progress=False, log=lambda _: None)
    seconds = time.perf_counter() - start
    split = heldout_split(scan)
    return {**_scores(result.metrics, split), "seconds": round(seconds, 2),
            "stages": result.metrics.get("stages", {}), "kept": result.metrics.get("kept"),
            "heldout_predicted": heldout_predictions(out, result.metrics, scan.splits[split], scan.classes)}


RANKED_FILE = "bench_ranked.json"  # in autotransfer's RUN: what the profile and rules gave, for --resume


def run_autotransfer(
    scan: DatasetScan, base: Plan, out: Path, trials: int | None = None, max_images: int = 400,
    log: Callable[[str], None] = print, optional_backbones: list[str] | None = None, resume: bool = False,
) -> dict:
    """What `autotransfer fit DATA` does (profile -> rules -> search -> adopt), timed.

    No time budget: with `trials` None the search runs `fit`'s default, a count of trials,
    so a rerun on a busier machine decides the same. The grid trains one backbone, so by
    default the search does too; `optional_backbones` adds candidates as `fit` does
    (`selector.default_backbones`). With `resume`, a search that an interruption left in
    `out` goes on from its study as `fit --resume` does; its seconds are then those of the
    profile, of the trials finished before and of this run.
    """
    from autotransfer.profile import load_profile, save_profiles
    from autotransfer.search import SEARCH_FILE, SearchConfig, default_storage, finished_trial_seconds, study_trials
    from autotransfer.selector import continue_search, profile_and_rank, search_config, select_and_fit

    empty_feature_cache()
    start = time.perf_counter()
    config = SearchConfig.load(out) if resume and (out / RANKED_FILE).is_file() and (out / SEARCH_FILE).is_file() else None
    # a kill before the study was created (e.g. in the shared feature pass) leaves nothing to go on from
    resumed = config is not None and study_trials(config) is not None
    if resumed:
        begun = json.loads((out / RANKED_FILE).read_text())
        start -= begun["profile_seconds"] + finished_trial_seconds(config)
        log(f"    the search in {out} goes on")
        plan = continue_search(out, log=lambda line: log(f"    {line}"), scan=scan)
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        profiles, plans = profile_and_rank(
            scan, base, max_images, progress=False, optional_backbones=optional_backbones, log=log,
        )
        save_profiles(profiles, out)
        begun = {"profile_seconds": round(time.perf_counter() - start, 2), "ranked_plans": [describe(p) for p in plans]}
        (out / RANKED_FILE).write_text(json.dumps(begun) + "\n")
        config = search_config(scan.root, default_storage(out), profiles, plans, trials, None)
        plan = select_and_fit(config, out, plans, scan=scan, log=lambda line: log(f"    {line}"))
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    with (out / "leaderboard.csv").open(newline="") as handle:  # an interrupted trial is listed as FAIL
        finished = sum(row["state"] in ("COMPLETE", "PRUNED") for row in csv.DictReader(handle))
    split = heldout_split(scan)
    return {
        **_scores(metrics, split),
        "seconds": round(seconds, 2),
        "profile_seconds": begun["profile_seconds"],
        "budget_seconds": None,  # no clock (schema 1 had one)
        "trials_run": finished,
        "choice": describe(plan),
        "chosen_plan": _plan_fields(plan),
        "ranked_plans": begun["ranked_plans"],
        "reasons": plan.reasons,
        "distance": load_profile(out, None).summary.distance,
        "backbones_profiled": config.backbones,
        **({"resumed": True} if resumed else {}),
        "heldout_predicted": heldout_predictions(out, metrics, scan.splits[split], scan.classes)
        if split in metrics else None,
    }


def _plan_fields(plan: Plan | None) -> dict | None:
    if plan is None:
        return None
    fields = asdict(plan)
    fields.pop("reasons")
    return fields


def grid_levels(base: Plan, settings: BenchSettings) -> list[int | None]:
    """The frozen depths of the grid (and of the probes): feature levels, None = the top."""
    from autotransfer.strategies import depth_of

    if settings.levels is not None:
        return list(settings.levels)
    return [*range(depth_of(base.backbone, None)[1]), None]


def cell_recipes(base: Plan, settings: BenchSettings) -> list[tuple[Recipe, list[str]]]:
    """Every recipe of one cell once, with the kinds it counts as (frozen-top is both)."""
    from autotransfer.strategies import depth_of

    cuts = settings.cuts
    if cuts is None and settings.coarse_cuts:
        groups, _ = depth_of(base.backbone, None)
        cuts = [max(1, groups // 2)]
    ordered: dict[str, tuple[Recipe, list[str]]] = {}
    for recipe in [*fixed_recipes(base), *grid_recipes(base, settings.levels, cuts), auto_recipe()]:
        if recipe.name in ordered:
            kept, kinds = ordered[recipe.name]
            ordered[recipe.name] = (replace(kept, depth=recipe.depth), kinds + [recipe.kind])
        else:
            ordered[recipe.name] = (recipe, [recipe.kind])
    return list(ordered.values())


def reference_rows(sub: DatasetScan, base: Plan, settings: BenchSettings, log: Callable[[str], None]) -> list[dict]:
    """The sklearn probe at every grid depth and all levels at once, from an empty cache."""
    from autotransfer.references import run_probes
    from autotransfer.strategies import ALL_LEVELS, depth_of

    empty_feature_cache()
    levels = grid_levels(base, settings)
    groups, _ = depth_of(base.backbone, None)
    rows = []
    for row in run_probes(sub, base, levels, heldout_split(sub), log):
        level = row.pop("level")
        depth = None if level == ALL_LEVELS else groups + 1 if level is None else depth_of(base.backbone, level)[0]
        rows.append({"kinds": [REFERENCE], "family": REFERENCE, "depth": depth, "plan": None,
                     "feature_level": level, "val_accuracy": row.get("cv_accuracy"), **row})
    return rows


def peer_rows(sub: DatasetScan, base: Plan, cell_dir: Path, log: Callable[[str], None]) -> list[dict]:
    """The real fastai; its row says "not installed" when it is not (never a silent skip)."""
    from autotransfer.peers import FASTAI_TITLE, NOT_INSTALLED, run_fastai

    row = {"recipe": "fastai", "kinds": [PEER], "family": PEER, "depth": 0, "plan": None,
           "title": FASTAI_TITLE.format(epochs=base.epochs)}
    run_dir = cell_dir / "fastai"
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        row.update(run_fastai(sub, base, run_dir, heldout_split(sub), log))
    except ImportError as exc:
        if NOT_INSTALLED not in str(exc):
            raise
        row.update(error=NOT_INSTALLED, not_installed=True)
        log(f"  {'fastai':<18} {NOT_INSTALLED}")
    except Exception as exc:  # a failing peer must not lose the benchmark
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  fastai: FAILED {row['error']}")
        log(traceback.format_exc())
    else:
        log(f"  {'fastai':<18} held-out {row['heldout_accuracy']:.4f}, {row['seconds']:.0f}s")
    for path in run_dir.glob("*.pth"):  # the weights file it was given: a copy of the backbone
        path.unlink()
    return [row]


def cell_data(scan: DatasetScan, per_class: int | None, settings: BenchSettings) -> tuple[DatasetScan, Plan]:
    """A cell's images (its subsample of train, the selection split drawn from it) and the
    Plan every row starts from: the same for every row and for a rerun of one."""
    if per_class is None:
        sub = cap_split(scan, "train", settings.train_cap, settings.seed)
    else:
        sub = subsample(scan, per_class, settings.seed, "train")
    base = Plan(
        settings.backbone, weights=settings.weights, image_size=resolve_image_size(sub, settings),
        epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
    )
    return draw_val(sub, base.val_fraction, settings.seed), base


def split_counts(scan: DatasetScan) -> dict[str, int]:
    """Images in each of a cell's splits, as its report records them."""
    return {s: len(scan.splits[s]) for s in ("train", "val", "test") if s in scan.splits}


def cell_runs(out: Path, dataset: str, per_class: int | None) -> Path:
    """Where a cell's rows write their RUN folders."""
    return out / "runs" / dataset / ("all" if per_class is None else f"{per_class}")


def cell_fingerprint(sub: DatasetScan, settings: BenchSettings, per_class: int | None) -> dict:
    """What a cell's rows depend on: its settings (keeping models aside) and its images."""
    from autotransfer.selector import data_hash

    fields = {k: v for k, v in asdict(settings).items() if k != "keep_models"}
    return json.loads(json.dumps({"settings": fields, "per_class": per_class, "data": data_hash(sub)}))  # as stored


class FinishedRows:
    """A cell's finished rows, one JSON file each under CELL/rows/, written the moment a row
    ends: an interrupted cell of hours (a full-size cell on CPU) loses at most the row that
    was running, and `bench --resume` runs only the rest. Rows that failed are not kept."""

    def __init__(self, cell_dir: Path, fingerprint: dict, resume: bool, log: Callable[[str], None]) -> None:
        self.folder, self.log = cell_dir / "rows", log
        marker = self.folder / "cell.json"
        if resume and marker.is_file():
            held = json.loads(marker.read_text())
            if held != fingerprint:
                changed = sorted(k for k in {**held["settings"], **fingerprint["settings"]}
                                 if held["settings"].get(k) != fingerprint["settings"].get(k))
                what = f"settings ({', '.join(changed)})" if changed else "images"
                raise UsageError(f"{cell_dir} holds rows of a bench with other {what}; resume with the same "
                                 "command, or drop --resume to run the cell again")
        elif not resume:
            earlier = [p for p in self.folder.glob("*.json") if p.name != marker.name]
            if earlier:
                log(f"  {len(earlier)} finished row file(s) of an earlier run in {self.folder} are replaced "
                    "(--resume would have kept them)")
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(fingerprint) + "\n")

    def get(self, key: str) -> list[dict]:
        """The rows kept under `key` by an earlier run of this cell (marked `resumed`), or []."""
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return []
        rows = [{**row, "resumed": True} for row in json.loads(path.read_text())]
        self.log(f"  {key:<18} kept from the interrupted run ({len(rows)} row{'s' if len(rows) != 1 else ''})")
        return rows

    def put(self, key: str, rows: list[dict]) -> list[dict]:
        """Keep `rows` (unless one failed, or is a peer not installed yet) and give them back."""
        if not any(row.get("error") for row in rows):
            partial = self.folder / f"{key}.json.partial"
            partial.write_text(json.dumps(rows) + "\n")
            partial.replace(self.folder / f"{key}.json")  # whole or absent, even after kill -9
        return rows


def bench_cell(
    scan: DatasetScan, per_class: int | None, settings: BenchSettings, out: Path,
    log: Callable[[str], None] = print, resume: bool = False,
) -> dict:
    """One dataset at one training-set size: every row, then regrets and their paired SEs.
    Each finished row is kept on disk at once; `resume` runs only the rows that are not."""
    size_label = "all" if per_class is None else f"{per_class}/class"
    sub, base = cell_data(scan, per_class, settings)
    name = Path(scan.root).name
    split = heldout_split(sub)
    source = heldout_source(scan)
    counts = split_counts(sub)
    log(f"[{name} {size_label}] train {counts['train']}, val {counts['val']}"
        + (" (drawn from train)" if sub.val_drawn else "") + f", held-out {counts.get(split, 0)} ({source})")
    cell_dir = cell_runs(out, name, per_class)
    finished = FinishedRows(cell_dir, cell_fingerprint(sub, settings, per_class), resume, log)
    rows = finished.get("probes") or finished.put("probes", reference_rows(sub, base, settings, log))
    if settings.peers:
        rows += finished.get("fastai") or finished.put("fastai", peer_rows(sub, base, cell_dir, log))
    for recipe, kinds in cell_recipes(base, settings):
        kept = finished.get(recipe.name)
        if kept:
            rows += kept
            continue
        row = {
            "recipe": recipe.name, "kinds": kinds, "family": recipe.family, "depth": recipe.depth,
            "title": recipe.title, "plan": _plan_fields(recipe.plan),
        }
        run_dir = cell_dir / recipe.name
        try:
            if recipe.kind == AUTO:
                row.update(run_autotransfer(sub, base, run_dir, settings.trials, settings.max_images, log, resume=resume))
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
                row.update(run_recipe(recipe, sub, run_dir))
        except Exception as exc:  # one failed recipe must not lose a half-hour benchmark
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {recipe.name}: FAILED {row['error']}")
            log(traceback.format_exc())
        else:
            extra = f" -> {row['choice']}" if recipe.kind == AUTO else ""
            log(f"  {recipe.name:<18} held-out {row['heldout_accuracy']:.4f}, val {row['val_accuracy']:.4f}, "
                f"{row['seconds']:.0f}s{extra}")
        if not settings.keep_models:
            _drop_models(run_dir)
        rows += finished.put(recipe.name, [row])
    cell = {
        "dataset": name, "path": scan.root, "per_class": per_class, "size": size_label,
        "images": counts, "classes": len(scan.classes), "heldout": split, "heldout_source": source,
        "val_drawn": sub.val_drawn, "image_size": base.image_size,
        "heldout_targets": [r.label for r in sub.splits[split]], "rows": rows,
    }
    return score_cell(cell)


def _val_score(row: dict) -> float | None:
    """What autotransfer selects on (val balanced accuracy); plain accuracy in older results."""
    score = row.get("val_balanced_accuracy")
    return row.get("val_accuracy") if score is None else score


def _scored(row: dict) -> bool:
    return row.get("heldout_accuracy") is not None and not row.get("error")


def paired_se_points(a: dict, b: dict, targets: list[int] | None) -> float | None:
    """Paired SE (points) of a's held-out accuracy minus b's; None without predictions."""
    from autotransfer.metrics import accuracy_gap_se

    pa, pb = a.get("heldout_predicted"), b.get("heldout_predicted")
    if not targets or pa is None or pb is None or not len(pa) == len(pb) == len(targets):
        return None
    return round(100 * accuracy_gap_se(pa, pb, targets), 2)


def duel(auto: dict | None, other: dict | None, targets: list[int] | None) -> dict | None:
    """autotransfer against one row: the gap (points, + = autotransfer better), its paired
    SE, and the outcome: "win" or "loss" only beyond one SE, else "tie"."""
    if auto is None or other is None or not _scored(auto) or not _scored(other):
        return None
    gap = round(100 * (auto["heldout_accuracy"] - other["heldout_accuracy"]), 2)
    se = paired_se_points(auto, other, targets)
    noise = se or 0.0
    outcome = "win" if gap > noise else "loss" if gap < -noise else "tie"
    return {"recipe": other["recipe"], "gap": gap, "se": se, "outcome": outcome}


def probe_by_cv(cell: dict) -> dict | None:
    """The probe depth its own CV picks (no held-out image involved): the reference a user
    of the protocol would get. Ties: the shallower row first in the table."""
    probes = [r for r in cell["rows"] if REFERENCE in r["kinds"] and _scored(r) and r.get("cv_accuracy") is not None]
    return max(probes, key=lambda r: r["cv_accuracy"], default=None)


def score_cell(cell: dict) -> dict:
    """The cell's best row on the held-out images, each row's regret and its paired SE,
    the grid point best on val, autotransfer's duels and verdict."""
    rows = cell["rows"]
    targets = cell.get("heldout_targets")
    auto = next((r for r in rows if AUTO in r["kinds"]), None)
    candidates = [r for r in rows if AUTO not in r["kinds"] and _scored(r)]
    best = max(candidates, key=lambda r: r["heldout_accuracy"], default=None)
    grid = [r for r in rows if GRID in r["kinds"] and _scored(r)]
    grid_best = max(grid, key=lambda r: r["heldout_accuracy"], default=None)
    val_best = max(grid, key=_val_score, default=None)
    for row in rows:
        scored = best is not None and _scored(row)
        row["regret"] = round(100 * (best["heldout_accuracy"] - row["heldout_accuracy"]), 2) if scored else None
        row["regret_se"] = paired_se_points(best, row, targets) if scored else None
    cell["best"] = None if best is None else {"recipe": best["recipe"], "accuracy": best["heldout_accuracy"]}
    cell["grid_best"] = None if grid_best is None else {"recipe": grid_best["recipe"], "accuracy": grid_best["heldout_accuracy"]}
    cell["grid_best_on_val"] = None if val_best is None else {
        "recipe": val_best["recipe"], "val_accuracy": val_best["val_accuracy"],
        "val_balanced_accuracy": val_best.get("val_balanced_accuracy"),
        "heldout_accuracy": val_best["heldout_accuracy"], "regret": val_best["regret"], "regret_se": val_best["regret_se"],
    }
    probe = probe_by_cv(cell)
    cell["probe_by_cv"] = None if probe is None else {
        "recipe": probe["recipe"], "cv_accuracy": probe["cv_accuracy"], "heldout_accuracy": probe["heldout_accuracy"],
        "regret": probe["regret"], "regret_se": probe["regret_se"],
    }
    n = cell["images"].get(cell["heldout"], 0)
    # One standard error of the best accuracy on this many held-out images, unpaired: the
    # scale of any verdict (the paired SE of each regret is usually smaller).
    cell["heldout_se_points"] = None if best is None or not n else round(
        100 * math.sqrt(best["heldout_accuracy"] * (1 - best["heldout_accuracy"]) / n), 2)
    regret = None if auto is None else auto.get("regret")
    cell["autotransfer_regret"] = regret
    cell["autotransfer_regret_se"] = None if auto is None else auto.get("regret_se")
    cell["within_1_point"] = None if regret is None else regret <= WITHIN_POINTS
    cell["verdict"] = _verdict(regret, cell["autotransfer_regret_se"])
    fastai = next((r for r in rows if PEER in r["kinds"]), None)
    by_name = {r["recipe"]: r for r in rows}
    cell["duels"] = {
        name: duel(auto, other, targets) for name, other in (
            ("probe by CV", None if probe is None else by_name[probe["recipe"]]),
            ("fastai", fastai),
            ("grid best on val", None if val_best is None else by_name[val_best["recipe"]]),
            *((n, by_name.get(n)) for n in FIXED_ORDER),
        )
    }
    return cell


def _verdict(regret: float | None, se: float | None) -> str | None:
    """Within 1 point of the best ("yes"), more than 1 point behind beyond one paired SE
    ("no"), or in between ("unclear": the held-out images cannot tell)."""
    if regret is None:
        return None
    if regret <= WITHIN_POINTS:
        return "yes"
    return "no" if regret - (se or 0.0) > WITHIN_POINTS else "unclear"


def environment() -> dict:
    import optuna
    import pytorch_lightning as pl
    import timm
    import torch

    import sklearn

    from autotransfer.peers import fastai_version

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "versions": {"autotransfer": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "pytorch_lightning": pl.__version__, "optuna": optuna.__version__,
                     "scikit-learn": sklearn.__version__, "fastai": fastai_version() or "not installed",
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu},
    }


def run_bench(
    paths: list[Path], sizes: list[int | None], settings: BenchSettings, out: Path,
    command: str = "", log: Callable[[str], None] = print, resume: bool = False,
) -> dict:
    """Every dataset x size; the report is rewritten after each cell and each row is kept
    as it ends (a kill loses little; `resume` runs only what is missing)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "schema": SCHEMA, "command": command, "settings": asdict(settings),
        "settings_text": settings.describe(), "sizes": ["all" if s is None else s for s in sizes],
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **environment(), "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "cells": [],
    }
    with use_cache(out / "cache"):
        scans = scan_datasets(paths, settings)
        log(settings.describe())
        warmed: set[int | None] = set()
        for scan in scans:
            for per_class in sizes:
                size = resolve_image_size(scan, settings)
                if size not in warmed:  # the profile's one-time reference, not charged to a cell
                    seconds = warm_calibration(Plan(settings.backbone, weights=settings.weights, image_size=size, seed=settings.seed))
                    report.setdefault("calibration_seconds", {})[str(size)] = round(seconds, 2)
                    warmed.add(size)
                report["cells"].append(bench_cell(scan, per_class, settings, out, log, resume))
                report["seconds"] = round(time.perf_counter() - start, 1)
                report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
                write_reports(report, out)
    return report


def rerun_autotransfer(
    report: dict, out: Path, note: str, log: Callable[[str], None] = print, datasets: Collection[str] | None = None,
    resume: bool = False,
) -> dict:
    """Run the autotransfer row of every cell of `report` (of `datasets` only, if given)
    again, on the same images with the same settings, and re-score the cells; every other
    row is kept as it was.

    What a change to the selector costs to judge: its row is a fraction of a cell's time,
    and the references, the peer and the fixed recipes do not run autotransfer's code.
    The images are checked to be the cell's (same held-out labels, same counts); `note`
    (e.g. the commit) is recorded in the report and shown in its preamble. With `resume`,
    a search that an interruption left in OUT goes on from its study (`run_autotransfer`).
    """
    settings = BenchSettings(**report["settings"])
    held = sorted({cell["dataset"] for cell in report["cells"]})
    missing = sorted(set(datasets or ()) - set(held))
    if missing:
        raise DataError(f"the report has no cell of {', '.join(missing)}; its datasets: {', '.join(held)}")
    start, started = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    out.mkdir(parents=True, exist_ok=True)
    with use_cache(out / "cache"):
        warmed: set[int | None] = set()
        for cell in report["cells"]:
            if datasets is not None and cell["dataset"] not in datasets:
                continue
            (scan,) = scan_datasets([Path(cell["path"])], settings)
            sub, base = cell_data(scan, cell["per_class"], settings)
            split = heldout_split(sub)
            counts = split_counts(sub)
            if counts != cell["images"] or [r.label for r in sub.splits[split]] != cell["heldout_targets"]:
                raise DataError(f"{cell['path']} {cell['size']}: the images differ from the bench's ({counts} vs "
                                f"{cell['images']}); rerun the whole bench instead")
            if base.image_size not in warmed:  # not charged to the row, as in run_bench
                warm_calibration(base)
                warmed.add(base.image_size)
            log(f"[{cell['dataset']} {cell['size']} seed {settings.seed}] autotransfer again ({note})")
            index = next(i for i, r in enumerate(cell["rows"]) if AUTO in r["kinds"])
            old = cell["rows"][index]
            row = {k: old[k] for k in ("recipe", "kinds", "family", "depth", "title", "plan") if k in old}
            run_dir = cell_runs(out, cell["dataset"], cell["per_class"]) / old["recipe"]
            if not resume:
                shutil.rmtree(run_dir, ignore_errors=True)
            row.update(run_autotransfer(sub, base, run_dir, settings.trials, settings.max_images, log, resume=resume))
            row["rerun"] = {"note": note, "before": {"heldout_accuracy": old.get("heldout_accuracy"), "choice": old.get("choice"),
                                                     "seconds": old.get("seconds")}}
            log(f"  autotransfer held-out {row['heldout_accuracy']:.4f} (was {old.get('heldout_accuracy')}), "
                f"{row['seconds']:.0f}s -> {row['choice']}")
            if not settings.keep_models:
                _drop_models(run_dir)
            cell["rows"][index] = row
            score_cell(cell)
            write_reports(report, out)
    report["reruns"] = [*report.get("reruns", []), {
        "rows": ["autotransfer"], **({"datasets": sorted(datasets)} if datasets is not None else {}),
        "note": note, "seconds": round(time.perf_counter() - start, 1),
        "started": started, **environment(),
    }]
    write_reports(report, out)
    return report


# --------------------------------------------------------------------------- reports

SHORT = {"frozen-top": "frozen top", "keras-two-stage": "Keras 2-stage", "fastai-fine-tune": "fastai imitation",
         "plain-full-ft": "plain full FT", "autotransfer": "autotransfer", "fastai": "fastai fine_tune",
         "probe by CV": "sklearn probe (depth by CV)", "grid best on val": "grid best on val"}
FIXED_ORDER = ["frozen-top", "keras-two-stage", "plain-full-ft"]
OUTCOME_MARK = {"win": "win", "loss": "**loss**", "tie": "tie"}


def _pm(regret: float | None, se: float | None) -> str:
    if regret is None:
        return "-"
    return f"{regret:+.1f}" + (f" ± {se:.1f}" if se is not None else "")


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _acc(row: dict | None) -> str:
    """'0.912 (+1.3 ± 0.8)': held-out accuracy (regret vs the cell's best ± its paired SE)."""
    if row is None:
        return "-"
    if row.get("not_installed"):
        return "not installed"
    if row.get("error") or row.get("heldout_accuracy") is None:
        return "failed"
    regret = row.get("regret")
    text = f"{row['heldout_accuracy']:.3f}"
    return f"{text} ({_pm(regret, row.get('regret_se'))})" if regret is not None else text


def _row(cell: dict, name: str) -> dict | None:
    return next((r for r in cell["rows"] if r["recipe"] == name), None)


def _summary_row(cell: dict, name: str) -> dict | None:
    """A row of the cell, or one of its picks ('probe by CV', 'grid best on val') as one."""
    if name in ("probe by CV", "grid best on val"):
        pick = cell.get("probe_by_cv" if name == "probe by CV" else "grid_best_on_val")
        return None if pick is None else {**pick, "recipe": pick["recipe"]}
    if name == "fastai":
        return next((r for r in cell["rows"] if PEER in r["kinds"]), None)
    return _row(cell, name)


def _size_label(cell: dict) -> str:
    """'10 (16+4)': images per class asked for, and the train (+ selection) images it gave."""
    val = f"+{cell['images']['val']}" if cell.get("val_drawn") else ""
    return f"{cell['size'].replace('/class', '')} ({cell['images']['train']}{val})"


def _split_label(cell: dict) -> str:
    n = cell["images"][cell["heldout"]]
    if "heldout_source" in cell:
        return f"{cell['heldout_source']} ({n})"
    if cell["heldout"] != "test":  # schema 1
        return f"val* ({n})"
    return f"half of val ({n})" if cell.get("heldout_from_val") else f"test ({n})"


def _tag(report: dict) -> str:
    settings = report["settings"]
    try:
        return BenchSettings(**settings).tag()
    except TypeError:  # an older report's settings
        return f"{'QUICK' if settings.get('quick') else 'full'}: {settings.get('image_size') or 'fit'} px, {settings.get('epochs')} epochs"


SUMMARY_COLUMNS = ["probe by CV", "fastai", *FIXED_ORDER, "grid best on val"]


def report_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table; rendered as Markdown and as HTML. Every title
    ends with the run's settings in brief ([QUICK: ...] in quick mode)."""
    cells = report["cells"]
    tag = f" [{_tag(report)}]"
    tables = []
    header = ["dataset", "train/class (train+val)", "held-out", "cell best", *[SHORT[n] for n in SUMMARY_COLUMNS],
              "autotransfer", "its choice", "within 1 pt"]
    rows = []
    for c in cells:
        auto = _row(c, "autotransfer")
        best = c.get("best") or c.get("grid_best")
        verdict = c.get("verdict") or {True: "yes", False: "no", None: None}[c.get("within_1_point")]
        rows.append([
            c["dataset"], _size_label(c), _split_label(c),
            f"{best['accuracy']:.3f} {best['recipe']}" if best else "-",
            *[_acc(_summary_row(c, n)) for n in SUMMARY_COLUMNS], _acc(auto),
            (auto or {}).get("choice", "-").replace(f"{report['settings']['backbone']}, ", ""),
            {"yes": "yes", "no": "**no**", "unclear": "unclear", None: "-"}[verdict],
        ])
    tables.append(("Held-out accuracy (regret vs the cell's best ± paired SE, points)" + tag, header, rows))

    header = ["dataset", "train/class (train+val)", *[f"vs {SHORT[n]}" for n in ["probe by CV", "fastai", "grid best on val", *FIXED_ORDER]]]
    rows = []
    for c in cells:
        duels = c.get("duels") or {}
        rows.append([c["dataset"], _size_label(c), *[
            "-" if not duels.get(n) else f"{OUTCOME_MARK[duels[n]['outcome']]} {_pm(duels[n]['gap'], duels[n]['se'])}"
            for n in ["probe by CV", "fastai", "grid best on val", *FIXED_ORDER]]])
    if any(c.get("duels") for c in cells):
        tables.append(("autotransfer against each (points, + = autotransfer better ± paired SE; win/loss only beyond 1 SE)" + tag,
                       header, rows))

    header = ["dataset", "train/class (train+val)", "sklearn probes (features + every depth)", "fastai",
              *[SHORT[n] for n in FIXED_ORDER], "grid (all points)", "autotransfer", "of which profile", "trials",
              "autotransfer / grid's full"]
    rows = []
    for c in cells:
        probes = [r for r in c["rows"] if REFERENCE in r["kinds"] and r.get("seconds") is not None]
        probe_s = (max(r.get("features_seconds", 0) for r in probes)
                   + sum(r["seconds"] - r.get("features_seconds", 0) for r in probes)) if probes else None
        grid_s = sum(r.get("seconds", 0) for r in c["rows"] if GRID in r["kinds"])
        auto = _row(c, "autotransfer") or {}
        fastai = _summary_row(c, "fastai") or {}
        full = (_row(c, "full") or {}).get("seconds")  # one full fine-tune (LP-FT): the goal is <= 3x
        rows.append([
            c["dataset"], _size_label(c), _s(probe_s),
            _s(fastai["seconds"]) if fastai.get("seconds") else ("not installed" if fastai.get("not_installed") else "-"),
            *[_s((_row(c, n) or {}).get("seconds")) for n in FIXED_ORDER], _s(grid_s),
            _s(auto.get("seconds")), _s(auto.get("profile_seconds")), str(auto.get("trials_run", "-")),
            f"{auto['seconds'] / full:.1f}x" if full and auto.get("seconds") else "-",
        ])
    tables.append(("Wall time (s, each from an empty feature cache)" + tag, header, rows))

    for c in cells:
        counts = ", ".join(f"{k} {v}" for k, v in c["images"].items())
        drawn = "; val drawn from train" if c.get("val_drawn") else ""
        title = (f"{c['dataset']}, {c['size']} ({counts}{drawn}; {c['image_size'] or 'backbone'} px; "
                 f"held-out {_split_label(c)})" + tag)
        header = ["recipe", "kind", "what", "val acc (probes: CV)", "val bal. acc", "held-out acc", "macro-F1", "s",
                  "regret ± paired SE (pts)"]
        rows = []
        for r in c["rows"]:
            what = r.get("choice", r["title"]) if "autotransfer" == r["recipe"] else r["title"]
            if REFERENCE in r["kinds"] and r.get("C") is not None:
                what += (f" [C {r['C']:.2g} by {r['folds']}-fold CV on {r['labelled_images']} images, refit on all]"
                         if r.get("folds") else f" [C {r['C']:.2g}: too few images per class to cross-validate]")
            if r.get("error") or r.get("heldout_accuracy") is None:
                rows.append([r["recipe"], "+".join(r["kinds"]), what, "-", "-", (r.get("error") or "no held-out score")[:90],
                             "-", "-", "-"])
                continue
            stages = r.get("stages", {})
            if r.get("kept") == "head" and "head_val_accuracy" in stages:
                key = "val_balanced_accuracy" if "head_val_balanced_accuracy" in stages else "val_accuracy"
                what += (f" [fine-tuning reached {stages['finetune_' + key]:.3f} on val ({key.replace('_', ' ')}), "
                         f"not enough above the head's {stages['head_' + key]:.3f}: head kept]")
            val = r.get("val_accuracy")
            score = _val_score(r) if GRID in r["kinds"] or FIXED in r["kinds"] or AUTO in r["kinds"] else None
            rows.append([
                r["recipe"], "+".join(r["kinds"]), what, "-" if val is None else f"{val:.3f}",
                "-" if score is None else f"{score:.3f}", f"{r['heldout_accuracy']:.3f}",
                "-" if r.get("heldout_macro_f1") is None else f"{r['heldout_macro_f1']:.3f}", _s(r.get("seconds")),
                _pm(r.get("regret"), r.get("regret_se")),
            ])
        vb = c["grid_best_on_val"]
        if vb:
            rows.append(["(grid best on val)", "", f"{vb['recipe']}: what picking the grid on val (balanced accuracy) would give",
                         f"{vb['val_accuracy']:.3f}", f"{_val_score(vb):.3f}", f"{vb['heldout_accuracy']:.3f}", "", "",
                         _pm(vb["regret"], vb.get("regret_se"))])
        pc = c.get("probe_by_cv")
        if pc:
            rows.append(["(probe by CV)", "", f"{pc['recipe']}: the probe depth its own CV picks (no held-out image used)",
                         f"{pc['cv_accuracy']:.3f}", "", f"{pc['heldout_accuracy']:.3f}", "", "",
                         _pm(pc["regret"], pc.get("regret_se"))])
        tables.append((title, header, rows))
    return tables


def verdict_lines(report: dict) -> list[str]:
    cells = [c for c in report["cells"] if c.get("autotransfer_regret") is not None]
    verdicts = {c["dataset"] + " " + c["size"]: c.get("verdict") or ("yes" if c["within_1_point"] else "no") for c in cells}

    def regret(c: dict) -> str:
        return _pm(c["autotransfer_regret"], c.get("autotransfer_regret_se"))

    good = [k for k, v in verdicts.items() if v == "yes"]
    bad = [f"{c['dataset']} {c['size']} ({regret(c)})" for c in cells if verdicts[c["dataset"] + " " + c["size"]] == "no"]
    unclear = [f"{c['dataset']} {c['size']} ({regret(c)})" for c in cells
               if verdicts[c["dataset"] + " " + c["size"]] == "unclear"]
    lines = [f"autotransfer within {WITHIN_POINTS:g} point of the cell's best in {len(good)} of {len(cells)} cells; "
             f"more than {WITHIN_POINTS:g} point behind beyond one paired SE in {len(bad)}; unclear in {len(unclear)}."]
    if good:
        lines.append("Within: " + ", ".join(good) + ".")
    if bad:
        lines.append("Behind (regret ± paired SE, points): " + ", ".join(bad) + ".")
    if unclear:
        lines.append("Unclear (behind by more than 1 point, but not beyond one paired SE): " + ", ".join(unclear) + ".")
    for name in ["probe by CV", "fastai", "grid best on val"]:
        outcomes = [d["outcome"] for c in cells if (d := (c.get("duels") or {}).get(name))]
        if outcomes:
            lines.append(f"autotransfer vs {SHORT[name]}: {outcomes.count('win')} wins, {outcomes.count('tie')} ties "
                         f"(within one paired SE), {outcomes.count('loss')} losses in {len(outcomes)} cells.")
    missing = [f"{c['dataset']} {c['size']}" for c in report["cells"] if (_summary_row(c, "fastai") or {}).get("not_installed")]
    if missing:
        lines.append("fastai is not installed: its rows are empty (pip install 'autotransfer[peers]').")
    return lines


SEED_COLUMNS = ["autotransfer", "grid best on val", "probe by CV", "fastai", *FIXED_ORDER]


def merge_by_seed(reports: list[dict]) -> list[dict]:
    """One report per seed out of reports of single cells (benchmarks/bench_parallel.py runs
    one cell per process): the cells of a seed, in the order given, under the first one's header."""
    by_seed: dict[int, dict] = {}
    seen: set[tuple[int, str, str]] = set()
    for report in reports:
        seed = report["settings"]["seed"]
        for cell in report["cells"]:
            key = (seed, cell["dataset"], cell["size"])
            if key in seen:
                raise DataError(f"two bench reports hold {cell['dataset']} {cell['size']} of seed {seed}")
            seen.add(key)
        if seed not in by_seed:
            by_seed[seed] = {**report, "cells": list(report["cells"]), "commands": list(report.get("commands", [report["command"]]))}
            continue
        merged = by_seed[seed]
        if report["settings"] != merged["settings"]:
            raise DataError(f"the bench reports of seed {seed} differ in their settings: {report['command']!r} "
                            f"vs {merged['command']!r}")
        merged["cells"] += report["cells"]
        merged["commands"] += report.get("commands", [report["command"]])  # a merged report brings all of its own
        merged["seconds"] = round(merged.get("seconds", 0) + report.get("seconds", 0), 1)
    return list(by_seed.values())


def mean_accuracy_by_recipe(reports: list[dict]) -> dict[str, float]:
    """Mean held-out accuracy of each row that every cell of every report has (fixed recipes,
    probes at each depth, fastai, grid rows, autotransfer): issue 15's "above every single
    fixed recipe" is autotransfer's mean against each of these."""
    cells = [c for r in reports for c in r["cells"]]
    scores: dict[str, list[float]] = defaultdict(list)
    for cell in cells:
        for row in cell["rows"]:
            if row.get("heldout_accuracy") is not None:
                scores[row["recipe"]].append(row["heldout_accuracy"])
    return {name: round(sum(v) / len(v), 4) for name, v in scores.items() if len(v) == len(cells)}


def summarise_seeds(reports: list[dict]) -> dict:
    """Regrets of one bench run with several seeds, per dataset and size, and their means.

    One seed's verdict is made at the noise of one draw of the held-out images; each seed
    redraws the training subsample, the selection split and the training randomness, so
    the mean regret over seeds is what a choice costs on average, at a smaller noise. The
    SE of autotransfer's mean regret combines the seeds' paired SEs (independent draws).
    """
    seeds = [r["settings"]["seed"] for r in reports]
    if len(reports) < 2 or len(set(seeds)) != len(seeds):
        raise DataError(f"need bench reports of at least 2 different seeds, but got seeds {seeds}")
    shared = [{k: v for k, v in r["settings"].items() if k != "seed"} for r in reports]
    differ = sorted({k for other in shared[1:] for k in other if other[k] != shared[0].get(k)})
    if differ:
        raise DataError(f"the bench reports differ in more than the seed: {', '.join(differ)}")
    by_cell: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for seed, report in zip(seeds, reports):
        for cell in report["cells"]:
            by_cell[(cell["dataset"], cell["size"])][seed] = cell
    rows, incomplete = [], []
    for (dataset, size), cells in by_cell.items():
        if len(cells) < len(seeds):
            incomplete.append(f"{dataset} {size} (seeds {sorted(cells)})")
            continue
        ordered = [cells[seed] for seed in seeds]
        regrets = {name: [_seed_regret(c, name) for c in ordered] for name in SEED_COLUMNS}
        auto_se = [c.get("autotransfer_regret_se") for c in ordered]
        mean_se = None if any(v is None for v in auto_se) else round(math.sqrt(sum(v * v for v in auto_se)) / len(auto_se), 2)
        fixed_best = [min((r for r in (_seed_regret(c, n) for n in FIXED_ORDER) if r is not None), default=None)
                      for c in ordered]
        rows.append({
            "dataset": dataset, "size": size, "seeds": seeds, "best_recipe": best_recipe(ordered),
            "train_images": [c["images"]["train"] for c in ordered],
            "heldout_images": [c["images"][c["heldout"]] for c in ordered],
            "se_points": [c.get("heldout_se_points") for c in ordered],
            "regrets": regrets,
            "mean_regret": {name: _mean(values) for name, values in regrets.items()},
            "autotransfer_regret_se": auto_se, "mean_regret_se": mean_se,
            "below_best_fixed": _mean([None if a is None or f is None else a - f
                                       for a, f in zip(regrets["autotransfer"], fixed_best)]),
        })
    settings_text = reports[0]["settings_text"].replace(f"seed {seeds[0]};", f"seeds {seeds};")
    complete = [{**r, "cells": [c for c in r["cells"] if len(by_cell[(c["dataset"], c["size"])]) == len(seeds)]}
                for r in reports]
    return {"seeds": seeds, "settings_text": settings_text, "rows": rows, "incomplete": incomplete,
            "mean_accuracy": mean_accuracy_by_recipe(complete),
            "commands": [c for r in reports for c in r.get("commands", [r["command"]])]}


def best_recipe(cells: list[dict]) -> dict | None:
    """The cell's best single recipe: the row (autotransfer aside) of the highest held-out
    accuracy averaged over seeds, and autotransfer's gap to it per seed with its paired SE.

    The per-seed regret is against whichever of ~18 rows happens to lead in that seed: a
    maximum of noisy estimates, above every recipe's own mean (the winner's curse). Against
    one recipe, fixed across seeds, the gap is a paired difference of two recipes' means
    that no row's luck inflates."""
    rows = [{r["recipe"]: r for r in c["rows"] if _scored(r)} for c in cells]
    autos = [next((r for r in c["rows"] if AUTO in r["kinds"] and _scored(r)), None) for c in cells]
    if any(a is None for a in autos):
        return None
    names = [n for n in rows[0] if n != autos[0]["recipe"] and all(n in r for r in rows)]
    if not names:
        return None
    best = max(names, key=lambda n: sum(r[n]["heldout_accuracy"] for r in rows))
    gaps = [round(100 * (r[best]["heldout_accuracy"] - a["heldout_accuracy"]), 2) for r, a in zip(rows, autos)]
    ses = [paired_se_points(r[best], a, c.get("heldout_targets")) for r, a, c in zip(rows, autos, cells)]
    mean_se = None if any(v is None for v in ses) else round(math.sqrt(sum(v * v for v in ses)) / len(ses), 2)
    return {"recipe": best, "accuracy": round(sum(r[best]["heldout_accuracy"] for r in rows) / len(rows), 4),
            "gaps": gaps, "gap_ses": ses, "mean_gap": _mean(gaps), "mean_gap_se": mean_se}


def _seed_regret(cell: dict, name: str) -> float | None:
    return (_summary_row(cell, name) or {}).get("regret")


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else round(sum(values) / len(values), 2)


def seed_verdict_lines(summary: dict) -> list[str]:
    rows = summary["rows"]
    lines = []
    for name in SEED_COLUMNS[:2]:
        means = [r["mean_regret"][name] for r in rows if r["mean_regret"][name] is not None]
        within = sum(m <= WITHIN_POINTS for m in means)
        lines.append(f"{name}: mean regret over seeds {summary['seeds']} within {WITHIN_POINTS:g} point of the "
                     f"cell's best in {within} of {len(means)} cells; mean over cells {_mean(means):+.1f} points.")
    worse = [f"{r['dataset']} {r['size']} ({r['below_best_fixed']:+.1f})" for r in rows
             if r["below_best_fixed"] is not None and r["below_best_fixed"] > WITHIN_POINTS]
    lines.append("autotransfer more than 1 point below the best fixed recipe on average: "
                 + (", ".join(worse) if worse else "in no cell") + ".")
    within_se = [r for r in rows if r["mean_regret"]["autotransfer"] is not None and r["mean_regret_se"] is not None
                 and r["mean_regret"]["autotransfer"] <= r["mean_regret_se"]]
    lines.append(f"autotransfer within one paired SE of the cell's best (mean over seeds) in {len(within_se)} of {len(rows)} cells.")
    fixed = [r["best_recipe"] for r in rows if r.get("best_recipe") and r["best_recipe"]["mean_gap_se"] is not None]
    if fixed:
        within = sum(b["mean_gap"] <= b["mean_gap_se"] for b in fixed)
        curse = _mean([r["mean_regret"]["autotransfer"] - r["best_recipe"]["mean_gap"] for r in rows
                       if r.get("best_recipe") and r["mean_regret"]["autotransfer"] is not None])
        lines.append(f"autotransfer within one paired SE of the cell's best recipe (the one row of the highest mean "
                     f"held-out accuracy over seeds) in {within} of {len(fixed)} cells; the per-seed best row sits "
                     f"{curse:+.1f} points above it on average (the best of many noisy rows, a different one per seed).")
    means = summary.get("mean_accuracy") or {}
    if "autotransfer" in means:
        others = sorted(((v, k) for k, v in means.items() if k != "autotransfer"), reverse=True)
        above = [k for v, k in others if means["autotransfer"] > v]
        lines.append(f"Mean held-out accuracy over every cell and seed: autotransfer {means['autotransfer']:.3f}; "
                     f"the best single recipe {others[0][1]} {others[0][0]:.3f}; autotransfer above "
                     f"{len(above)} of {len(others)} single recipes." if others else "")
    if summary["incomplete"]:
        lines.append("Not in every seed's report (left out): " + ", ".join(summary["incomplete"]) + ".")
    return lines


def format_seed_summary(summary: dict) -> str:
    """Markdown: the verdict on mean regrets, then one row per dataset and size."""
    lines = ["# autotransfer bench, averaged over seeds", "",
             f"Settings: {summary['settings_text']}.  ",
             "Regret = the cell's best held-out accuracy (any row but autotransfer) - the recipe's, in points, per "
             "seed (each seed: its own subsample, selection split and training run), then the mean; ± the SE of "
             "autotransfer's mean from the seeds' paired SEs. within 1 pt: yes at most 1 point, no beyond 1 point "
             "+ 1 SE, else unclear.", "",
             *seed_verdict_lines(summary), "",
             "| dataset | train/class (images) | held-out images | 1 SE (pts) | autotransfer per seed | autotransfer mean ± SE | "
             + " | ".join(f"{SHORT.get(n, n)} (mean)" for n in SEED_COLUMNS)
             + " | vs best fixed | within 1 pt | best recipe (mean acc) | autotransfer vs it ± SE |",
             "|" + "---|" * (10 + len(SEED_COLUMNS))]
    for r in summary["rows"]:
        mean = r["mean_regret"]
        per_seed = ", ".join("-" if v is None else f"{v:+.1f}" for v in r["regrets"]["autotransfer"])
        se = [v for v in r["se_points"] if v is not None]
        lines.append("| " + " | ".join([
            r["dataset"], f"{r['size'].replace('/class', '')} ({'/'.join(map(str, sorted(set(r['train_images']))))})",
            "/".join(map(str, sorted(set(r["heldout_images"])))),
            f"{sum(se) / len(se):.1f}" if se else "-", per_seed,
            _pm(mean["autotransfer"], r.get("mean_regret_se")),
            *["-" if mean[n] is None else f"{mean[n]:+.1f}" for n in SEED_COLUMNS],
            "-" if r["below_best_fixed"] is None else f"{r['below_best_fixed']:+.1f}",
            {"yes": "yes", "no": "**no**", "unclear": "unclear", None: "-"}[_verdict(mean["autotransfer"], r.get("mean_regret_se"))],
            *_best_recipe_cells(r.get("best_recipe")),
        ]) + " |")
    means = summary.get("mean_accuracy") or {}
    if means:
        lines += ["", "Mean held-out accuracy of each row over every cell and seed (rows every cell has):", "",
                  "| row | mean accuracy | vs autotransfer (points) |", "|---|---|---|"]
        auto = means.get("autotransfer")
        for name, value in sorted(means.items(), key=lambda kv: -kv[1]):
            gap = "-" if auto is None or name == "autotransfer" else f"{100 * (auto - value):+.1f}"
            lines.append(f"| {SHORT.get(name, name)} | {value:.3f} | {gap} |")
    return "\n".join(lines) + "\n"


def _best_recipe_cells(best: dict | None) -> list[str]:
    if best is None:
        return ["-", "-"]
    return [f"{SHORT.get(best['recipe'], best['recipe'])} ({best['accuracy']:.3f})", _pm(best["mean_gap"], best["mean_gap_se"])]


def _preamble(report: dict) -> list[str]:
    m = report["machine"]
    v = report["versions"]
    resumed = sum(bool(r.get("resumed")) for c in report["cells"] for r in c["rows"])
    return [
        f"Command: `{report['command']}`" if len(report.get("commands", [])) < 2 else
        "Commands (merged, one cell or more each): " + "; ".join(f"`{c}`" for c in report["commands"]),
        f"Settings: {report['settings_text']}.",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, GPU: {m['gpu'] or 'none'}; "
        f"load average {report['load_average_start']} at the start, {report.get('load_average_end')} at the end.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Started {report['started']}, took {report.get('seconds', 0) / 60:.1f} min"
        + (f" (plus one-time calibration of the profile: {sum(report['calibration_seconds'].values()):.0f} s)"
           if report.get("calibration_seconds") else "") + ".",
        *([f"{resumed} row(s) were kept from an interrupted run of the same command (`--resume`); their seconds "
           "are that run's"] if resumed else []),
        *(f"Rerun of the {', '.join(r['rows'])} row(s) only"
          + (f" in the cells of {', '.join(r['datasets'])}" if r.get("datasets") else "")
          + f", every other row kept as it was: {r['note']}, "
          f"{r['started']}, {r['seconds'] / 60:.1f} min." for r in report.get("reruns", [])),
        "Held-out images judge every row and nothing selects on them: test/ where the dataset has one; else "
        "its val/, all of it (capped only in quick mode, which says so), with the selection split drawn from "
        f"the cell's training images as `fit` draws it; else {HOLDOUT_FRACTION:.0%} of the class folders.",
        "Rows: the sklearn linear probe at every grid depth and at every level at once (`autotransfer.references`: "
        "standardised pooled features, multinomial LogisticRegression with lbfgs, C by stratified 5-fold CV accuracy "
        "on every labelled image, train + val, then refit on all: the CLIP/VTAB linear-probe protocol); the real "
        "fastai `vision_learner` + `fine_tune` with the same weights, size, seed and epochs; the fixed recipes "
        "from the guides; the grid (frozen at each depth, LP-FT from each cut); autotransfer (profile -> rules -> "
        "search with fit's default budget, a count of trials, no clock).",
        "Regret = the cell's best row (any but autotransfer) - the row, in accuracy points, ± the paired standard "
        "error of that difference on the held-out images (per-image correctness of the two rows); a cell counts as "
        "a win or a loss only beyond it. 'within 1 pt': yes if the regret is at most 1 point, no if it exceeds "
        "1 point by more than its paired SE, else unclear.",
    ]


def format_markdown(report: dict) -> str:
    lines = ["# autotransfer bench", "", *[f"{p}  " for p in _preamble(report)], "", *verdict_lines(report), ""]
    for title, header, rows in report_tables(report):
        lines += [f"## {title}" if rows and title.startswith(("Held-out", "Wall", "autotransfer against")) else f"### {title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(report: dict) -> list[tuple[str, str]]:
    """(caption, base64 PNG): per size, layer-transfer curves and a bar chart of recipes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    images = []
    by_size: dict[str, list[dict]] = defaultdict(list)
    for cell in report["cells"]:
        by_size[cell["size"]].append(cell)
    for size, cells in by_size.items():
        fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.4), squeeze=False)
        for ax, cell in zip(axes[0], cells):
            for family, style, label in (("frozen", "o-", "frozen at depth"), ("finetune", "s--", "fine-tuned above depth"),
                                         (REFERENCE, "^:", "sklearn probe at depth")):
                points = sorted((r["depth"], r["heldout_accuracy"]) for r in cell["rows"]
                                if (GRID in r["kinds"] or REFERENCE in r["kinds"]) and r["family"] == family
                                and r.get("depth") is not None and _scored(r))
                if points:
                    ax.plot(*zip(*points), style, label=label)
            auto = _row(cell, "autotransfer")
            if auto and auto.get("heldout_accuracy") is not None:
                ax.axhline(auto["heldout_accuracy"], color="k", lw=1, ls=":", label="autotransfer")
            ax.set_title(f"{cell['dataset']} ({_split_label(cell)})", fontsize=9)
            ax.set_xlabel("depth: coarse groups frozen below the cut")
            top = _row(cell, "frozen-top")
            if top is not None and top.get("depth") is not None:  # one step above the last group
                ticks = list(range(int(top["depth"])))
                ax.set_xticks([*ticks, top["depth"]], [*map(str, ticks), "top"])
            ax.set_ylabel("held-out accuracy")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Layer transfer, {size} training images")
        images.append((f"Layer-transfer curves, {size} [{_tag(report)}]: held-out accuracy of a frozen extractor cut "
                       "at each depth, of the sklearn probe on the same features, and of LP-FT with the groups below "
                       "each depth frozen (0 = full).", _png(fig)))
        plt.close(fig)

        names = ["probe by CV", "fastai", *FIXED_ORDER, "autotransfer"]
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(cells) * 1.5), 3.4))
        width = 0.8 / (len(names) + 1)
        for i, name in enumerate([*names, "cell best"]):
            values = []
            for cell in cells:
                if name == "cell best":
                    best = cell.get("best") or cell.get("grid_best")
                    values.append(best["accuracy"] if best else 0)
                else:
                    row = _summary_row(cell, name) or {}
                    values.append(row.get("heldout_accuracy") or 0)
            ax.bar([j + i * width for j in range(len(cells))], values, width, label=SHORT.get(name, name))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], [c["dataset"] for c in cells])
        lows = [min(((r.get("heldout_accuracy") or 1) for r in c["rows"] if AUTO in r["kinds"] or FIXED in r["kinds"]
                     or PEER in r["kinds"]), default=1) for c in cells]
        ax.set_ylim(max(0, min(lows) - 0.05), 1.0)
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=7, ncol=3)
        ax.set_title(f"Recipes, {size} training images")
        images.append((f"Recipes, {size} [{_tag(report)}]: held-out accuracy (the sklearn probe at the depth its "
                       "CV picks, the real fastai, the fixed recipes, autotransfer, and the cell's best row).", _png(fig)))
        plt.close(fig)
    return images


def format_html(report: dict) -> str:
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"  # nothing from the network
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' content=\"{csp}\"><title>autotransfer bench</title>",
             "<style>body{font-family:sans-serif;max-width:1300px;margin:auto;font-size:14px}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             "th{background:#eee}</style></head><body><h1>autotransfer bench</h1>"]
    parts += [f"<p>{escape(p).replace('`', '')}</p>" for p in _preamble(report)]
    parts += [f"<p><b>{escape(v)}</b></p>" for v in verdict_lines(report)]
    figures = plots(report)
    if not figures:
        parts.append("<p>(matplotlib is not installed: no plots; <code>pip install matplotlib</code>)</p>")
    for caption, data in figures:
        parts.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{escape(caption)}</figcaption></figure>")
    for title, header, rows in report_tables(report):
        parts.append(f"<h3>{escape(title)}</h3><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{escape(c).replace('**', '')}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    paths = {"json": out / "bench.json", "md": out / "bench.md", "html": out / "bench.html"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(format_markdown(report) + "\n")
    paths["html"].write_text(format_html(report) + "\n")
    return paths
