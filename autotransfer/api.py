"""autotransfer from Python: the functions the command line is a thin layer over.

    import autotransfer as at
    run = at.fit("data", out="runs/mine")       # profile -> rules -> search -> RUN folder
    run.plan, run.metrics, run.leaderboard       # what won, its scores, every trial
    model = at.load(run)                         # or at.load("runs/mine")
    model.predict("cat.jpg").label               # or PIL images, numpy arrays, lists of them
    model.evaluate("data")                       # accuracy, macro-F1, confusion matrix

Progress lines go to `log` (default print), warnings about the data to `warn` (default
stderr); pass None to silence either. Errors are AutotransferErrors with a one-line
message; Ctrl-C during `fit` raises `Interrupted` (a KeyboardInterrupt) saying what was kept.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from autotransfer.errors import AutotransferError, UsageError, interruptible
from autotransfer.plan import DEFAULT_BACKBONE, LOGGERS, Compute, Plan, check_number, ranked_lines
from autotransfer.predict import Model, Prediction
from autotransfer.predict import load as _load_model
from autotransfer.profile import Profile

if TYPE_CHECKING:
    import pandas

    from autotransfer.data import DatasetScan
    from autotransfer.search import SearchProgress

__all__ = ["Model", "Prediction", "Profile", "Plan", "Run", "fit", "load", "plan", "profile", "wants_progress"]

Log = Optional[Callable[[str], None]]  # None: silent
# Plan fields a caller may set; backbone and strategy are arguments of their own, and
# compute is accelerator=, devices=, precision=
PLAN_OPTIONS = tuple(f.name for f in fields(Plan) if f.name not in ("backbone", "strategy", "reasons", "compute"))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _silent(_: str) -> None:
    pass


def wants_progress(progress: bool | None = None) -> bool:
    """Progress bars redraw their line with carriage returns, which fill a log file or a
    pipe with noise: so by default (None) only in a notebook or when stdout and stderr are
    both terminals. True or False is obeyed."""
    if progress is not None:
        return progress
    if "ipykernel" in sys.modules:
        return True
    return all(_is_terminal(stream) for stream in (sys.stdout, sys.stderr))


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no such method, or closed
        return False


@dataclass
class Run:
    """A RUN folder, read when asked: what `fit` returns, or `Run("runs/mine")` for an
    earlier one."""

    path: Path
    seconds: float | None = None  # how long `fit` took (None for a Run opened later)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def plan(self) -> Plan | None:
        """The Plan that was trained (a search's winner, with its reasons); None before one is."""
        path = self.path / "plan.json"
        return Plan.load(path) if path.is_file() else None

    @property
    def metrics(self) -> dict | None:
        """metrics.json: val (and test) accuracy, balanced accuracy, macro-F1, per class,
        confusion matrix, stages; None before a model is trained."""
        import json

        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def leaderboard(self) -> list[dict]:
        """Every trial of the search, best first, as leaderboard.csv holds them (numbers as
        numbers, empty cells as None); [] for a run of one Plan."""
        path = self.path / "leaderboard.csv"
        if not path.is_file():
            return []
        with path.open(newline="") as handle:
            return [{key: _cell(value) for key, value in row.items()} for row in csv.DictReader(handle)]

    def leaderboard_frame(self) -> "pandas.DataFrame":
        """`leaderboard` as a pandas DataFrame (needs pandas)."""
        try:
            import pandas
        except ImportError:
            raise AutotransferError(
                "leaderboard_frame() needs pandas, which is not installed: `pip install pandas`, "
                "or use run.leaderboard (the same rows as a list of dicts)"
            ) from None
        return pandas.DataFrame(self.leaderboard)

    def report(
        self, out: str | Path | None = None, *, data: str | Path | None = None, curve: bool = False,
        max_misclassified: int | None = None, progress: bool | None = None, log: Log = None, warn: Log = _stderr,
    ) -> Path:
        """Write report.html (self-contained), report.md and report.json to `out` (default
        RUN/report) and return the path of report.html. What the run lacks for a section is
        passed to `warn`, with the command that produces it."""
        from autotransfer.report import DEFAULT_MISCLASSIFIED, build_report, write_report

        limit = DEFAULT_MISCLASSIFIED if max_misclassified is None else max_misclassified
        result = build_report(self.path, data, curve, limit, wants_progress(progress), log or _silent)
        paths = write_report(result, out if out is not None else self.path / "report")
        for section, why in result.missing.items():
            (warn or _silent)(f"{section}: {why}")
        return paths["html"]

    def load(self) -> Model:
        """The trained model: `load(run)`."""
        return load(self)


def _cell(text: str | None) -> Any:
    if text is None or text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load(run: Run | str | Path) -> Model:
    """The model of a RUN (a Run, its folder or its model.pt): `.predict(images)`,
    `.evaluate(data)`, `.classes`. RunError if it holds no autotransfer model."""
    return _load_model(run.path if isinstance(run, Run) else run)


def profile(
    data: str | Path, backbone: str = DEFAULT_BACKBONE, *, weights: str = "pretrained", max_images: int = 1000,
    image_size: int | None = None, calibration: str | Path | None = None, seed: int = 0,
    progress: bool | None = None,
) -> Profile:
    """Measure DATA for a backbone: size, images, quality, distance to ImageNet per depth
    (`autotransfer profile`), at `image_size`, else at the size `fit` would train at (128
    px for small images, else the backbone's). `Profile.save(path)` writes it as JSON."""
    from autotransfer.data import scan_folder
    from autotransfer.profile import profile_dataset
    from autotransfer.rules import input_size

    check_number("image_size", image_size)
    check_number("seed", seed)
    scan = scan_folder(data, 0.2, seed)
    return profile_dataset(data, backbone, weights, max_images=max_images, image_size=image_size or input_size(scan.median_side()),
                           calibration=calibration, seed=seed, progress=wants_progress(progress), scan=scan)


def plan(
    data: str | Path, *, backbone: str | Sequence[str] | None = None, max_images: int = 400,
    progress: bool | None = None, log: Log = print, warn: Log = _stderr, **options: Any,
) -> list[Plan]:
    """Profile DATA for the candidate backbones and rank Plans by the rules, best first,
    each with its reasons (`autotransfer plan`). `options` are Plan fields (weights,
    image_size, epochs, lr, seed, ...); `fit(data, plan=plans[0])` runs one."""
    log, warn = log or _silent, warn or _silent
    _check_options(options)
    _no_decided_options(options)
    candidates = _candidates(_backbones(backbone), options.get("weights", "pretrained"))
    base = Plan(backbone=candidates[0][0], **options)
    scan = _scan(Path(data), base, None, log, warn)
    _, plans = _profile_and_rank(scan, base, max_images, wants_progress(progress), candidates, log)
    return plans


def quiet_frameworks() -> None:
    """Lightning's start-up chatter is not news to our users; warnings about data stay."""
    import optuna
    import pytorch_lightning  # noqa: F401  (it sets its own log level on import)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own trial lines
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # frozen blocks, on purpose
    warnings.filterwarnings("ignore", ".*validation_step. but have no .val_dataloader.*")  # the refit: no val left, on purpose
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\). is deprecated.*")  # Lightning's, with newer torch


def fit(
    data: str | Path, out: str | Path | None = None, *, strategy: str | None = None,
    plan: Plan | str | Path | None = None, backbone: str | Sequence[str] | None = None,
    trials: int | None = None, time_budget: float | str | None = None, storage: str | None = None,
    max_images: int = 400, resume: bool = False, overwrite: bool = False, progress: bool | None = None,
    log: Log = print, warn: Log = _stderr, logger: str = "csv",
    ranked: Callable[[list[Plan]], None] | None = None, watch: Callable[["SearchProgress"], None] | None = None,
    accelerator: str | None = None, devices: int | str | None = None, precision: str | None = None,
    **options: Any,
) -> Run:
    """Train the best classifier for DATA into the RUN folder `out` (`autotransfer fit`).

    Without `strategy` or `plan`, autotransfer decides: it profiles DATA for each candidate
    backbone, ranks Plans by rules and searches from them (`trials`, `time_budget` as
    seconds or "10m", `storage`, `max_images`). With `strategy` ("frozen", "partial",
    "full") it trains that; with `plan` (a Plan or a plan.json) exactly that Plan.
    `options` are Plan fields (weights, image_size, epochs, lr, cut, seed, ...). `out`
    defaults to runs/<data>-<strategy or auto>; a non-empty one is refused unless
    `overwrite`; `resume` continues the interrupted search in `out`.

    `logger`: Lightning's logger of each training stage, one of LOGGERS. A display may
    take the ranked Plans (`ranked`, instead of their lines in `log`) and follow the
    search (`watch`: a SearchProgress when it starts and after each trial).

    `accelerator` ("auto", "cpu", "gpu", ...), `devices` (a count or "auto"; more than one
    trains with DDP, which in a script needs `if __name__ == "__main__":`) and `precision`
    ("32", "bf16-mixed", "16-mixed") go to Lightning for every trained stage; None keeps
    those of `plan`, else auto, 1 and 32. A search's trials and workers use them too.
    """
    from autotransfer.search import watch_search
    from autotransfer.train import LOGGER

    data = Path(data)
    log, warn = log or _silent, warn or _silent
    _check_options(options)
    _check_logger(logger)
    if (accelerator, devices, precision) != (None, None, None):
        options["compute"] = _compute(accelerator, devices, precision)
    chosen_logger = LOGGER.set(logger)
    try:
        with watch_search(watch):
            return _fit(data, out, strategy=strategy, plan=plan, backbone=backbone, trials=trials,
                        time_budget=time_budget, storage=storage, max_images=max_images, resume=resume,
                        overwrite=overwrite, progress=progress, log=log, warn=warn, ranked=ranked, options=options)
    finally:
        LOGGER.reset(chosen_logger)


def _fit(
    data: Path, out: str | Path | None, *, strategy: str | None, plan: Plan | str | Path | None,
    backbone: str | Sequence[str] | None, trials: int | None, time_budget: float | str | None, storage: str | None,
    max_images: int, resume: bool, overwrite: bool, progress: bool | None, log: Callable[[str], None],
    warn: Callable[[str], None], ranked: Callable[[list[Plan]], None] | None, options: dict,
) -> Run:
    progress = wants_progress(progress)
    quiet_frameworks()
    start = time.perf_counter()
    if resume:
        given = [name for name, value in (("strategy", strategy), ("plan", plan), ("backbone", backbone)) if value]
        if given or options:
            raise UsageError(f"resume continues the search in out with its own settings, so {', '.join(given + list(options))} "
                             "would be ignored; drop them")
        return _resume(data, out, overwrite, log)
    from autotransfer.rundir import claim_run_dir

    backbones = _backbones(backbone)
    if plan is not None or strategy is not None:
        from autotransfer.train import fit as train_fit

        if plan is not None:
            compute = options.pop("compute", None)  # how to run it may change, not what it is
            given = [name for name, value in (("strategy", strategy), ("backbone", backbone)) if value] + list(options)
            if given:
                raise UsageError(f"plan= runs a saved Plan as it is, so {', '.join(given)} would be ignored; "
                                 "drop them, or change the Plan (dataclasses.replace) and pass that")
            chosen = plan if isinstance(plan, Plan) else Plan.load(plan)
            chosen = chosen if compute is None else replace(chosen, compute=compute)
        else:
            chosen = Plan(strategy=strategy, backbone=_one_backbone(backbones), **options)
        out = Path(out) if out is not None else Path("runs") / f"{data.resolve().name}-{chosen.strategy}"
        claim_run_dir(out, overwrite, data)
        scan = _scan(data, chosen, out, log, warn)
        with interruptible(lambda: _fit_kept(out)):
            result = train_fit(scan, chosen, out, progress=progress, log=log)
        return Run(out, result.seconds)

    from autotransfer.profile import save_profiles
    from autotransfer.search import default_storage, parse_duration
    from autotransfer.selector import search_config, select_and_fit

    _no_decided_options(options)
    if trials is not None and trials < 1:
        raise UsageError(f"trials must be at least 1, but got {trials}")
    budget = parse_duration(time_budget) if isinstance(time_budget, str) else time_budget
    candidates = _candidates(backbones, options.get("weights", "pretrained"))
    base = Plan(backbone=candidates[0][0], **options)
    out = Path(out) if out is not None else Path("runs") / f"{data.resolve().name}-auto"
    claim_run_dir(out, overwrite, data)
    out.mkdir(parents=True, exist_ok=True)
    with interruptible(lambda: _search_kept(data, out)):
        scan = _scan(data, base, out, log, warn)
        profiles, plans = _profile_and_rank(scan, base, max_images, progress, candidates, log)
        save_profiles(profiles, out)
        if ranked is not None:
            ranked(plans)
        else:
            log("ranked plans:")
            for line in ranked_lines(plans):
                log(line)
        config = search_config(str(data.resolve()), storage or default_storage(out), profiles, plans, trials, budget)
        select_and_fit(config, out, plans, scan=scan, log=log, overwrite=overwrite)
    return Run(out, time.perf_counter() - start)


def _resume(data: Path, out: str | Path | None, overwrite: bool, log: Callable[[str], None]) -> Run:
    from autotransfer.selector import continue_search

    if out is None:
        raise UsageError("--resume needs --out RUN, the folder of the search to continue")
    if overwrite:
        raise UsageError("--resume continues the search in --out and --overwrite replaces it; choose one")
    start, out = time.perf_counter(), Path(out)
    with interruptible(lambda: _search_kept(data, out)):
        continue_search(out, adopt=True, log=log, data=data)
    return Run(out, time.perf_counter() - start)


def _check_logger(logger: str) -> None:
    """Before any work: a logger that is not installed would fail at the first trained stage."""
    import importlib.util

    if logger not in LOGGERS:
        raise UsageError(f"logger must be one of {', '.join(LOGGERS)}, but got '{logger}'")
    packages = LOGGERS[logger]
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise AutotransferError(f"logger {logger} needs the {packages[0]} package, which is not installed: "
                                f"pip install 'autotransfer[{logger}]'")


def _compute(accelerator: str | None, devices: int | str | None, precision: str | None) -> Compute:
    """The Compute the caller asked for, checked on this machine before any work (a bad
    one would otherwise fail only when the first fine-tuning starts)."""
    from autotransfer.train import trainer_devices

    default = Compute()
    compute = Compute(accelerator or default.accelerator, default.devices if devices is None else devices,
                      precision or default.precision)
    trainer_devices(compute)
    return compute


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(PLAN_OPTIONS))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; the options are Plan fields: {', '.join(PLAN_OPTIONS)}")


def _backbones(backbone: str | Sequence[str] | None) -> list[str]:
    if backbone is None:
        return []
    return [backbone] if isinstance(backbone, str) else list(backbone)


def _one_backbone(backbones: list[str]) -> str:
    if len(backbones) > 1:
        raise UsageError(
            f"--strategy and --plan train one backbone, but got {len(backbones)} (--backbone "
            f"{' --backbone '.join(backbones)}); drop --strategy to let autotransfer choose among them"
        )
    return backbones[0] if backbones else DEFAULT_BACKBONE


def _no_decided_options(options: dict) -> None:
    """The depth options are what a decision chooses: taken silently, they would be lost."""
    given = [f"--feature-level {options['feature_level']}"] if options.get("feature_level") is not None else []
    given += ["--all-levels"] if options.get("all_levels") else []
    given += [f"--all-levels-mode {options['all_levels_mode']}"] if options.get("all_levels_mode", "level") != "level" else []
    given += ["--ensemble-levels-only"] if options.get("ensemble_levels_only") else []
    if given:
        raise UsageError(
            f"{' and '.join(given)} fix part of a Plan, and without --strategy autotransfer decides that part "
            f"itself; add --strategy frozen (or partial, full) to train exactly that, or drop {' and '.join(given)}"
        )


def _candidates(backbones: list[str], weights: str) -> tuple[list[str], list[str]]:
    """The backbones a decision chooses among: (always profiled, profiled if the data is
    large enough): those named, else the default and the other installed ones."""
    from autotransfer.selector import default_backbones

    if len(backbones) > 1 and weights not in ("pretrained", "random"):
        raise UsageError(f"--weights {weights} is a state dict for one backbone; name one --backbone with it")
    if backbones:
        return list(dict.fromkeys(backbones)), []
    default, *installed = default_backbones(weights)
    return [default], installed


def _profile_and_rank(
    scan: "DatasetScan", base: Plan, max_images: int, progress: bool, candidates: tuple[list[str], list[str]],
    log: Callable[[str], None],
) -> tuple[list[Profile], list[Plan]]:
    from autotransfer.selector import profile_and_rank

    named, optional = candidates
    if len(named) + len(optional) > 1:
        log(f"profiling backbones: {', '.join([*named, *optional])}")
    profiles, plans = profile_and_rank(scan, base, max_images, progress, named, optional, log=log)
    for profiled in profiles:
        distance = profiled.summary.distance
        log(f"profile of {profiled.backbone}: {profiled.summary.method} distance "
            f"{distance if distance is None else round(distance, 2)}")
    return profiles, plans


def _scan(data: Path, base: Plan, out: Path | None, log: Callable[[str], None], warn: Callable[[str], None]) -> "DatasetScan":
    """Scan DATA (never the RUN folder `out` in it) and say what is wrong with it."""
    from autotransfer.data import scan_folder
    from autotransfer.profile import quality, quality_warnings

    scan = scan_folder(data, base.val_fraction, base.seed, exclude=[out] if out else [])
    if scan.skipped:
        warn(f"skipped {len(scan.skipped)} file(s) that are not usable images or not part of DATA:")
        for item in scan.skipped[:20]:
            warn(f"  {item.path}: {item.reason}")
        if len(scan.skipped) > 20:
            warn(f"  ... and {len(scan.skipped) - 20} more (see scan.json)")
    for line in quality_warnings(quality(scan)):
        warn(line)
    sizes = ", ".join(f"{split} {len(records)}" for split, records in scan.splits.items())
    log(f"{data}: {len(scan.classes)} classes, {sizes} images")
    return scan


def _search_kept(data: Path, out: Path) -> str:
    from autotransfer.search import run_progress

    held = run_progress(out)
    if held is None:
        return f"before the search began; {out} holds no trial: run the same command with --overwrite to start again"
    return f"{out} keeps {held}; continue with `autotransfer fit {data} --resume --out {out}`"


def _fit_kept(out: Path) -> str:
    import json

    try:
        stage = json.loads((out / "metrics.json").read_text()).get("interrupted", "done")
    except (OSError, ValueError, AttributeError):
        stage = None
    if stage == "done":
        return f"after training; {out} holds the finished run"
    if stage and (out / "model.pt").is_file():
        return (f"{out}/model.pt keeps the best weights of the {stage} stage so far (metrics.json says "
                "\"interrupted\"); train again with --overwrite")
    return f"no trained model was kept in {out}; train again with --overwrite"
