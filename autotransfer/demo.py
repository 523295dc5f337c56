"""A real dataset that needs no download: scikit-learn's bundled handwritten digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from autotransfer.errors import AutotransferError


def export_digits(out: str | Path, size: int = 32) -> dict[str, int]:
    """Write the 1,797 8x8 digits as `out/<digit>/<index>.png` upscaled to `size` px."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise AutotransferError(
            "demo-data needs scikit-learn; install it with `pip install 'autotransfer[demo]'`"
        ) from None
    out = Path(out)
    digits = load_digits()
    counts: dict[str, int] = {}
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        name = str(int(target))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255.0).astype(np.uint8)  # values are 0..16
        Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST).save(
            folder / f"{index:04d}.png"
        )
        counts[name] = counts.get(name, 0) + 1
    return counts
