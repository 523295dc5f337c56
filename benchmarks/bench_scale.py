"""How time and memory grow with the number of images: scan, profile and a frozen fit.

Generated folders of N small images (DATA/<class>/<i>.jpg, a colour and a stripe pattern
per class, pixel noise), written once under --data-dir and reused. Each stage runs in a
fresh process with an empty feature cache (the calibration reference is computed once
beforehand, as in real use), so its peak resident memory is its own: the main process's
(`ru_maxrss`, memory-mapped cache pages included) and the largest child's (loader workers;
forked, they share most of those pages with the main process, so the two do not add up).
Stages:

- scan: `scan_folder` (decode and hash every file);
- profile: `profile_dataset` (its own scan, then a forward pass over a stratified sample of
  --max-images, the tool's default 1000: the profile's cost beyond the scan is bounded);
- fit: scan, then `train.fit` of a fixed frozen Plan: features of every image, written to
  the on-disk cache batch by batch, then the cross-validated linear probe on all of them;
- features: the fit's first part alone (scan and features), for sizes past --fit-up-to.

Goal (issue 19): at the largest size profile and fit each under 4 GiB peak RSS, and their
time per image within 1.5x of that at the smallest.

    python benchmarks/bench_scale.py [--sizes 10000 30000 100000] [--data-dir ~/.cache/autotransfer-bench]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from _results import machine, versions, write_result

GOAL_RSS_MIB = 4096
GOAL_RATIO = 1.5
HERE = Path(__file__).resolve().parent
STAGES = ("scan", "profile", "fit", "features")


def write_folder(root: Path, images: int, classes: int, px: int, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg, written once: a `root.done` file marks a complete folder."""
    done = root.with_name(root.name + ".done")
    if done.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    colours = rng.uniform(30, 225, (classes, 3))
    angles = rng.uniform(0, np.pi, classes)
    yy, xx = np.mgrid[0:px, 0:px] / px
    for c in range(classes):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % classes
        stripes = 40 * np.sin(2 * np.pi * 3 * (xx * np.cos(angles[c]) + yy * np.sin(angles[c])))
        pixels = colours[c] + stripes[..., None] + rng.normal(0, 25, (px, px, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"c{c:03d}" / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{images} images, {classes} classes, {px} px\n")
    return root


def peak_rss_mib() -> dict:
    gc.collect()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own), "largest_child_rss_mib": round(workers)}


def run_stage(args: argparse.Namespace) -> dict:
    """One stage in this process; returns its seconds and figures (peak RSS added by the caller)."""
    from autotransfer.api import quiet_frameworks
    from autotransfer.backbones import get_backbone
    from autotransfer.data import scan_folder
    from autotransfer.features import cached_features, weights_id
    from autotransfer.plan import Plan
    from autotransfer.profile import profile_dataset
    from autotransfer.strategies import Preprocessing, build_net
    from autotransfer.train import fit

    quiet_frameworks()
    start = time.perf_counter()
    if args.stage == "scan":
        scan = scan_folder(args.data)
        return {"seconds": time.perf_counter() - start, "images": sum(map(len, scan.splits.values()))}
    if args.stage == "profile":
        profile = profile_dataset(args.data, args.backbone, args.weights, max_images=args.max_images,
                                  image_size=args.image_size, progress=False)
        return {"seconds": time.perf_counter() - start, "images": sum(profile.size.images.values()),
                "profiled_images": profile.sample.images, "profile_seconds_reported": profile.seconds}
    scan = scan_folder(args.data)
    scanned = time.perf_counter() - start
    plan = Plan(args.backbone, "frozen", image_size=args.image_size, weights=args.weights, batch_size=64)
    spec = get_backbone(plan.backbone)
    net, prep, wid = build_net(spec, plan, len(scan.classes)), Preprocessing.for_plan(spec, plan), weights_id(spec, plan.weights, plan.seed)
    for split in ("train", "val"):  # what fit does first, timed apart; fit then reads the cache files
        dims = cached_features(net, scan, split, prep, spec.architecture, wid, None, progress=False)[0].shape[1]
    features = time.perf_counter() - start - scanned
    del net
    if args.stage == "features":
        return {"seconds": time.perf_counter() - start, "images": sum(map(len, scan.splits.values())),
                "scan_seconds": round(scanned, 2), "features_seconds": round(features, 2), "feature_dims": dims}
    with tempfile.TemporaryDirectory(prefix="bench-scale-run-") as out:
        result = fit(scan, plan, out, progress=False, log=lambda _: None)
    return {"seconds": time.perf_counter() - start, "images": sum(map(len, scan.splits.values())),
            "scan_seconds": round(scanned, 2), "features_seconds": round(features, 2),
            "probe_seconds": round(time.perf_counter() - start - scanned - features, 2),
            "feature_dims": dims,
            "cv_balanced_accuracy": result.metrics["cv"]["balanced_accuracy"]}


def stage_in_child(stage: str, data: Path, cache: Path, args: argparse.Namespace) -> dict:
    """Run one stage in a fresh process with an empty feature cache; its JSON line back."""
    shutil.rmtree(cache / "features", ignore_errors=True)
    command = [sys.executable, __file__, "--stage", stage, "--data", str(data), "--backbone", args.backbone,
               "--weights", args.weights, "--image-size", str(args.image_size), "--max-images", str(args.max_images)]
    env = {**os.environ, "AUTOTRANSFER_CACHE": str(cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} on {data} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ms_per_image(row: dict, stage: str) -> float | None:
    """A stage's ms per image in `row`; a fit's first part counts as the features stage."""
    if stage in row:
        return row[stage]["ms_per_image"]
    if stage == "features" and "fit" in row:
        return 1000 * (row["fit"]["scan_seconds"] + row["fit"]["features_seconds"]) / row["images"]
    return None


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    time_ax, rss_ax = fig.subplots(1, 2)
    for stage in STAGES:
        points = [(r["images"], r[stage]) for r in rows if stage in r]
        if not points:
            continue
        xs = [n for n, _ in points]
        time_ax.plot(xs, [s["ms_per_image"] for _, s in points], "o-", label=stage)
        rss_ax.plot(xs, [s["peak_rss_mib"] for _, s in points], "o-", label=stage)
    rss_ax.axhline(GOAL_RSS_MIB, color="grey", linestyle="--", label="4 GiB goal")
    for ax, ylabel in ((time_ax, "ms per image"), (rss_ax, "peak RSS, MiB")):
        ax.set_xscale("log")
        ax.set_xlabel("images")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    time_ax.set_title("wall time per image")
    rss_ax.set_title("peak resident memory (main process)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "autotransfer-bench",
                        help="Where the generated folders are written once and reused.")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--image-px", type=int, default=32, help="Side of the generated images.")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="pretrained", help="pretrained, random (timing alone) or a file")
    parser.add_argument("--image-size", type=int, default=64, help="Input size the backbone sees (upsampled).")
    parser.add_argument("--max-images", type=int, default=1000, help="The profile's sample (its default).")
    parser.add_argument("--stages", nargs="+", default=["scan", "profile", "fit"], choices=STAGES)
    parser.add_argument("--fit-up-to", type=int, default=None,
                        help="Larger sets run the 'features' stage (scan + features to the cache) instead of "
                             "'fit': the probe's L-BFGS dominates a frozen fit and may not fit the time you have.")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    parser.add_argument("--resume", action="store_true",
                        help="Keep the stages --out already holds for these settings; run only the missing ones.")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps({**run_stage(args), **peak_rss_mib()}))
        return 0
    if min(args.sizes) < 2 * args.classes:
        parser.error(f"--sizes must be at least 2 images per class ({2 * args.classes}), but got {min(args.sizes)}")

    cache = Path(tempfile.mkdtemp(prefix="autotransfer-bench-scale-"))
    folders = {n: write_folder(args.data_dir / f"scale-{args.image_px}px-{args.classes}c-{n}", n, args.classes, args.image_px)
               for n in sorted(args.sizes)}
    if "profile" in args.stages:  # the calibration reference, computed once per backbone in real use
        stage_in_child("profile", folders[min(folders)], cache, argparse.Namespace(**{**vars(args), "max_images": 2}))
    done = {r["images"]: r for r in _resumable(args)}
    rows = []
    for n, folder in folders.items():
        row: dict = done.get(n, {"images": n})
        for stage in args.stages:
            if stage == "fit" and args.fit_up_to is not None and n > args.fit_up_to:
                stage = "features"
            if stage in row:
                continue
            figures = stage_in_child(stage, folder, cache, args)
            figures["ms_per_image"] = round(1000 * figures["seconds"] / n, 3)
            figures["seconds"] = round(figures["seconds"], 2)
            row[stage] = figures
            print(f"{n} images, {stage}: {figures}", file=sys.stderr, flush=True)
        rows.append(row)
        result = summarise(rows, args)  # written after every size: a stopped run keeps what it measured
        write_result(args.out, result)
    shutil.rmtree(cache, ignore_errors=True)
    return 0 if result["passed"] else 1


SETTINGS = ("classes", "image_px", "backbone", "weights", "image_size", "max_images")


def _resumable(args: argparse.Namespace) -> list[dict]:
    """The rows of --out when --resume is set and it was measured with the same settings."""
    if not args.resume or not args.out.is_file():
        return []
    old = json.loads(args.out.read_text())
    if old.get("settings") != {k: getattr(args, k) for k in SETTINGS}:
        raise SystemExit(f"--resume: {args.out} was measured with {old.get('settings')}; rerun without --resume")
    return old["rows"]


def summarise(rows: list[dict], args: argparse.Namespace) -> dict:
    """The result so far, with the goal checked on the largest size against the smallest; draws the plot."""
    smallest, largest = rows[0], rows[-1]
    checks = {}
    for stage in ("profile", "fit", "features"):
        if len(rows) > 1 and stage in largest and _ms_per_image(smallest, stage):
            ratio = largest[stage]["ms_per_image"] / _ms_per_image(smallest, stage)
            checks[stage] = {"images": largest["images"], "peak_rss_mib": largest[stage]["peak_rss_mib"],
                             "time_per_image_ratio": round(ratio, 3),
                             "passed": largest[stage]["peak_rss_mib"] < GOAL_RSS_MIB and ratio <= GOAL_RATIO}
    plot_path = args.out.with_suffix(".png")
    plot(rows, plot_path)
    return {
        "benchmark": "scan, profile and frozen fit: wall time per image and peak RSS vs number of images",
        "command": " ".join(["python", *sys.argv]),
        "data": f"generated: {args.classes} classes, {args.image_px} px JPEG, class folders (val drawn: 20 %)",
        "backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
        "profile_max_images": args.max_images,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "frozen_plan": f"Plan({args.backbone!r}, 'frozen', image_size={args.image_size}, weights={args.weights!r}, batch_size=64)",
        "loader_workers_env": os.environ.get("AUTOTRANSFER_WORKERS"),
        "rows": rows,
        "goal": f"at 100,000 images: profile and fit peak RSS < {GOAL_RSS_MIB} MiB and ms/image <= {GOAL_RATIO} x that at the smallest size",
        "largest_vs_smallest": checks,
        "passed": largest["images"] >= 100_000 and {"profile", "fit"} <= checks.keys() and all(c["passed"] for c in checks.values()),
        "plot": str(plot_path.relative_to(HERE.parent)) if plot_path.is_relative_to(HERE.parent) else str(plot_path),
        **machine(), "versions": versions(torch, timm),
    }


if __name__ == "__main__":
    sys.exit(main())
