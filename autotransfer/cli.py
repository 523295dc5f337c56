"""The `autotransfer` command line: thin wrappers around the library functions.

Exit codes: 0 success, 1 a user error or an unusable file or folder (one line saying
what was found and how to fix it), 2 a usage error (click's), 130 any command
stopped by Ctrl-C (one line saying what was kept and where). Anything else is a bug: it
keeps its traceback and asks to be reported.
"""

from __future__ import annotations

import errno
import json
from dataclasses import asdict, replace
from pathlib import Path

import click

from autotransfer import __version__
from autotransfer.data import check_data_root
from autotransfer.errors import AutotransferError, DataError, Interrupted, UsageError, interruptible, user_file_error
from autotransfer.plan import (
    ACCELERATORS, ALL_LEVELS_MODES, AUGMENTS, BN_MODES, DEFAULT_BACKBONE, LOGGERS, PRECISIONS, STRATEGIES, Compute, check_number,
    ranked_lines,
)


class _Command(click.Command):
    """Options that do not fit together (the API's UsageError) are a wrong command line:
    click's usage line and exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(str(exc), ctx) from None


class _Group(click.Group):
    """The one place errors become messages: AutotransferError, and OSError, JSON, text and
    image errors on the user's files (`user_file_error`), print one line and exit 1; any
    other exception is a bug and keeps its traceback, with a line asking to report it."""

    command_class = _Command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Interrupted as exc:  # fit and worker: what was kept and where
            click.echo(f"interrupted: {exc}", err=True)
            raise click.exceptions.Exit(130) from None
        except AutotransferError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:  # fit and worker say more (Interrupted, above)
            click.echo(f"interrupted: {ctx.invoked_subcommand} stopped by Ctrl-C; files it had finished "
                       "(and feature caches) are kept, nothing half-written is", err=True)
            raise click.exceptions.Exit(130) from None
        except Exception as exc:
            if getattr(exc, "errno", None) == errno.EPIPE:  # output closed early (`| head`): click's to handle
                raise
            message = user_file_error(exc)
            if message is None:
                note = (f"This is a bug in autotransfer {__version__}: please report it with the command "
                        "you ran and this traceback.")
                if hasattr(exc, "add_note"):  # printed under the traceback
                    exc.add_note(note)
                else:  # Python 3.10
                    click.echo(note, err=True)
                raise
            raise click.ClickException(" ".join(message.splitlines())) from None


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
    fix it), 2 a wrong command line, 130 stopped by Ctrl-C or SIGTERM (fit, worker and bench
    say what was kept and where).
    """


def _warn(line: str) -> None:
    click.echo(line, err=True)


def _progress(no_progress: bool) -> bool | None:
    """None lets the API decide: bars only when stdout and stderr are terminals."""
    return False if no_progress else None


def _plan_field(ctx: click.Context, param: click.Parameter, value):
    """Check an option as Plan checks its field of the same name: one line, exit 1."""
    check_number(param.name, value, param.opts[-1])
    return value


_PLAN_OPTIONS = [
    click.option("--backbone", "backbones", multiple=True, metavar="NAME",
                 help="Backbone (see `autotransfer backbones`; any timm model name works online). Repeat it to let the search choose among several. [default: with --strategy or --plan, efficientnet_lite0; when autotransfer decides, efficientnet_lite0 and the installed default candidates (at most 3; efficientnet_lite1, lite2 before other plugins' ones)]"),
    click.option("--cut", type=int, default=None, help="partial: number of lowest coarse groups (stem first) kept frozen."),
    click.option("--feature-level", type=int, default=None, help="Classify from timm feature level I (0 = earliest) instead of the top; drops the blocks above. Helps far from ImageNet."),
    click.option("--all-levels", is_flag=True, help="frozen: classify from every feature level and the top at once (pooled, standardised, one linear head: Head2Toe). Helps far from ImageNet."),
    click.option("--all-levels-mode", type=click.Choice(ALL_LEVELS_MODES), default="level", help="--all-levels: one probe weighing every level alike (level) or every standardised feature alike, so the wide top levels weigh most (feature; the plain linear-probe protocol); or the mean of the 3 best probes by cross-validation among each level alone, the top and those two, each scaled to its lowest cross-validated log-loss (ensemble)."),
    click.option("--ensemble-levels-only", is_flag=True, help="--all-levels-mode ensemble: its 3 probes chosen among single levels only, the top and the every-level heads left out (what autotransfer decides far from ImageNet, where the top transfers worst)."),
    click.option("--bn-mode", type=click.Choice(BN_MODES), default="frozen", help="BatchNorm of fine-tuned blocks: keep ImageNet statistics (frozen) or adapt them (train)."),
    click.option("--weights", default="pretrained", help="'pretrained', 'random', or a state-dict file for the backbone."),
    click.option("--image-size", type=int, callback=_plan_field, default=None, help="Input size in px [default: the backbone's, or 128 for small images when autotransfer decides]."),
    click.option("--epochs", type=int, callback=_plan_field, default=6, help="Fine-tuning epochs (partial, full)."),
    click.option("--lr", type=float, callback=_plan_field, default=1e-3, help="Learning rate of the head while fine-tuning (the linear probe before it tunes its own penalty by cross-validation)."),
    click.option("--backbone-lr-ratio", type=float, callback=_plan_field, default=0.3, help="Backbone learning rate as a fraction of --lr."),
    click.option("--augment", type=click.Choice(AUGMENTS), default="crop", help="Fine-tuning augmentation: crop (flip + reflect-padded shift) or strong (fastai's kind: resized crop, rotation, lighting)."),
    click.option("--label-smoothing", type=float, callback=_plan_field, default=0.1, help="Label smoothing of the fine-tuning loss."),
    click.option("--refit/--no-refit", default=True, show_default=True, help="When DATA has no val/: refit a frozen probe on train and val together (its val scores are then out-of-fold), and retrain a search's fine-tuned winner on both for its best epoch count."),
    click.option("--class-weighting", is_flag=True, help="Weight the loss by inverse class frequency (imbalanced data)."),
    click.option("--batch-size", type=int, callback=_plan_field, default=32),
    click.option("--val-fraction", type=float, callback=_plan_field, default=0.2, help="Validation share drawn (stratified, seeded) when DATA has no val/."),
    click.option("--seed", type=int, callback=_plan_field, default=0),
]


def _compute_options(command):
    """Where fit trains (`plan.Compute`); not given: the --plan's own, else auto, 1, 32."""
    options = [
        click.option("--accelerator", type=click.Choice(ACCELERATORS), default=None,
                     help="Lightning's accelerator for every trained stage. [default: auto, or the --plan's]"),
        click.option("--devices", default=None, metavar="N|auto",
                     callback=lambda ctx, param, value: None if value is None else Compute.parse_devices(value),
                     help="How many of its devices: a count or auto (all); more than one trains with DDP, one process each. [default: 1, or the --plan's]"),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="32, or mixed precision: bf16-mixed (recent GPUs, CPUs) or 16-mixed (GPUs). [default: 32, or the --plan's]"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _plan_options(command):
    for option in reversed(_PLAN_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="Skip the decision: frozen (head on cached features), partial (fine-tune above --cut) or full. [default: autotransfer decides]")
@_plan_options
@_compute_options
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None, help="Run a saved plan.json (other plan options are ignored).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Search: number of trials (the rules' best N first, then sampled ones). [default: every frozen Plan the rules rank and their first 3 fine-tuning Plans]")
@click.option("--time-budget", default=None, help="Search: stop starting trials after this long, e.g. 90s, 10m, 1h (an upper bound: the decision then depends on how fast the machine is). [default: none; the count of --trials]")
@click.option("--storage", default=None, help="Search: Optuna storage URL, e.g. postgresql://user@host/db, shared with `autotransfer worker`. [default: sqlite in RUN]")
@click.option("--max-images", type=click.IntRange(min=2), default=400, help="Search: images the profile forwards (a stratified sample).")
@click.option("--resume", is_flag=True, help="Continue the interrupted search in --out RUN (on the same data; interrupted trials run again with their Plan).")
@click.option("--overwrite", is_flag=True, help="Replace the run in a non-empty --out (deletes what autotransfer wrote there); without it fit refuses a non-empty --out.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="RUN folder [default: runs/<data>-<strategy or auto>].")
@click.option("--no-progress", is_flag=True, help="No progress bars [default: bars only when stdout and stderr are terminals].")
@click.option("--quiet", "-q", is_flag=True, help="Print only warnings, errors and the result (for scripts): no progress lines or bars.")
@click.option("--verbose", "-v", is_flag=True, help="Every ranked Plan's reasons, and the search's own lines about each trial.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document on stdout; progress lines go to stderr.")
@click.option("--logger", type=click.Choice(list(LOGGERS)), default="csv",
              help="Lightning's logger of each training stage: CSV, TensorBoard (pip install 'autotransfer[tensorboard]') or MLflow (pip install 'autotransfer[mlflow]'; MLFLOW_TRACKING_URI, else RUN/logs/mlruns).")
def fit(data: Path, strategy: str | None, plan_file: Path | None, trials: int | None,
        time_budget: str | None, storage: str | None, max_images: int, resume: bool, overwrite: bool,
        out: Path | None, no_progress: bool, quiet: bool, verbose: bool, as_json: bool, logger: str,
        backbones: tuple[str, ...], **options) -> None:
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
    RUN/logs/            Lightning logs per stage (CSV; TensorBoard or MLflow with --logger)

    A RUN holds one run: fit refuses a non-empty --out unless --overwrite; --resume
    refuses other data. Ctrl-C or SIGTERM prints what was kept and where, and exits
    with 130.
    """
    check_data_root(data)
    from autotransfer import api
    from autotransfer.terminal import Screen

    api.quiet_frameworks()
    _echo_failures()
    progress = False if as_json else _progress(no_progress or quiet)
    screen = Screen(live=api.wants_progress(progress), verbose=verbose, quiet=quiet, stderr=as_json)
    shown = dict(progress=progress, log=screen.log, warn=screen.warn, ranked=screen.ranked, watch=screen.watch,
                 logger=logger)
    compute = {name: options.pop(name) for name in ("accelerator", "devices", "precision")}
    chosen = dict(resume=True) if resume else dict(plan=plan_file) if plan_file else dict(
        strategy=strategy, backbone=backbones, trials=trials, time_budget=time_budget, storage=storage,
        max_images=max_images, **options)
    with screen:
        run = api.fit(data, out, overwrite=overwrite, **chosen, **shown, **compute)
    decided = not (plan_file or strategy)
    if as_json:
        click.echo(json.dumps(_fit_result(run, decided), indent=2))
    else:
        screen.summary(run, decided)


def _fit_result(run: api.Run, decided: bool) -> dict:
    """fit's result for scripts: the Plan, its scores, the time and where the files are."""
    metrics = run.metrics or {}
    scores = {split: {key: metrics[split][key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
              for split in ("val", "test") if split in metrics}
    files = {name: str(run.path / name) for name in ("model.pt", "plan.json", "metrics.json", "leaderboard.csv")
             if (run.path / name).is_file()}
    return {"run": str(run.path), "decided": decided, "plan": asdict(run.plan), **scores,
            "seconds": run.seconds, "files": files}


@main.command("plan")
@click.argument("data", type=click.Path(path_type=Path))
@_plan_options
@click.option("--max-images", type=click.IntRange(min=2), default=400, help="Images the profile forwards (a stratified sample).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("plan.json"), help="Where to write the top-ranked Plan.")
@click.option("--no-progress", is_flag=True, help="No progress bars [default: bars only when stdout and stderr are terminals].")
@click.option("--quiet", "-q", is_flag=True, help="Print only warnings, errors and the ranked Plans (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the ranked Plans (with their reasons) as one JSON list on stdout; progress lines go to stderr.")
def plan_command(data: Path, backbones: tuple[str, ...], max_images: int, out: Path, no_progress: bool, quiet: bool,
                 as_json: bool, **options) -> None:
    """Profile DATA and print the ranked Plans with their reasons; write the top one.

    `autotransfer fit DATA --plan plan.json` then runs exactly that Plan.
    """
    check_data_root(data)
    from autotransfer import api

    log = None if quiet else _warn if as_json else click.echo
    plans = api.plan(data, backbone=backbones, max_images=max_images, progress=_progress(no_progress or quiet),
                     log=log, warn=_warn, **options)
    plans[0].save(out)
    if as_json:
        click.echo(json.dumps([asdict(plan) for plan in plans], indent=2))
        return
    click.echo("ranked plans:")
    for line in ranked_lines(plans):
        click.echo(line)
    click.echo(f"top plan written to {out}; run it with `autotransfer fit {data} --plan {out}`")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
def worker(run: Path) -> None:
    """Join the search of RUN: run its queued trials in this process.

    Start the search with a shared storage (`fit DATA --storage postgresql://... --trials N
    --out RUN`), then run `autotransfer worker RUN` on other machines that see the same
    DATA path and RUN folder (or a copy of RUN/search.json). Each trial runs exactly once.
    """
    from autotransfer import api
    from autotransfer.selector import continue_search

    api.quiet_frameworks()
    with interruptible(lambda: _worker_kept(run)):
        continue_search(run, adopt=False, log=click.echo)
    click.echo(f"no queued trial left in {run}'s study")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface of this machine).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080)
def dashboard(run: Path, host: str, port: int) -> None:
    """Open the Optuna study of RUN's search in optuna-dashboard: every trial with its
    parameters, scores per epoch, pruning and parameter importances. Serves until Ctrl-C.
    Needs optuna-dashboard (pip install 'autotransfer[dashboard]')."""
    from autotransfer.dashboard import serve

    serve(run, host, port, log=click.echo)


def _worker_kept(run: Path) -> str:
    from autotransfer.search import run_progress

    return f"{run}'s study keeps {run_progress(run)}; any worker or `autotransfer fit DATA --resume --out {run}` runs the queued ones"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backbones(as_json: bool) -> None:
    """List installed backbones: name, package, parameters, pretraining, input, depth.

    "groups" are timm's coarse groups (stem first): the coordinate of --cut. "levels" are
    timm feature levels: the coordinate of --feature-level. Any other timm model name
    also works with `fit --backbone` when timm can download (or has cached) its weights.
    A plugin that fails to load, or a backbone of one that breaks the contract, is
    listed on stderr with the reason ("failed ...") and never used.
    """
    from autotransfer.backbones import PluginFailure, discover
    from autotransfer.strategies import describe_backbone

    registry = discover()
    rows, failures = [], list(registry.failures)
    for spec in sorted(registry.specs.values(), key=lambda s: s.name):
        try:  # builds it: a plugin's create() may still fail here
            rows.append(describe_backbone(spec))
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:200]
            failures.append(PluginFailure(spec.package, spec.entry, f"{type(exc).__name__}: {first}", spec.name))
    if as_json:
        click.echo(json.dumps({"backbones": rows, "failed_plugins": [asdict(f) for f in failures]}, indent=2))
        return
    columns = [("name", "<"), ("package", "<"), ("params", ">"), ("pretrained", "<"), ("input", ">"),
               ("mean/std", "<"), ("groups", ">"), ("levels", ">")]
    cells = [[r["name"], r["package"], f"{r['params_m']:.1f}M", r["pretrained_on"], str(r["input_size"]),
              f"{_fmt(r['mean'])}/{_fmt(r['std'])}", str(r["groups"]), str(r["levels"])] for r in rows]
    widths = [max([len(title), *(len(c[i]) for c in cells)]) for i, (title, _) in enumerate(columns)]
    for line in [[title for title, _ in columns], *cells]:
        click.echo(" ".join(f"{v:{align}{w}}" for v, (_, align), w in zip(line, columns, widths)).rstrip())
    if not rows:
        click.echo("(none listed)")
    click.echo("Any timm model name also works online: `fit --backbone resnet50`.")
    _echo_failures(failures)


def _echo_failures(failures: list | None = None) -> None:
    """Each broken plugin or backbone once, on stderr: it is skipped, never silently."""
    if failures is None:
        from autotransfer.backbones import discover

        failures = discover().failures
    for failure in failures:
        click.echo(f"failed {failure}", err=True)


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
    from autotransfer import api

    report = api.load(run).evaluate(data, split)
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
    from autotransfer import api

    results = [p.to_dict() for p in api.load(run).predict(list(images), top_k)]
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for item in results:
        guesses = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in item["top_k"])
        click.echo(f"{item['image']}: {guesses}")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx"]), default="torchscript",
              help="torchscript: loads with torch alone; onnx: any ONNX runtime (pip install 'autotransfer[export]').")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="File to write [default: RUN/model.torchscript.pt or RUN/model.onnx]; its preprocessing goes to OUT.json.")
def export(run: Path, fmt: str, out: Path | None) -> None:
    """Write RUN's model as a file that runs without autotransfer, timm or the backbone's
    plugin, with its preprocessing (classes, input size, mean, std, interpolation, crop)
    in OUT.json. The export is loaded back and compared with the PyTorch model on a few
    photos; a difference of logits of 1e-4 or more is an error."""
    from autotransfer.export import TOLERANCE, export as export_model

    done = export_model(run, fmt, out)
    click.echo(f"checked against the PyTorch model on {done.images} images: max abs difference of logits "
               f"{done.max_abs_diff:.1e} (< {TOLERANCE:g})")
    click.echo(f"wrote {done.path} ({done.format}) and {done.metadata} (preprocessing, classes)")


@main.command("check-plugin")
@click.argument("name")
def check_plugin(name: str) -> None:
    """Run the plugin contract checks on backbone NAME, one line each (PASS, FAIL or SKIP
    and why): listed, builds, weights load, depths (feature levels, coarse groups), a
    frozen fit on generated images, predict / evaluate, load_model in a fresh process,
    and a cat photo through its ImageNet head (when it has one). Exit 1 if any fails.
    In a plugin's tests: `autotransfer.testing.check_backbone(NAME)`."""
    from autotransfer import api
    from autotransfer.testing import FAIL, run_checks

    api.quiet_frameworks()
    failed = sum(check.status == FAIL for check in run_checks(name, log=click.echo))
    if failed:
        raise click.ClickException(f"{name}: {failed} check(s) failed")
    click.echo(f"{name}: every check passed")


@main.command("demo-data")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", type=click.IntRange(min=8), default=32, help="Side of the exported PNGs in px.")
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
@click.option("--image-size", type=int, callback=_plan_field, default=None, help="Input size in px [default: what fit trains at: 128 for images under 96 px, else the backbone's].")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Folder of near-ImageNet photos that sets the reference level of the distances [default: photos bundled with scikit-image/scikit-learn].")
@click.option("--seed", type=int, callback=_plan_field, default=0, help="Seed of the sample and of the validation split drawn when DATA has no val/.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("profile.json"), help="Where to write the profile.")
@click.option("--no-progress", is_flag=True, help="No progress bar [default: a bar only when stdout and stderr are terminals].")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as one JSON document on stdout (what OUT holds).")
def profile(data: Path, out: Path, no_progress: bool, as_json: bool, **options) -> None:
    """Measure DATA for a backbone: size, images, quality, distance to ImageNet per depth.

    One scan of every file and one forward pass over (a sample of) train+val; test/ is
    only counted and checked. Per depth (timm coarse group, the coordinate of --cut):
    BatchNorm-statistics gap to ImageNet relative to a calibrated reference, Frechet
    distance to the calibration photos' features, LogME and leave-one-out k-NN with
    trivial baselines. Writes OUT (schema in README, "How it decides").
    """
    check_data_root(data)
    from autotransfer import api
    from autotransfer.profile import format_profile

    result = api.profile(data, progress=_progress(no_progress), **options)
    result.save(out)
    if as_json:
        click.echo(result.to_json())
        return
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
@click.option("--image-size", type=int, callback=_plan_field, default=None, help="Input size in px for every recipe [default: 64 with --quick, else what fit chooses per dataset: 128 for images under 96 px, else the backbone's].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Fine-tuning epochs of every recipe [default: 2 with --quick, else 6].")
@click.option("--lr", type=float, callback=_plan_field, default=None, help="Head learning rate of every recipe [default: 1e-3].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 32]")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="autotransfer's search: number of trials [default: fit's default count; never a time budget].")
@click.option("--seed", type=int, callback=_plan_field, default=0, help="Seed of subsamples, splits and training.")
@click.option("--keep-models", is_flag=True, help="Keep every recipe's model.pt under OUT/runs/ (large).")
@click.option("--uncapped", is_flag=True, help="With --quick: keep every image of train, val and test (quick epochs and resolution, full size).")
@click.option("--coarse-grid", is_flag=True, help="Fine-tuning grid = the middle cut and full (as --quick does) instead of every cut: a full-size bench within a GPU-hour.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench"), help="Where bench.md, bench.json, bench.html and the runs go.")
@click.option("--resume", is_flag=True, help="Continue an interrupted bench in --out (same command): rows it finished are kept, autotransfer's search goes on from its study, the rest runs. A cell run with other settings or images is refused.")
@click.option("--no-progress", is_flag=True, help="Accepted for symmetry with fit; bench prints one line per recipe.")
def bench(data: tuple[Path, ...], per_class: tuple[str, ...], quick: bool, seed: int, keep_models: bool,
          uncapped: bool, coarse_grid: bool, out: Path, resume: bool, no_progress: bool, **options) -> None:
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
    OUT/runs/       each recipe's RUN folder (models deleted unless --keep-models),
                    and each cell's finished rows (rows/), kept as they end for --resume
    """
    from autotransfer import api
    from autotransfer.bench import BenchSettings, parse_sizes, run_bench, verdict_lines

    api.quiet_frameworks()
    sizes = parse_sizes(per_class)
    make = BenchSettings.quick_mode if quick else BenchSettings.full_mode
    settings = make(seed=seed, keep_models=keep_models, **options, **({"coarse_cuts": True} if coarse_grid else {}))
    if uncapped:
        settings = replace(settings, train_cap=None, val_cap=None, test_cap=None)
    command = _command_line(click.get_current_context(), ["autotransfer", "bench", *map(str, data)])
    resumable = f"rows it finished are kept in {out}/runs/; continue with the same command and --resume"
    with interruptible(lambda: resumable):
        report = run_bench(list(data), sizes, settings, out, command=command, log=click.echo, resume=resume)
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
@click.option("--no-progress", is_flag=True, help="No progress bars [default: bars only when stdout and stderr are terminals].")
def report(run: Path, out: Path | None, data: Path | None, curve: bool, max_misclassified: int, no_progress: bool) -> None:
    """Explain RUN: data, decision, layer-transfer curve, search, errors.

    Writes a self-contained report.html (no network needed to view it), report.md and
    report.json to --out. Works on explicit runs too: what they lack is named, with the
    command that produces it.
    """
    from autotransfer import api

    html = api.Run(run).report(out, data=data, curve=curve, max_misclassified=max_misclassified,
                               progress=_progress(no_progress), log=click.echo, warn=_warn)
    click.echo(f"report written to {html} (and report.md, report.json)")


if __name__ == "__main__":
    main()
