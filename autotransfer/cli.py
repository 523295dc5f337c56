"""The `autotransfer` command line: thin wrappers around the library functions.

Exit codes: 0 success, 1 a user error (one line saying what was found and how to fix
it), 2 a usage error (click's). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path

import click

from autotransfer import __version__
from autotransfer.backbones import DEFAULT_BACKBONE
from autotransfer.errors import AutotransferError, DataError
from autotransfer.plan import AUGMENTS, BN_MODES, STRATEGIES, Plan


class _Group(click.Group):
    """Turns AutotransferError into a one-line message and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AutotransferError as exc:
            raise click.ClickException(str(exc)) from None


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="autotransfer")
def main() -> None:
    """Train the best image classifier from a folder of labelled images and a pretrained
    network.

    \b
    Quick start:
      autotransfer backbones                       # what is installed
      autotransfer fit ./data --out runs/mine      # train (class folders or train/ val/)
      autotransfer evaluate runs/mine ./data       # accuracy, macro-F1, confusion matrix
      autotransfer predict runs/mine cat.jpg       # top-k classes with probabilities

    DATA is either DATA/<class>/<image> or DATA/train/<class>/<image> with optional val/
    and test/. Exit codes: 0 ok, 1 a problem with your input (the message says how to
    fix it), 2 a wrong command line.
    """


def _print_skipped(scan) -> None:
    if scan.skipped:
        click.echo(f"skipped {len(scan.skipped)} file(s) that are not usable images:", err=True)
        for item in scan.skipped[:20]:
            click.echo(f"  {item.path}: {item.reason}", err=True)
        if len(scan.skipped) > 20:
            click.echo(f"  ... and {len(scan.skipped) - 20} more (see scan.json)", err=True)


_PLAN_OPTIONS = [
    click.option("--backbone", "backbones", multiple=True, metavar="NAME",
                 help="Backbone (see `autotransfer backbones`; any timm model name works online). Repeat it to let the search choose among several. [default: with --strategy or --plan, efficientnet_lite0; when autotransfer decides, the installed backbones (at most 3, efficientnet_lite0 first)]"),
    click.option("--cut", type=int, default=None, help="partial: number of lowest coarse groups (stem first) kept frozen."),
    click.option("--feature-level", type=int, default=None, help="Classify from timm feature level I (0 = earliest) instead of the top; drops the blocks above. Helps far from ImageNet."),
    click.option("--all-levels", is_flag=True, help="frozen: classify from every feature level and the top at once (pooled, standardised, one linear head: Head2Toe). Helps far from ImageNet."),
    click.option("--bn-mode", type=click.Choice(BN_MODES), default="frozen", help="BatchNorm of fine-tuned blocks: keep ImageNet statistics (frozen) or adapt them (train)."),
    click.option("--weights", default="pretrained", help="'pretrained', 'random', or a state-dict file for the backbone."),
    click.option("--image-size", type=int, default=None, help="Input size in px [default: the backbone's, or 128 for small images when autotransfer decides]."),
    click.option("--epochs", type=int, default=6, help="Fine-tuning epochs (partial, full)."),
    click.option("--lr", type=float, default=1e-3, help="Learning rate of the head while fine-tuning (the linear probe before it tunes its own penalty by cross-validation)."),
    click.option("--backbone-lr-ratio", type=float, default=0.3, help="Backbone learning rate as a fraction of --lr."),
    click.option("--augment", type=click.Choice(AUGMENTS), default="crop", help="Fine-tuning augmentation: crop (flip + reflect-padded shift) or strong (fastai's kind: resized crop, rotation, lighting)."),
    click.option("--label-smoothing", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.1, help="Label smoothing of the fine-tuning loss."),
    click.option("--refit/--no-refit", default=True, show_default=True, help="When DATA has no val/: refit a frozen probe on train and val together (its val scores are then out-of-fold), and retrain a search's fine-tuned winner on both for its best epoch count."),
    click.option("--class-weighting", is_flag=True, help="Weight the loss by inverse class frequency (imbalanced data)."),
    click.option("--batch-size", type=int, default=32),
    click.option("--val-fraction", type=float, default=0.2, help="Validation share drawn (stratified, seeded) when DATA has no val/."),
    click.option("--seed", type=int, default=0),
]


def _plan_options(command):
    for option in reversed(_PLAN_OPTIONS):
        command = option(command)
    return command


def _echo_plans(plans: list[Plan]) -> None:
    from autotransfer.plan import describe

    for rank, plan in enumerate(plans, start=1):
        click.echo(f"{rank}. {describe(plan)}")
        for reason in plan.reasons:
            click.echo(f"     - {reason}")


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="Skip the decision: frozen (head on cached features), partial (fine-tune above --cut) or full. [default: autotransfer decides]")
@_plan_options
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None, help="Run a saved plan.json (other plan options are ignored).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Search: number of trials (the rules' best N first, then sampled ones). [default: every frozen Plan the rules rank and their first 3 fine-tuning Plans]")
@click.option("--time-budget", default=None, help="Search: stop starting trials after this long, e.g. 90s, 10m, 1h (an upper bound: the decision then depends on how fast the machine is). [default: none; the count of --trials]")
@click.option("--storage", default=None, help="Search: Optuna storage URL, e.g. postgresql://user@host/db, shared with `autotransfer worker`. [default: sqlite in RUN]")
@click.option("--max-images", type=click.IntRange(min=2), default=400, help="Search: images the profile forwards (a stratified sample).")
@click.option("--resume", is_flag=True, help="Continue the interrupted search in --out RUN.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="RUN folder [default: runs/<data>-<strategy or auto>].")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def fit(data: Path, strategy: str | None, plan_file: Path | None, trials: int | None,
        time_budget: str | None, storage: str | None, max_images: int, resume: bool,
        out: Path | None, no_progress: bool, backbones: tuple[str, ...], **options) -> None:
    """Train the best classifier for DATA and write the RUN folder.

    Without --strategy or --plan, autotransfer decides: it profiles DATA (size, quality,
    distance to ImageNet per depth) for each candidate backbone, ranks backbones and
    Plans by explicit rules, tries them first in
    an Optuna search (then sampled ones, pruning weak fine-tuning), and keeps the winner
    on validation balanced accuracy (mean per-class accuracy: it does not reward
    guessing the majority class). The decision and its reasons are printed and stored.

    \b
    RUN/model.pt         the model (loads with timm alone, see README)
    RUN/plan.json        what won, with its reasons; `fit DATA --plan RUN/plan.json` reruns it
    RUN/metrics.json     accuracy, balanced accuracy, macro-F1, per-class accuracy, confusion matrix
    RUN/profile.json     the leading backbone's profile (search only; RUN/profiles/ holds every candidate's)
    RUN/leaderboard.csv  every trial (search only); RUN/study.db the Optuna study
    RUN/logs/            Lightning CSV logs per stage
    """
    from autotransfer.data import scan_folder

    quiet_frameworks()
    progress = not no_progress
    if resume:
        from autotransfer.selector import continue_search

        if out is None:
            raise click.UsageError("--resume needs --out RUN, the folder of the search to continue")
        plan = continue_search(out, adopt=True, log=click.echo)
        _echo_decision(plan, out)
        return
    if plan_file or strategy:
        plan = Plan.load(plan_file) if plan_file else Plan(strategy=strategy, backbone=_one_backbone(backbones), **options)
        out = out or Path("runs") / f"{data.resolve().name}-{plan.strategy}"
        scan = _scan(data, plan)
        from autotransfer.train import fit as run_fit

        result = run_fit(scan, plan, out, progress=progress, log=click.echo)
        _echo_result(result.metrics, result.seconds, out)
        return

    from autotransfer.search import default_storage, parse_duration
    from autotransfer.profile import save_profiles
    from autotransfer.selector import search_config, select_and_fit

    start = time.perf_counter()
    _no_decided_options(options)
    candidates = _candidates(backbones, options["weights"])
    base = Plan(backbone=candidates[0][0], **options)
    out = out or Path("runs") / f"{data.resolve().name}-auto"
    out.mkdir(parents=True, exist_ok=True)
    scan = _scan(data, base)
    profiles, plans = _profile_and_rank(scan, base, max_images, progress, candidates)
    save_profiles(profiles, out)
    _echo_plans(plans)
    budget = parse_duration(time_budget) if time_budget else None
    config = search_config(str(data.resolve()), storage or default_storage(out), profiles, plans, trials, budget)
    plan = select_and_fit(config, out, plans, scan=scan, log=click.echo)
    metrics = json.loads((out / "metrics.json").read_text())
    _echo_result(metrics, time.perf_counter() - start, out)
    _echo_decision(plan, out)


def _one_backbone(backbones: tuple[str, ...]) -> str:
    if len(backbones) > 1:
        raise click.UsageError(
            f"--strategy and --plan train one backbone, but got {len(backbones)} (--backbone "
            f"{' --backbone '.join(backbones)}); drop --strategy to let autotransfer choose among them"
        )
    return backbones[0] if backbones else DEFAULT_BACKBONE


def _no_decided_options(options: dict) -> None:
    """The depth options are what a decision chooses: taken silently, they would be lost."""
    given = [f"--feature-level {options['feature_level']}"] if options["feature_level"] is not None else []
    given += ["--all-levels"] if options["all_levels"] else []
    if given:
        raise click.UsageError(
            f"{' and '.join(given)} fix part of a Plan, and without --strategy autotransfer decides that part "
            f"itself; add --strategy frozen (or partial, full) to train exactly that, or drop {' and '.join(given)}"
        )


def _candidates(backbones: tuple[str, ...], weights: str) -> tuple[list[str], list[str]]:
    """The backbones a decision chooses among: (always profiled, profiled if the budget
    allows): those named, else the default and the other installed ones."""
    from autotransfer.selector import default_backbones

    if len(backbones) > 1 and weights not in ("pretrained", "random"):
        raise click.UsageError(f"--weights {weights} is a state dict for one backbone; name one --backbone with it")
    if backbones:
        return list(dict.fromkeys(backbones)), []
    default, *installed = default_backbones(weights)
    return [default], installed


def _profile_and_rank(scan, base: Plan, max_images: int, progress: bool, candidates: tuple[list[str], list[str]]):
    from autotransfer.selector import profile_and_rank

    named, optional = candidates
    if len(named) + len(optional) > 1:
        click.echo(f"profiling backbones: {', '.join([*named, *optional])}")
    profiles, plans = profile_and_rank(scan, base, max_images, progress, named, optional, log=click.echo)
    for profile in profiles:
        distance = profile.summary.distance
        click.echo(f"profile of {profile.backbone}: {profile.summary.method} distance "
                   f"{distance if distance is None else round(distance, 2)}")
    click.echo("ranked plans:")
    return profiles, plans


def _scan(data: Path, plan: Plan):
    from autotransfer.data import scan_folder

    scan = scan_folder(data, plan.val_fraction, plan.seed)
    _print_skipped(scan)
    sizes = ", ".join(f"{split} {len(r)}" for split, r in scan.splits.items())
    click.echo(f"{data}: {len(scan.classes)} classes, {sizes} images")
    return scan


def _echo_result(metrics: dict, seconds: float, out: Path) -> None:
    val = metrics["val"]
    click.echo(
        f"done in {seconds:.0f}s: val accuracy {val['accuracy']:.4f}, balanced {val['balanced_accuracy']:.4f}, "
        f"macro-F1 {val['macro_f1']:.4f}"
        + (f"; test accuracy {metrics['test']['accuracy']:.4f}" if "test" in metrics else "")
    )
    click.echo(f"run saved in {out}/ (model.pt, plan.json, metrics.json)")


def _echo_decision(plan: Plan, out: Path) -> None:
    from autotransfer.plan import describe

    click.echo(f"decision: {describe(plan)}")
    for reason in plan.reasons:
        click.echo(f"  - {reason}")
    click.echo(f"all trials: {out}/leaderboard.csv")


@main.command("plan")
@click.argument("data", type=click.Path(path_type=Path))
@_plan_options
@click.option("--max-images", type=click.IntRange(min=2), default=400, help="Images the profile forwards (a stratified sample).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("plan.json"), help="Where to write the top-ranked Plan.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def plan_command(data: Path, backbones: tuple[str, ...], max_images: int, out: Path, no_progress: bool, **options) -> None:
    """Profile DATA and print the ranked Plans with their reasons; write the top one.

    `autotransfer fit DATA --plan plan.json` then runs exactly that Plan.
    """
    _no_decided_options(options)
    candidates = _candidates(backbones, options["weights"])
    base = Plan(backbone=candidates[0][0], **options)
    scan = _scan(data, base)
    _, plans = _profile_and_rank(scan, base, max_images, not no_progress, candidates)
    _echo_plans(plans)
    plans[0].save(out)
    click.echo(f"top plan written to {out}; run it with `autotransfer fit {data} --plan {out}`")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
def worker(run: Path) -> None:
    """Join the search of RUN: run its queued trials in this process.

    Start the search with a shared storage (`fit DATA --storage postgresql://... --trials N
    --out RUN`), then run `autotransfer worker RUN` on other machines that see the same
    DATA path and RUN folder (or a copy of RUN/search.json). Each trial runs exactly once.
    """
    from autotransfer.selector import continue_search

    quiet_frameworks()
    continue_search(run, adopt=False, log=click.echo)
    click.echo(f"no queued trial left in {run}'s study")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backbones(as_json: bool) -> None:
    """List installed backbones: name, package, parameters, pretraining, input, depth.

    "groups" are timm's coarse groups (stem first): the coordinate of --cut. "levels" are
    timm feature levels: the coordinate of --feature-level. Any other timm model name
    also works with `fit --backbone` when timm can download (or has cached) its weights.
    """
    from autotransfer.backbones import list_backbones, load_plugins
    from autotransfer.strategies import describe_backbone

    rows = [describe_backbone(spec) for spec in list_backbones()]
    _, failures = load_plugins()
    if as_json:
        click.echo(json.dumps({"backbones": rows, "failed_plugins": [f.__dict__ for f in failures]}, indent=2))
        return
    header = f"{'name':<22} {'package':<32} {'params':>7} {'pretrained':<12} {'input':>5} {'mean/std':<28} {'groups':>6} {'levels':>6}"
    click.echo(header)
    for r in rows:
        mean_std = f"{_fmt(r['mean'])}/{_fmt(r['std'])}"
        click.echo(
            f"{r['name']:<22} {r['package']:<32} {r['params_m']:>6.1f}M {r['pretrained_on']:<12} "
            f"{r['input_size']:>5} {mean_std:<28} {r['groups']:>6} {r['levels']:>6}"
        )
    if not rows:
        click.echo("(none listed)")
    click.echo("Any timm model name also works online: `fit --backbone resnet50`.")
    for f in failures:
        click.echo(f"failed plugin {f.package}[{f.entry}]: {f.error}", err=True)


def _fmt(values) -> str:
    return ",".join(f"{v:.3g}" for v in values)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["auto", "train", "val", "test"]), default="auto",
              help="Which split of DATA: auto takes test/, else val/, else all class folders. "
                   "Without val/, val is drawn again as `fit` drew it (RUN's seed and val fraction).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(run: Path, data: Path, split: str, as_json: bool) -> None:
    """Accuracy, macro-F1, per-class accuracy and confusion matrix of RUN on DATA."""
    from autotransfer.predict import evaluate_folder

    report = evaluate_folder(run, data, split)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['split']} split: {report['n']} images")
    click.echo(f"accuracy {report['accuracy']:.4f}, balanced accuracy {report['balanced_accuracy']:.4f}, "
               f"macro-F1 {report['macro_f1']:.4f}")
    for name, acc in report["per_class_accuracy"].items():
        click.echo(f"  {name:<20} {'-' if acc is None else f'{acc:.4f}'}")
    classes = list(report["per_class_accuracy"])
    click.echo("confusion matrix (rows: true, columns: predicted):")
    width = max(6, *(len(c) for c in classes))
    click.echo(" " * width + " " + " ".join(f"{c[:width]:>{width}}" for c in classes))
    for name, row in zip(classes, report["confusion_matrix"]):
        click.echo(f"{name[:width]:>{width}} " + " ".join(f"{v:>{width}}" for v in row))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=3)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def predict(run: Path, images: tuple[Path, ...], top_k: int, as_json: bool) -> None:
    """Top-k classes with probabilities for each IMAGE."""
    from autotransfer.predict import predict_images

    results = predict_images(run, list(images), top_k)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for item in results:
        guesses = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in item["top_k"])
        click.echo(f"{item['image']}: {guesses}")


@main.command("demo-data")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", type=int, default=32, help="Side of the exported PNGs in px.")
def demo_data(out: Path, size: int) -> None:
    """Export scikit-learn's bundled digits (1,797 images, 10 classes) as an image folder.

    A real dataset that needs no download: `autotransfer demo-data digits && autotransfer
    fit digits`. Needs scikit-learn (`pip install 'autotransfer[demo]'`).
    """
    from autotransfer.demo import export_digits

    counts = export_digits(out, size)
    click.echo(f"wrote {sum(counts.values())} images in {len(counts)} classes to {out}/")


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--backbone", default=DEFAULT_BACKBONE, help="Backbone name (see `autotransfer backbones`).")
@click.option("--weights", default="pretrained", help="'pretrained', 'random', or a state-dict file for the backbone.")
@click.option("--max-images", type=click.IntRange(min=2), default=1000,
              help="Profile at most N images of train+val, sampled stratified by class (sizes and quality checks still read every file).")
@click.option("--image-size", type=int, default=None, help="Input size in px [default: the backbone's].")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Folder of near-ImageNet photos that sets the reference level of the distances [default: photos bundled with scikit-image/scikit-learn].")
@click.option("--seed", type=int, default=0, help="Seed of the sample and of the validation split drawn when DATA has no val/.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("profile.json"), help="Where to write the profile.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def profile(data: Path, out: Path, no_progress: bool, **options) -> None:
    """Measure DATA for a backbone: size, images, quality, distance to ImageNet per depth.

    One scan of every file and one forward pass over (a sample of) train+val; test/ is
    only counted and checked. Per depth (timm coarse group, the coordinate of --cut):
    BatchNorm-statistics gap to ImageNet relative to a calibrated reference, Frechet
    distance to the calibration photos' features, LogME and leave-one-out k-NN with
    trivial baselines. Writes OUT (schema in README, "How it decides").
    """
    from autotransfer.profile import format_profile, profile_dataset

    result = profile_dataset(data, progress=not no_progress, **options)
    result.save(out)
    click.echo(format_profile(result))
    click.echo(f"profile saved to {out}")


@main.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--per-class", "per_class", multiple=True, default=("10", "50", "all"),
              help="Training images per class: a number or 'all'; repeat for several sizes. A seeded, stratified subsample of train only.")
@click.option("--quick", is_flag=True,
              help="CPU-sized: 64 px, 2 fine-tuning epochs, 'all' capped at 100 train images/class on average, a dataset's own val/ at 50/class and the held-out images at 200/class on average, fine-tuning grid = the middle cut and full, autotransfer within fit's default budget; every table says so. Options below override it.")
@click.option("--backbone", default=DEFAULT_BACKBONE, help="Backbone name (see `autotransfer backbones`).")
@click.option("--weights", default="pretrained", help="'pretrained', 'random', or a state-dict file for the backbone.")
@click.option("--image-size", type=click.IntRange(min=16), default=None, help="Input size in px for every recipe [default: 64 with --quick, else what fit chooses per dataset: 128 for images under 96 px, else the backbone's].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Fine-tuning epochs of every recipe [default: 2 with --quick, else 6].")
@click.option("--lr", type=float, default=None, help="Head learning rate of every recipe [default: 1e-3].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 32]")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="autotransfer's search: number of trials [default: fit's default count; never a time budget].")
@click.option("--seed", type=int, default=0, help="Seed of subsamples, splits and training.")
@click.option("--keep-models", is_flag=True, help="Keep every recipe's model.pt under OUT/runs/ (large).")
@click.option("--uncapped", is_flag=True, help="With --quick: keep every image of train, val and test (quick epochs and resolution, full size).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench"), help="Where bench.md, bench.json, bench.html and the runs go.")
@click.option("--no-progress", is_flag=True, help="Accepted for symmetry with fit; bench prints one line per recipe.")
def bench(data: tuple[Path, ...], per_class: tuple[str, ...], quick: bool, seed: int, keep_models: bool,
          uncapped: bool, out: Path, no_progress: bool, **options) -> None:
    """Compare autotransfer's choice with fixed recipes and a per-depth grid on DATA...

    For every dataset and every --per-class size: a scikit-learn linear probe at every
    grid depth and on all levels at once (standardised features, multinomial logistic
    regression, C by stratified 5-fold CV on train+val, refit on all: the CLIP/VTAB
    protocol), the real fastai fine_tune (pip install 'autotransfer[peers]'; else its row
    says "not installed"), a frozen extractor, the Keras guide's two stages, plain
    fine-tuning without a linear probe, the grid (frozen at each feature level and the
    top; LP-FT from each cut and full), and autotransfer (profile -> rules -> search, no
    time budget). Held-out images: test/, else all of val/ (the selection split is then
    drawn from train), else 25% of the class folders. Reports held-out accuracy, macro-F1,
    wall time, and the regret against the cell's best row with its paired standard error.

    \b
    OUT/bench.md    the tables
    OUT/bench.json  everything, with the command, settings, versions and machine
    OUT/bench.html  tables and plots (layer-transfer curves, recipes), self-contained
    OUT/runs/       each recipe's RUN folder (models deleted unless --keep-models)
    """
    from autotransfer.bench import BenchSettings, parse_sizes, run_bench, verdict_lines

    quiet_frameworks()
    sizes = parse_sizes(per_class)
    make = BenchSettings.quick_mode if quick else BenchSettings.full_mode
    settings = make(seed=seed, keep_models=keep_models, **options)
    if uncapped:
        settings = replace(settings, train_cap=None, val_cap=None, test_cap=None)
    command = _command_line(click.get_current_context(), ["autotransfer", "bench", *map(str, data)])
    report = run_bench(list(data), sizes, settings, out, command=command, log=click.echo)
    for line in verdict_lines(report):
        click.echo(line)
    click.echo(f"report: {out}/bench.md, {out}/bench.html, {out}/bench.json")


def _command_line(ctx: click.Context, head: list[str]) -> str:
    """The command as typed, less the defaults, rebuilt from the parsed options (for reports)."""
    import shlex

    from click.core import ParameterSource

    words = list(head)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT:
            continue
        flag = param.opts[-1] if param.opts[-1].startswith("--") else param.opts[0]
        if param.is_flag:
            words += [flag] if value else []
        else:
            words += [w for v in (value if param.multiple else [value]) for w in (flag, str(v))]
    return shlex.join(words)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for report.html, report.md, report.json and figures [default: RUN/report].")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="The image folder, if it moved since the run [default: the one the run recorded].")
@click.option("--curve", is_flag=True, help="Also fit a linear probe on cached features at every feature level: a measured frozen curve (one forward pass over train+val per level not yet cached).")
@click.option("--max-misclassified", type=click.IntRange(min=0), default=48, help="Misclassified validation images shown, most confident first; 0 skips recomputing predictions.")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs).")
def report(run: Path, out: Path | None, data: Path | None, curve: bool, max_misclassified: int, no_progress: bool) -> None:
    """Explain RUN: data, decision, layer-transfer curve, search, errors.

    Writes a self-contained report.html (no network needed to view it), report.md and
    report.json to --out. Works on explicit runs too: what they lack is named, with the
    command that produces it.
    """
    from autotransfer.report import build_report, write_report

    result = build_report(run, data, curve, max_misclassified, not no_progress, click.echo)
    paths = write_report(result, out or run / "report")
    for section, why in result.missing.items():
        click.echo(f"{section}: {why}", err=True)
    click.echo(f"report written to {paths['html']} (and {paths['md'].name}, {paths['json'].name})")


if __name__ == "__main__":
    main()
