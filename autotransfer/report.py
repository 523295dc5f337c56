"""Explain a finished RUN on one page: the data, the decision, the layer-transfer curve of
this dataset, the search, the errors.

RUN in; `report.html` (self-contained: figures and thumbnails are data URIs, no network),
`report.md` (figures beside it) and `report.json` out. The report reads what the run
wrote (plan.json, metrics.json, scan.json, and for a search profile.json,
leaderboard.csv, search.json, trials/) and recomputes only the validation predictions,
for the misclassified images. What a run lacks (an explicit `fit --strategy` run has no
profile and no search) is named in its section with the command that produces it.

The layer-transfer curve is Yosinski et al. (2014)'s figure for the user's own data,
with the cut (coarse groups kept frozen, the coordinate of `--cut`) on the x axis: the
profile's k-NN accuracy per depth is the frozen proxy; every trial gives a measured
frozen point (its linear-head stage) and, if fine-tuned, a fine-tuned one; `curve=True`
adds a linear probe on cached features at every feature level.
"""

from __future__ import annotations

import base64
import csv
import datetime
import io
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import jinja2
import torch
from markupsafe import Markup, escape
from PIL import Image, ImageOps

from autotransfer import __version__, plots
from autotransfer.checkpoint import MODEL_FILE, load_model
from autotransfer.errors import AutotransferError, RunError
from autotransfer.features import torch_threads
from autotransfer.plan import Plan, describe
from autotransfer.profile import Profile, load_profile
from autotransfer.rules import THRESHOLDS
from autotransfer.strategies import depth_of

SCHEMA = "autotransfer.report/1"
DEFAULT_MISCLASSIFIED = 48
THUMB_PX = 96
LISTED = 50  # skipped files, duplicates: the first LISTED in the page, all in report.json


@dataclass
class CurvePoint:
    """One accuracy at one cut depth: `cut` coarse groups (stem first) kept frozen."""

    cut: int
    accuracy: float
    source: str  # "profile-knn" | "probe" | "trial-head" | "trial-finetune"
    strategy: str  # what the point measures: "frozen", "partial" or "full"
    feature_level: int | None  # None: the whole backbone
    trial: int | None = None


@dataclass
class TrialRow:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, ... ("UNFINISHED": no metrics.json yet)
    val_accuracy: float | None
    val_balanced_accuracy: float | None  # the search's objective; for PRUNED: the last value it reported
    macro_f1: float | None
    seconds: float | None
    backbone: str | None
    strategy: str | None
    cut: int | None
    feature_level: int | None
    from_rules: bool | None  # queued by the rule engine (None: not recorded)
    all_levels: bool = False  # a frozen head on every level at once: no single depth
    all_levels_mode: str = "level"  # with all_levels: Plan.all_levels_mode
    head_val_accuracy: float | None = None
    finetune_val_accuracy: float | None = None
    best_so_far: float | None = None


@dataclass
class Misclassified:
    path: str
    true: str
    predicted: str
    confidence: float  # probability of the (wrong) predicted class
    thumbnail: bytes = field(default=b"", repr=False)  # JPEG; not in report.json


@dataclass
class Predictions:
    """The run's model on the validation split, recomputed from the image files."""

    data: str
    n: int
    accuracy: float
    run_accuracy: float | None  # what metrics.json says
    same_data: bool | None  # val files hash as in metrics.json (None: not recorded)
    misclassified_total: int
    misclassified: list[Misclassified]  # most confident mistakes first, at most the limit


@dataclass
class Report:
    schema: str
    run: str
    kind: str  # "search", "search (no winner yet)" or "explicit"
    created: str
    data: str | None  # the image folder predictions were recomputed on (None: not found)
    plan: Plan | None
    decision: str | None
    metrics: dict | None
    scan: dict | None
    profile: Profile | None
    search: dict | None
    groups: int | None  # coarse groups of the chosen backbone: the cut axis runs 0..groups
    group_names: list[str]  # module ending each group, stem first (from the profile)
    curve: list[CurvePoint]
    trials: list[TrialRow]
    winner: int | None
    predictions: Predictions | None
    missing: dict[str, str]  # section -> what is missing and the command that produces it
    notes: list[str]
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        payload = asdict(self)
        if payload["predictions"]:
            for item in payload["predictions"]["misclassified"]:
                item.pop("thumbnail", None)
        return payload

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------ reading a RUN


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); it was damaged after the run, rerun `autotransfer fit`") from None


def check_run(run: Path) -> None:
    """RunError unless RUN holds what `fit` writes first (plan.json, or search.json)."""
    if not run.exists():
        raise RunError(f"{run} does not exist; expected the RUN folder of `autotransfer fit DATA --out RUN`")
    if not run.is_dir() or not ((run / "plan.json").is_file() or (run / "search.json").is_file()):
        raise RunError(
            f"{run} is not an autotransfer run (no plan.json or search.json); "
            "create one with `autotransfer fit DATA --out RUN`"
        )


def _number(text: str | None, kind: type = float):
    return None if text in (None, "") else kind(float(text)) if kind is int else kind(text)


def _trials_from_leaderboard(path: Path) -> list[TrialRow]:
    rows = []
    with path.open(newline="") as handle:
        for r in csv.DictReader(handle):
            rows.append(TrialRow(
                number=int(r["trial"]), state=r["state"], val_accuracy=_number(r["val_accuracy"]),
                val_balanced_accuracy=_number(r.get("val_balanced_accuracy", r["val_accuracy"])),
                macro_f1=_number(r["macro_f1"]), seconds=_number(r["seconds"]),
                backbone=r.get("backbone") or None, strategy=r.get("strategy") or None,
                cut=_number(r.get("cut"), int), feature_level=_number(r.get("feature_level"), int),
                from_rules={"True": True, "False": False}.get(r.get("from_rules", "")),
                all_levels=r.get("all_levels") == "True", all_levels_mode=r.get("all_levels_mode") or "level",
            ))
    return rows


def _trials_from_folders(trials_dir: Path) -> list[TrialRow]:
    """An unfinished search has no leaderboard yet; its trial folders tell most of it."""
    rows = []
    for folder in sorted(p for p in trials_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        plan = _read_json(folder / "plan.json") or {}
        metrics = _read_json(folder / "metrics.json")
        val = (metrics or {}).get("val", {})
        rows.append(TrialRow(
            number=int(folder.name), state="COMPLETE" if metrics else "UNFINISHED",
            val_accuracy=val.get("accuracy"), val_balanced_accuracy=val.get("balanced_accuracy", val.get("accuracy")),
            macro_f1=val.get("macro_f1"),
            seconds=(metrics or {}).get("seconds"), backbone=plan.get("backbone"),
            strategy=plan.get("strategy"), cut=plan.get("cut"), feature_level=plan.get("feature_level"),
            from_rules=None, all_levels=bool(plan.get("all_levels")), all_levels_mode=plan.get("all_levels_mode", "level"),
        ))
    return rows


def read_trials(run: Path) -> list[TrialRow]:
    """Every trial in number order, with each one's head and fine-tuning stages and the
    best completed objective (val balanced accuracy) so far."""
    if (run / "leaderboard.csv").is_file():
        rows = _trials_from_leaderboard(run / "leaderboard.csv")
    elif (run / "trials").is_dir():
        rows = _trials_from_folders(run / "trials")
    else:
        return []
    rows.sort(key=lambda r: r.number)
    best = None
    for row in rows:
        stages = (_read_json(run / "trials" / f"{row.number:04d}" / "metrics.json") or {}).get("stages", {})
        row.head_val_accuracy = stages.get("head_val_accuracy")
        row.finetune_val_accuracy = stages.get("finetune_val_accuracy")
        if row.state == "COMPLETE" and row.val_balanced_accuracy is not None:
            best = row.val_balanced_accuracy if best is None else max(best, row.val_balanced_accuracy)
        row.best_so_far = best
    return rows


# ------------------------------------------------------------------- the transfer curve


class _Depths:
    """Cut coordinates of one backbone: groups kept frozen by each strategy and level."""

    def __init__(self, backbone: str, profile: Profile | None) -> None:
        self.backbone = backbone
        self.profile = profile if profile is not None and profile.backbone == backbone else None
        try:
            self.groups: int | None = depth_of(backbone, None)[0]
            self.exact = True
        except AutotransferError:  # backbone not installed here: read the profile's depths
            self.groups = len(self.profile.depths) if self.profile else None
            self.exact = False

    def at_level(self, level: int | None) -> int | None:
        """Groups in the network truncated at `level`: all of them frozen is `frozen` there."""
        if level is None:
            return self.groups
        if self.exact:
            try:
                return depth_of(self.backbone, level)[0]
            except AutotransferError:
                return None
        if self.profile:
            match = [d.group + 1 for d in self.profile.depths if d.feature_level == level]
            return match[0] if match else self.groups
        return None

    def cut_of(self, strategy: str, cut: int | None, level: int | None) -> int | None:
        return {"frozen": self.at_level(level), "full": 0}.get(strategy, cut)


def _measured_points(depths: _Depths, plan: dict, stages: dict, trial: int | None) -> list[CurvePoint]:
    """A run's two points: its linear head (frozen at its level) and its fine-tuning."""
    strategy, level = plan.get("strategy"), plan.get("feature_level")
    points = []
    if plan.get("all_levels"):  # no single depth to plot it at
        return points
    head_x = depths.at_level(level)
    if stages.get("head_val_accuracy") is not None and head_x is not None:
        points.append(CurvePoint(head_x, stages["head_val_accuracy"], "trial-head", "frozen", level, trial))
    ft_x = depths.cut_of(strategy, plan.get("cut"), level)
    if strategy in ("partial", "full") and stages.get("finetune_val_accuracy") is not None and ft_x is not None:
        points.append(CurvePoint(ft_x, stages["finetune_val_accuracy"], "trial-finetune", strategy, level, trial))
    return points


def transfer_curve(
    depths: _Depths, profile: Profile | None, trials: list[TrialRow], plan: Plan | None,
    metrics: dict | None,
) -> list[CurvePoint]:
    """Every accuracy-at-a-cut the run measured, plus the profile's k-NN per depth."""
    points: list[CurvePoint] = []
    if depths.profile is not None:
        for d in depths.profile.depths:
            points.append(CurvePoint(d.group + 1, d.knn_accuracy, "profile-knn", "frozen", d.feature_level))
    complete = [t for t in trials if t.state == "COMPLETE" and t.strategy and t.backbone in (None, depths.backbone)]
    for t in complete:
        stages = {"head_val_accuracy": t.head_val_accuracy, "finetune_val_accuracy": t.finetune_val_accuracy}
        points += _measured_points(depths, asdict(t), _stages(stages, t.strategy, t.val_accuracy), t.number)
    if not trials and plan is not None and metrics is not None:  # an explicit run: itself
        stages = _stages(metrics.get("stages") or {}, plan.strategy, metrics["val"]["accuracy"])
        points += _measured_points(depths, asdict(plan), stages, None)
    return points


def _stages(stages: dict, strategy: str, accuracy: float) -> dict:
    """Runs from before stages were recorded: their final accuracy stands for the last stage."""
    if any(v is not None for v in stages.values()):
        return stages
    return {"head_val_accuracy" if strategy == "frozen" else "finetune_val_accuracy": accuracy}


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    classes: int, steps: int = 200, seed: int = 0,
) -> float:
    """Best val accuracy of a full-batch softmax regression on standardised features.

    Milliseconds on cached features; picks the best step on validation, as `fit` picks
    the best head epoch, so probe and trial heads read on the same scale.
    """
    small = train_x.numel() < 2_000_000  # thousands of tiny steps: see torch_threads
    with torch_threads(1 if small else torch.get_num_threads()):
        return _probe(train_x, train_y, val_x, val_y, classes, steps, seed)


def _probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
           classes: int, steps: int, seed: int) -> float:
    # features fresh from the extractor are inference tensors; autograd needs copies
    train_x, val_x, train_y, val_y = (t.clone() for t in (train_x.float(), val_x.float(), train_y, val_y))
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=1e-3)
    best = 0.0
    for step in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(train_x), train_y).backward()
        optimizer.step()
        if step % 5 == 4 or step == steps - 1:
            with torch.no_grad():
                best = max(best, float((head(val_x).argmax(1) == val_y).float().mean()))
    return best


def probe_points(plan: Plan, scan, depths: _Depths, progress: bool = False,
                 log: Callable[[str], None] = lambda _: None) -> list[CurvePoint]:
    """A measured frozen curve: a linear probe at every feature level and at the top.

    Features come from the feature cache (the trials filled it for their levels); the
    others cost one forward pass over train+val each.
    """
    from autotransfer.backbones import get_backbone
    from autotransfer.features import cached_features, weights_id
    from autotransfer.strategies import Preprocessing, build_net

    spec = get_backbone(plan.backbone)
    prep = Preprocessing.for_plan(spec, plan)
    wid = weights_id(spec, plan.weights, plan.seed)
    _, levels = depth_of(plan.backbone, None)
    points = []
    for level in [*range(levels), None]:
        frozen = replace(plan, strategy="frozen", cut=None, feature_level=level, all_levels=False, reasons=[])
        net = build_net(spec, frozen, len(scan.classes))
        (tx, ty, _), (vx, vy, _) = (
            cached_features(net, scan, split, prep, spec.architecture, wid, level, progress=progress)
            for split in ("train", "val")
        )
        accuracy = linear_probe(tx, ty, vx, vy, len(scan.classes), seed=plan.seed)
        where = "top" if level is None else f"level {level}"
        log(f"linear probe at {where}: val accuracy {accuracy:.4f}")
        points.append(CurvePoint(depths.at_level(level), accuracy, "probe", "frozen", level))
    return points


# ------------------------------------------------------------------ predictions, images


def _thumbnail(path: str) -> bytes:
    from autotransfer.data import load_rgb

    image = load_rgb(path)
    small = max(image.size) < THUMB_PX
    image = ImageOps.contain(image, (THUMB_PX, THUMB_PX),
                             Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def predict_val(run: Path, plan: Plan, data: Path, metrics: dict | None, limit: int,
                progress: bool = False) -> Predictions:
    """The run's model on the validation split of DATA (drawn as the run drew it)."""
    from tqdm.auto import tqdm

    from autotransfer.data import scan_folder
    from autotransfer.errors import DataError
    from autotransfer.features import eval_transform, image_loader

    model, classes, prep = load_model(run)
    scan = scan_folder(data, plan.val_fraction, plan.seed)
    if scan.classes != classes:
        raise DataError(
            f"{data} has classes {', '.join(scan.classes)} but the model knows {', '.join(classes)}; "
            "pass the data the run was trained on with --data"
        )
    records = scan.splits["val"]
    probs, labels = [], []
    with torch.inference_mode():
        loader = image_loader(records, eval_transform(prep), 64)
        for images, targets in tqdm(loader, desc="val predictions", leave=False, disable=not progress):
            probs.append(model(images).softmax(1))
            labels.append(targets)
    prob, label = torch.cat(probs), torch.cat(labels)
    confidence, predicted = prob.max(1)
    wrong = [i for i in range(len(records)) if predicted[i] != label[i]]
    wrong.sort(key=lambda i: -float(confidence[i]))
    recorded = (metrics or {}).get("data_hash", {}).get("val")
    items = [
        Misclassified(records[i].path, classes[int(label[i])], classes[int(predicted[i])],
                      round(float(confidence[i]), 4), _thumbnail(records[i].path))
        for i in wrong[:limit]
    ]
    return Predictions(
        data=str(data), n=len(records), accuracy=1 - len(wrong) / max(len(records), 1),
        run_accuracy=(metrics or {}).get("val", {}).get("accuracy"),
        same_data=None if recorded is None else recorded == scan.content_hash("val"),
        misclassified_total=len(wrong), misclassified=items,
    )


# ------------------------------------------------------------------------ building it


def _data_path(data: Path | None, search: dict | None, scan: dict | None) -> tuple[Path | None, list[str]]:
    """Where the images are: --data, else search.json's (absolute), else scan.json's root."""
    candidates = [data] if data is not None else [
        Path(p) for p in ((search or {}).get("data"), (scan or {}).get("root")) if p
    ]
    for path in candidates:
        if path.is_dir():
            return path, []
    return None, [str(p) for p in candidates]


def _fit_args(plan: Plan | None) -> str:
    """The options that make a profile or a search see the data as this run did."""
    if plan is None:
        return ""
    parts = [f"--backbone {plan.backbone}"]
    if plan.weights != "pretrained":
        parts.append(f"--weights {plan.weights}")
    if plan.image_size:
        parts.append(f"--image-size {plan.image_size}")
    return " ".join(parts)


def build_report(
    run: str | Path, data: str | Path | None = None, curve: bool = False,
    max_misclassified: int = DEFAULT_MISCLASSIFIED, progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> Report:
    """Read RUN, recompute its validation predictions, and gather every section's facts.

    RunError if RUN is not a run. A missing part (profile, search, model, data) leaves its
    section empty with the reason and the command that fills it in `missing`.
    """
    run = Path(run)
    check_run(run)
    plan = Plan.load(run / "plan.json") if (run / "plan.json").is_file() else None
    metrics = _read_json(run / "metrics.json")
    scan = _read_json(run / "scan.json")
    search = _read_json(run / "search.json")
    profile = load_profile(run, plan.backbone if plan else None)
    trials = read_trials(run) if search is not None or (run / "trials").is_dir() else []
    kind = "explicit" if search is None else "search" if plan is not None else "search (no winner yet)"
    missing: dict[str, str] = {}
    notes: list[str] = []
    data_path, tried = _data_path(Path(data) if data is not None else None, search, scan)
    shown = data_path or (tried[0] if tried else "DATA")
    args = _fit_args(plan)

    if profile is None:
        missing["profile"] = (
            "no profile.json: explicit runs (`fit --strategy`) are not profiled; "
            f"`autotransfer profile {shown} {args} --out {run}/profile.json` writes one, "
            f"then `autotransfer report {run}` again"
        )
    if plan is None:
        missing["decision"] = (
            "no plan.json: the search has not adopted a winner yet (interrupted, or still "
            f"running); `autotransfer fit {shown} --resume --out {run}` finishes it"
        )
    elif search is None:
        notes.append("explicit run: the Plan was given on the command line, so it carries no reasons")
    if search is None:
        missing["search"] = (
            "no search: this run trained the one Plan it was given; "
            f"`autotransfer fit {shown} {args} --out RUN` (no --strategy) profiles the data, "
            "searches from the rules' Plans and records every trial"
        )
    elif not trials:
        missing["search"] = f"the search in {run} has no trial yet"
    if metrics is None:
        missing["results"] = f"no metrics.json in {run}: no model was trained to the end"

    backbone = plan.backbone if plan else (search or {}).get("base", {}).get("backbone") or (profile.backbone if profile else None)
    depths = _Depths(backbone, profile) if backbone else None
    points = transfer_curve(depths, profile, trials, plan, metrics) if depths and depths.groups else []
    if plan is None or not (run / MODEL_FILE).is_file():
        missing["misclassified"] = f"no {MODEL_FILE} in {run}: nothing to predict with"
    elif max_misclassified == 0:
        missing["misclassified"] = f"skipped (--max-misclassified 0); `autotransfer report {run}` shows them"
    elif data_path is None:
        missing["misclassified"] = (
            f"the images are not where the run found them ({', '.join(tried) or 'not recorded'}); "
            f"`autotransfer report {run} --data DIR` points to them"
        )
    predictions = None
    if "misclassified" not in missing:
        try:
            predictions = predict_val(run, plan, data_path, metrics, max_misclassified, progress)
        except AutotransferError as exc:
            missing["misclassified"] = str(exc)
        else:
            log(f"val predictions recomputed on {data_path}: {predictions.misclassified_total} of {predictions.n} misclassified")
            if predictions.same_data is False:
                notes.append(
                    f"the validation images in {data_path} differ from the ones the run was "
                    "measured on (content hash); predictions and misclassified images are of the current files"
                )
    if curve:
        if plan is None or data_path is None or depths is None or not depths.exact:
            missing["probe"] = (
                "--curve needs plan.json, the images and the backbone installed: "
                + ", ".join(m for m, ok in (("plan.json", plan), ("images", data_path),
                                             ("backbone", depths and depths.exact)) if not ok) + " missing"
            )
        else:
            from autotransfer.data import scan_folder

            scanned = scan_folder(data_path, plan.val_fraction, plan.seed)
            points += probe_points(plan, scanned, depths, progress, log)
    if not points:
        missing["curve"] = "no accuracy at any depth: the run has no profile and no finished trial or stage"
    elif depths is not None and not depths.exact:
        notes.append(f"backbone {backbone} is not installed here: cut depths read from the profile")
    other = sorted({t.backbone for t in trials if t.backbone and t.backbone != backbone})
    if other:
        notes.append(f"the curve shows {backbone} only; trials of {', '.join(other)} are in the search history")

    winner = None
    if plan is not None:
        match = next((re.search(r"won the search: trial (\d+)", r) for r in plan.reasons if "won the search" in r), None)
        winner = int(match.group(1)) if match else None
    group_names = [d.module.replace(" (pre-logits)", "") for d in depths.profile.depths] if depths and depths.profile else []
    return Report(
        schema=SCHEMA, run=str(run), kind=kind,
        created=datetime.datetime.now().isoformat(timespec="seconds"),
        data=str(data_path) if data_path else None,
        plan=plan, decision=describe(plan) if plan else None, metrics=metrics, scan=scan,
        profile=profile, search=search, groups=depths.groups if depths else None,
        group_names=group_names, curve=points, trials=trials, winner=winner,
        predictions=predictions, missing=missing, notes=notes,
        versions={"autotransfer": __version__, **((metrics or {}).get("versions") or {})},
    )


# ------------------------------------------------------------------------- the figures


@dataclass
class Chart:
    name: str  # file stem under figures/
    caption: str
    png: bytes


def _best_per_cut(points: list[CurvePoint]) -> tuple[list[int], list[float]]:
    best: dict[int, float] = {}
    for p in points:
        best[p.cut] = max(best.get(p.cut, 0.0), p.accuracy)
    xs = sorted(best)
    return xs, [best[x] for x in xs]


def _majority(metrics: dict | None) -> float | None:
    matrix = ((metrics or {}).get("val") or {}).get("confusion_matrix")
    if not matrix:
        return None
    rows = [sum(r) for r in matrix]
    return max(rows) / max(sum(rows), 1)


def curve_figure(report: Report) -> bytes | None:
    if not report.curve or not report.groups:
        return None
    by = lambda source: [p for p in report.curve if p.source == source]  # noqa: E731
    blue, orange = plots.STRATEGY_COLOURS["frozen"], plots.STRATEGY_COLOURS["partial"]
    series = []
    if by("profile-knn"):
        xs, ys = _best_per_cut(by("profile-knn"))
        series.append(plots.Series("frozen: k-NN on the profile's features (proxy)", xs, ys, blue, "o", dashed=True, filled=False))
    if by("probe"):
        xs, ys = _best_per_cut(by("probe"))
        series.append(plots.Series("frozen: linear probe per level (--curve)", xs, ys, "#17becf", "^"))
    if by("trial-head"):
        xs, ys = _best_per_cut(by("trial-head"))
        series.append(plots.Series("frozen: linear heads of the trials (best per cut)", xs, ys, blue, "o"))
    if by("trial-finetune"):
        xs, ys = _best_per_cut(by("trial-finetune"))
        series.append(plots.Series("fine-tuned: partial/full trials (best per cut)", xs, ys, orange, "s"))
    highlight = None
    plan, metrics = report.plan, report.metrics
    if plan is not None and metrics is not None:
        accuracy = metrics["val"]["accuracy"]
        mine = [p for p in report.curve if p.trial == report.winner and p.source.startswith("trial")]
        if mine:  # the head, or the fine-tuning if it beat the head: whichever the model is
            highlight = (min(mine, key=lambda p: abs(p.accuracy - accuracy)).cut, accuracy)
    names = report.group_names
    ticks = ["0\n(none)"] + [
        f"{x}\n{names[x - 1][:11]}" if len(names) >= x else str(x) for x in range(1, report.groups + 1)
    ]
    return plots.transfer_curve(series, ticks, _majority(metrics), highlight)


def figures(report: Report) -> list[Chart]:
    """Every figure the report shows, drawn once for both the HTML and the Markdown."""
    out = []
    p = report.profile
    if p is not None:
        out.append(Chart("class-balance", "Images per class and split (profile).",
                          plots.class_balance(p.size.classes, p.size.per_class)))
        if p.summary.method == "bn_gap_relative":
            values, label = [d.bn_gap_relative for d in p.depths], "relative BN gap (1 = calibration photos)"
            refs = {"calibration photos (1)": 1.0, f"far from ImageNet (rules: {THRESHOLDS.far_distance:g})": THRESHOLDS.far_distance}
        elif any(d.frechet is not None for d in p.depths):
            values, label, refs = [d.frechet for d in p.depths], "Frechet distance (relative)", None
        else:
            values, label, refs = [d.bn_gap for d in p.depths], "BN gap (uncalibrated)", None
        labels = [f"{d.group}: {d.module.replace(' (pre-logits)', '')}"[:18] for d in p.depths]
        out.append(Chart("distance", f"Distance to the pretraining data at every depth ({label}).",
                          plots.distance_by_depth(labels, values, label, refs)))
    png = curve_figure(report)
    if png:
        out.append(Chart("transfer-curve", "Accuracy against the cut depth on this dataset.", png))
    if report.trials:
        out.append(Chart("search-history", "Validation balanced accuracy (the search's objective) of every trial, in the order they ran.",
                          plots.search_history([t.number for t in report.trials], [t.val_balanced_accuracy for t in report.trials],
                                               [t.state for t in report.trials], [t.from_rules for t in report.trials],
                                               report.winner if any(t.number == report.winner and t.state == "COMPLETE" for t in report.trials) else None)))
    if report.metrics:
        classes = list(report.metrics["val"]["per_class_accuracy"])
        for split in ("val", "test"):
            if split in report.metrics:
                out.append(Chart(f"confusion-{split}", f"Confusion matrix, {split} split (rows: true class).",
                                  plots.confusion(report.metrics[split]["confusion_matrix"], classes, f"{split}: confusion matrix")))
    return out


# ---------------------------------------------------------------------------- writing


def write_report(report: Report, out: str | Path) -> dict[str, Path]:
    """report.html (self-contained), report.md (+ figures/, misclassified/) and report.json."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figs = figures(report)
    for fig in figs:
        (out / "figures" / f"{fig.name}.png").write_bytes(fig.png)
    if report.predictions and report.predictions.misclassified:
        (out / "misclassified").mkdir(exist_ok=True)
        for i, item in enumerate(report.predictions.misclassified):
            (out / "misclassified" / f"{i:03d}.jpg").write_bytes(item.thumbnail)
    paths = {"html": out / "report.html", "md": out / "report.md", "json": out / "report.json"}
    paths["html"].write_text(render_html(report, figs))
    paths["md"].write_text(render_markdown(report, figs))
    paths["json"].write_text(report.to_json() + "\n")
    return paths


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _sections(r: Report) -> list[tuple[str, str, list]]:
    """(anchor, title, blocks); a block is ("p", text) | ("b", text) | ("h3", text) |
    ("table", header, rows) | ("list", items) | ("figure", name) | ("missing", text) |
    ("note", text) | ("grid", items). Text is plain, `backticks` mark code: each renderer
    escapes it for its format."""
    sections = []

    # 1. the data
    blocks: list = []
    p = r.profile
    if p is not None:
        s = p.size
        blocks.append(("p", f"{p.root}: {len(s.classes)} classes; profiled with {p.backbone} ({p.weights}) at {p.image_size} px."))
        blocks.append(("table", ["split", "images"], [[k, v] for k, v in s.images.items()]))
        t = s.train_per_class
        blocks.append(("p", f"Train images per class: min {t.min:g}, median {t.median:g}, max {t.max:g}; "
                            f"imbalance (largest / smallest) {s.imbalance_ratio:.1f}."))
        blocks.append(("figure", "class-balance"))
        im = p.images
        blocks.append(("table", ["", "min", "median", "max"], [
            ["width (px)", *(f"{v:g}" for v in (im.width.min, im.width.median, im.width.max))],
            ["height (px)", *(f"{v:g}" for v in (im.height.min, im.height.median, im.height.max))]]))
        blocks.append(("p", "Formats: " + ", ".join(f"{k} {v}" for k, v in im.formats.items())
                       + "; modes: " + ", ".join(f"{k} {v}" for k, v in im.modes.items())
                       + f"; grayscale {im.grayscale_fraction:.0%}; channel mean "
                       + ", ".join(f"{v:.3f}" for v in im.channel_mean) + ", std "
                       + ", ".join(f"{v:.3f}" for v in im.channel_std) + " (0..1, as the network sees them)."))
        q = p.quality
        blocks.append(("h3", "Quality"))
        if q.skipped:
            blocks.append(("p", f"{len(q.skipped)} file(s) skipped as unusable:"))
            blocks.append(("table", ["file", "reason"], [[x.path, x.reason] for x in q.skipped[:LISTED]]))
        else:
            blocks.append(("p", "Skipped files: none."))
        if q.duplicates:
            blocks.append(("p", f"Exact duplicates: {len(q.duplicates)} group(s), {q.duplicate_files} extra file(s), "
                                f"{q.leaked_files} file(s) in groups across splits (leakage)."))
            blocks.append(("table", ["", "files [split]"], [
                [("LEAK " if g.leak else "") + ("LABELS DIFFER" if g.label_conflict else ""),
                 " = ".join(f"{path} [{sp}]" for path, sp in zip(g.paths, g.splits))] for g in q.duplicates[:LISTED]]))
        else:
            blocks.append(("p", "Exact duplicates: none."))
        blocks.append(("h3", "Distance to ImageNet and transferability, per depth"))
        sm = p.summary
        blocks.append(("p", f"Summary distance: {_fmt(sm.distance, '.2f')} ({sm.method}); "
                            f"best depth by k-NN {sm.best_knn_depth}, by LogME {sm.best_logme_depth}."))
        blocks.append(("figure", "distance"))
        blocks.append(("table", ["depth", "module", "level", "channels", "BN gap", "relative", "Frechet", "LogME", "k-NN"], [
            [d.group, d.module, _fmt(d.feature_level), d.channels, _fmt(d.bn_gap, ".3f"), _fmt(d.bn_gap_relative, ".2f"),
             _fmt(d.frechet, ".3f"), _fmt(d.logme, ".3f"), _fmt(d.knn_accuracy, ".3f")] for d in p.depths]))
        b = p.baselines
        blocks.append(("p", f"Baselines: k-NN majority class {b.knn_accuracy:.3f}, balanced {b.knn_balanced_accuracy:.3f}, "
                            f"LogME of a constant feature {b.logme:.3f} (k = {b.k}; leave-one-out on the profiled images)."))
        if sm.notes:
            blocks.append(("list", sm.notes))
    else:
        if r.scan:
            sc = r.scan
            blocks.append(("p", f"{sc['root']}: {len(sc['classes'])} classes ({', '.join(sc['classes'][:20])}"
                                f"{', ...' if len(sc['classes']) > 20 else ''}); from scan.json."))
            blocks.append(("table", ["split", "images"], [[k, v] for k, v in sc["images"].items()]))
            skipped = sc.get("skipped", [])
            blocks.append(("p", f"{len(skipped)} file(s) skipped as unusable" + (":" if skipped else ".")))
            if skipped:
                blocks.append(("table", ["file", "reason"], [[x["path"], x["reason"]] for x in skipped[:LISTED]]))
        blocks.append(("missing", r.missing["profile"]))
    sections.append(("profile", "The data", blocks))

    # 2. the decision
    blocks = []
    if r.plan is not None:
        blocks.append(("b", r.decision))
        if r.plan.reasons:
            blocks.append(("list", r.plan.reasons))
        keys = ["backbone", "strategy", "cut", "feature_level", "all_levels", "all_levels_mode", "bn_mode", "weights", "image_size",
                "epochs", "lr", "backbone_lr_ratio", "weight_decay", "class_weighting", "lp_init", "batch_size", "seed"]
        plan = asdict(r.plan)
        blocks.append(("table", ["plan field", "value"], [[k, _fmt(plan[k], ".3g")] for k in keys if k in plan]))
        blocks.append(("p", f"`autotransfer fit {r.data or 'DATA'} --plan {r.run}/plan.json --out RUN2` runs this Plan again."))
    else:
        blocks.append(("missing", r.missing["decision"]))
    if r.trials:
        states = [t.state for t in r.trials]
        started = [t for t in r.trials if t.state != "WAITING"]
        text = (f"{len(started)} trial(s) ran: {sum(bool(t.from_rules) for t in started)} queued by the rules, "
                f"{sum(t.from_rules is False for t in started)} sampled; {states.count('COMPLETE')} complete, "
                f"{states.count('PRUNED')} pruned, "
                f"{len(started) - states.count('COMPLETE') - states.count('PRUNED')} failed or unfinished.")
        if "WAITING" in states:
            text += f" {states.count('WAITING')} more were queued but never started (the time budget ran out)."
        blocks.append(("p", text))
    blocks += [("note", n) for n in r.notes if "explicit run" in n]
    sections.append(("decision", "The decision", blocks))

    # 3. the transfer curve
    blocks = []
    if r.curve:
        blocks.append(("p", "Yosinski et al. (2014) measured how transferable each layer is by cutting a "
                            "network at every depth, freezing what is below (or fine-tuning it) and training "
                            "the rest. This is the same picture for this dataset: x is the cut, the number of "
                            "coarse groups kept frozen (stem first, the coordinate of `--cut`); a frozen "
                            "extractor at a depth freezes every group up to it, full fine-tuning freezes none."))
        blocks.append(("figure", "transfer-curve"))
        sources = {p.source for p in r.curve}
        explained = {
            "profile-knn": "k-NN (dashed): leave-one-out k-NN accuracy of the profile's pooled features at each "
                           "depth, over the profiled sample of train+val: a cheap proxy for a frozen extractor cut there.",
            "probe": "linear probe: a softmax regression on cached features at every feature level, trained on "
                     "train, best step on val (`report --curve`).",
            "trial-head": "linear heads: every run first trains a linear head on frozen features at its level; that "
                          "stage's val accuracy is a measured frozen point.",
            "trial-finetune": "fine-tuned: a partial run sits at its cut, full fine-tuning at 0; truncated runs "
                              "(feature level) at the cut of their own network.",
        }
        blocks.append(("list", [text for source, text in explained.items() if source in sources]))
        blocks.append(("table", ["cut", "accuracy", "measured by", "strategy", "features from", "trial"], [
            [p.cut, _fmt(p.accuracy), p.source, p.strategy, _features_from(r, p), _fmt(p.trial)]
            for p in sorted(r.curve, key=lambda p: (p.source, p.cut, p.trial or -1))]))
    else:
        blocks.append(("missing", r.missing.get("curve", "no curve")))
    if "probe" in r.missing:
        blocks.append(("missing", r.missing["probe"]))
    elif not any(p.source == "probe" for p in r.curve) and r.curve:
        blocks.append(("p", f"`autotransfer report {r.run} --curve` adds a linear probe at every feature level "
                            "(a measured frozen curve; one forward pass per level not yet in the feature cache)."))
    blocks += [("note", n) for n in r.notes if "curve" in n or "not installed" in n]
    sections.append(("curve", "Layer transfer on this dataset", blocks))

    # 4. search history
    blocks = []
    if r.trials:
        blocks.append(("figure", "search-history"))
        blocks.append(("table", ["trial", "state", "val balanced acc", "val acc", "best so far", "head", "fine-tuned",
                                 "strategy", "cut", "level", "origin", "seconds"], [
            [t.number, t.state, _fmt(t.val_balanced_accuracy), _fmt(t.val_accuracy), _fmt(t.best_so_far), _fmt(t.head_val_accuracy),
             _fmt(t.finetune_val_accuracy), t.strategy or "-", _fmt(t.cut),
             "-" if t.strategy is None else {"level": "all", "feature": "all, per feature", "ensemble": "all, mean of 3"}.get(t.all_levels_mode, "all") if t.all_levels else "top" if t.feature_level is None else t.feature_level,
             "-" if t.state == "WAITING" else {True: "rules", False: "sampled", None: "-"}[t.from_rules],
             _fmt(t.seconds, ".0f")]
            for t in r.trials]))
    else:
        blocks.append(("missing", r.missing.get("search", "no trials")))
    sections.append(("search", "Search history", blocks))

    # 5. results
    blocks = []
    m = r.metrics
    if m:
        line = f"Validation: accuracy {m['val']['accuracy']:.4f}, macro-F1 {m['val']['macro_f1']:.4f} ({m['val']['n']} images)"
        if "test" in m:
            line += f"; test: accuracy {m['test']['accuracy']:.4f}, macro-F1 {m['test']['macro_f1']:.4f} ({m['test']['n']} images)"
        blocks.append(("p", line + "."))
        stages = m.get("stages", {})
        if stages:
            blocks.append(("p", "Stages: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in stages.items()) + "."))
        splits = [s for s in ("val", "test") if s in m]
        blocks.append(("table", ["class", *[f"{s} accuracy" for s in splits]], [
            [c, *[_fmt(m[s]["per_class_accuracy"].get(c)) for s in splits]] for c in m["val"]["per_class_accuracy"]]))
        blocks += [("figure", f"confusion-{s}") for s in splits]
    else:
        blocks.append(("missing", r.missing["results"]))
    sections.append(("results", "Results", blocks))

    # 6. misclassified
    blocks = []
    pr = r.predictions
    if pr is not None:
        text = (f"Recomputed on {pr.data}: {pr.misclassified_total} of {pr.n} validation images misclassified "
                f"(accuracy {pr.accuracy:.4f}")
        text += f"; metrics.json: {pr.run_accuracy:.4f})." if pr.run_accuracy is not None else ")."
        if pr.misclassified:
            text += f" Most confident mistakes first; {len(pr.misclassified)} shown."
        blocks.append(("p", text))
        blocks += [("note", n) for n in r.notes if "differ" in n]
        if pr.misclassified:
            blocks.append(("grid", pr.misclassified))
    else:
        blocks.append(("missing", r.missing.get("misclassified", "not computed")))
    sections.append(("misclassified", "Misclassified validation images", blocks))
    return sections


def _features_from(report: Report, point: CurvePoint) -> str:
    """Where the classifier reads: a profile depth's module, else the level or the top."""
    if point.source == "profile-knn" and len(report.group_names) >= point.cut:
        return f"depth {point.cut - 1}: {report.group_names[point.cut - 1]}"
    return "top" if point.feature_level is None else f"feature level {point.feature_level}"


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1040px;margin:0 auto;padding:8px 24px 48px;background:#fff}
header{border-bottom:1px solid #ddd;margin-bottom:8px}
h1{font-size:24px;margin:18px 0 4px} h2{font-size:20px;margin-top:32px;border-bottom:1px solid #eee;padding-bottom:4px}
h3{font-size:16px;margin-top:20px}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none} .lead{font-size:16px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0} figure img{max-width:100%;height:auto;border:1px solid #eee} figcaption{font-size:13px;color:#555}
.missing{background:#fff6e5;border-left:4px solid #f0a500;padding:8px 12px;margin:8px 0}
.note{background:#eef5ff;border-left:4px solid #5b9bd5;padding:8px 12px;margin:8px 0}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:10px} .cell{width:112px;font-size:11px;word-break:break-all}
.cell img{width:96px;height:96px;object-fit:contain;background:#eee;display:block;border:1px solid #ccc}
.cell .t{color:#2a7a2a} .cell .p{color:#b22}
footer{margin-top:32px;font-size:12px;color:#777}
"""


def _data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def _code_spans(text: str) -> Markup:
    """Escape plain text, then turn `backtick` spans into <code>."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


# Jinja2 escapes every value (class names, paths, reasons: any of them may hold markup);
# only the template's own tags, and <code> from `_code_spans`, are HTML.
_HTML = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_HTML.filters.update(code=_code_spans, data_uri=_data_uri, name=lambda path: Path(path).name)
_HTML.tests["numeric"] = lambda v: isinstance(v, (int, float)) or re.fullmatch(r"-?[0-9.]+", str(v)) is not None
_PAGE = _HTML.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autotransfer report: {{ r.run }}</title><style>{{ css }}</style></head>
<body><main>
<header><h1>autotransfer report: {{ r.run }}</h1>
<p class="lead">{{ r.kind }} run{% if r.decision %}; chosen: <b>{{ r.decision }}</b>{% endif %}
{% if r.decision and r.metrics %}; val accuracy <b>{{ "%.4f"|format(r.metrics["val"]["accuracy"]) }}</b>{% endif %}</p>
<nav>{% for anchor, title, _ in sections %}<a href="#{{ anchor }}">{{ loop.index }}. {{ title }}</a>{% endfor %}</nav>
</header>
{% for anchor, title, blocks in sections %}
<section id="{{ anchor }}"><h2>{{ loop.index }}. {{ title }}</h2>
{% for block in blocks %}
{% if block[0] == "p" %}<p>{{ block[1]|code }}</p>
{% elif block[0] == "b" %}<p><b>{{ block[1] }}</b></p>
{% elif block[0] == "h3" %}<h3>{{ block[1] }}</h3>
{% elif block[0] == "list" %}<ul>{% for item in block[1] %}<li>{{ item|code }}</li>{% endfor %}</ul>
{% elif block[0] == "missing" %}<div class="missing">Missing: {{ block[1]|code }}</div>
{% elif block[0] == "note" %}<div class="note">{{ block[1]|code }}</div>
{% elif block[0] == "table" %}
<table><tr>{% for h in block[1] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in block[2] %}<tr>{% for v in row %}<td{% if v is numeric %} class="num"{% endif %}>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% elif block[0] == "figure" and block[1] in figures %}
<figure><img alt="{{ figures[block[1]].caption }}" src="{{ figures[block[1]].png|data_uri }}"><figcaption>{{ figures[block[1]].caption }}</figcaption></figure>
{% elif block[0] == "grid" %}
<div class="grid">{% for item in block[1] %}<div class="cell" title="{{ item.path }}"><img alt="{{ item.path|name }}" src="{{ item.thumbnail|data_uri("image/jpeg") }}"><span class="t">true {{ item.true }}</span><br><span class="p">pred {{ item.predicted }} ({{ "%.2f"|format(item.confidence) }})</span><br>{{ item.path|name }}</div>{% endfor %}</div>
{% endif %}
{% endfor %}
</section>
{% endfor %}
<footer>Generated {{ r.created }} by <code>autotransfer report</code> from {{ r.run }}; {{ versions }}. Data: report.json next to this file.</footer>
</main></body></html>
""")


def render_html(report: Report, figs: list[Chart]) -> str:
    """One self-contained page: inline CSS, data-URI images, no script, no network."""
    return _PAGE.render(
        r=report, sections=_sections(report), figures={f.name: f for f in figs}, css=Markup(_CSS),
        versions=", ".join(f"{k} {v}" for k, v in report.versions.items()),
    ) + "\n"


def _md(text) -> str:
    """One line of Markdown text. Markdown passes HTML through, so no value (a class name,
    a path, a reason) may open a tag: its < and > become entities."""
    return " ".join(str(text).splitlines()).replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(value) -> str:
    return _md(value).replace("|", "\\|")


def render_markdown(report: Report, figs: list[Chart]) -> str:
    """The same sections in Markdown; figures and thumbnails are files beside it."""
    by_name = {f.name: f for f in figs}
    r = report
    lines = [f"# autotransfer report: {_md(r.run)}", ""]
    if r.decision:
        lines.append(f"{r.kind} run; chosen: **{_md(r.decision)}**"
                     + (f"; val accuracy **{r.metrics['val']['accuracy']:.4f}**" if r.metrics else ""))
    else:
        lines.append(f"{r.kind} run")
    lines.append("")
    for i, (_, title, blocks) in enumerate(_sections(r), 1):
        lines += [f"## {i}. {title}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "p":
                lines += [_md(block[1]), ""]
            elif kind == "b":
                lines += [f"**{_md(block[1])}**", ""]
            elif kind == "h3":
                lines += [f"### {_md(block[1])}", ""]
            elif kind == "list":
                lines += [f"- {_md(x)}" for x in block[1]] + [""]
            elif kind == "missing":
                lines += [f"> **Missing:** {_md(block[1])}", ""]
            elif kind == "note":
                lines += [f"> {_md(block[1])}", ""]
            elif kind == "table":
                header, rows = block[1], block[2]
                lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
                lines.append("")
            elif kind == "figure" and block[1] in by_name:
                fig = by_name[block[1]]
                lines += [f"![{_md(fig.caption)}](figures/{fig.name}.png)", ""]
            elif kind == "grid":
                lines.append("| image | true | predicted | confidence | file |")
                lines.append("|---|---|---|---|---|")
                for k, item in enumerate(block[1]):
                    lines.append(f"| ![](misclassified/{k:03d}.jpg) | {_md_cell(item.true)} | {_md_cell(item.predicted)} "
                                 f"| {item.confidence:.2f} | {_md_cell(item.path)} |")
                lines.append("")
    lines.append(f"Generated {r.created} by `autotransfer report`; " + ", ".join(f"{k} {v}" for k, v in r.versions.items()) + ".")
    return "\n".join(lines) + "\n"
