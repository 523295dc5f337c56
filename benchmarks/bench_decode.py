"""Does re-decoding small images dominate a fine-tuning epoch's loading? (issue 19)

A decoded uint8 cache would replace `load_rgb` (open, decode, convert) with a copy out of
an array. On the small-image datasets (cifar10 32 px JPEG, pneumoniamnist 28 px PNG) this
measures, per image and in one process: decoding, building the image from a decoded
uint8 array (what the cache would cost), and the fine-tuning augmentation that runs in
either case, at the image's own size and at 128 px (what `fit` chooses for small images).
The share of decoding in the loader's work is what such a cache could save at most.

    python benchmarks/bench_decode.py --datasets ../shared/datasets [--images 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from _results import machine, versions, write_result

from autotransfer.backbones import get_backbone
from autotransfer.data import load_rgb
from autotransfer.features import train_transform
from autotransfer.plan import DEFAULT_BACKBONE, Plan
from autotransfer.strategies import Preprocessing

SMALL_IMAGE_SETS = ("cifar10", "pneumoniamnist")


def ms_per_image(work, items: list) -> float:
    start = time.perf_counter()
    for item in items:
        work(item)
    return round(1000 * (time.perf_counter() - start) / len(items), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--images", type=int, default=2000, help="Training images of each set timed.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = parser.parse_args()
    spec = get_backbone(DEFAULT_BACKBONE)
    rows = []
    for name in SMALL_IMAGE_SETS:
        files = sorted((args.datasets / name / "train").glob("*/*"))[:args.images]
        if not files:
            raise SystemExit(f"no training images under {args.datasets / name}: pass --datasets")
        images = [load_rgb(f) for f in files]  # once to warm the page cache
        arrays = [np.asarray(image) for image in images]
        decode = ms_per_image(load_rgb, files)
        from_array = ms_per_image(Image.fromarray, arrays)
        for size in (images[0].width, 128):
            augment = train_transform(Preprocessing.for_plan(spec, Plan(DEFAULT_BACKBONE, "full", image_size=size)))
            augmenting = ms_per_image(augment, images)
            rows.append({
                "dataset": name, "image_px": images[0].width, "input_size": size, "images": len(files),
                "decode_ms": decode, "from_uint8_ms": from_array, "augment_ms": augmenting,
                "decode_share_of_loading": round(decode / (decode + augmenting), 3),
                "most_a_decoded_cache_saves": round((decode - from_array) / (decode + augmenting), 3),
            })
            print(rows[-1], file=sys.stderr)
    write_result(args.out, {
        "benchmark": "per-image cost of decoding vs augmenting small images in the fine-tuning loader",
        "command": " ".join(["python", *sys.argv]), "backbone": DEFAULT_BACKBONE, "rows": rows,
        **machine(), "versions": versions(torch, timm),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
