"""Contract checks for one installed backbone: the plugin author's kit.

`autotransfer check-plugin NAME` prints them; a plugin's own tests call
`check_backbone(NAME)`, which fails with every failed check's reason. Each check says
PASS, FAIL or SKIP with why. They run what users will run (build, weights, depths, a
frozen fit on generated images, predict / evaluate / load_model in a fresh process, a
cat photo through the ImageNet head), so a plugin that passes works in every command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from autotransfer.backbones import BackboneSpec, classifier_names, create_model, get_backbone, on_device
from autotransfer.errors import AutotransferError
from autotransfer.features import use_cache

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
COLOURS = {"blue": (35, 55, 215), "green": (35, 195, 55), "red": (215, 35, 35)}  # easy classes


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    reason: str

    def __str__(self) -> str:
        return f"{self.status} {self.name}: {self.reason}"


def check_backbone(name: str, log: Callable[[str], None] | None = None) -> list[Check]:
    """Run every check on backbone `name`; AssertionError naming each failure (for pytest)."""
    results = run_checks(name, log)
    failed = [str(check) for check in results if check.status == FAIL]
    assert not failed, f"backbone {name} breaks the plugin contract:\n" + "\n".join(failed)
    return results


def run_checks(name: str, log: Callable[[str], None] | None = None) -> list[Check]:
    """Every check on backbone `name`, each passed to `log` as it ends. A check whose
    inputs an earlier failure took away is a FAIL that names that check."""
    results: list[Check] = []
    for check in _checks(name):
        results.append(check)
        if log:
            log(str(check))
    return results


def _checks(name: str) -> Iterator[Check]:
    try:
        spec = get_backbone(name)
    except AutotransferError as exc:
        yield Check("listed", FAIL, str(exc))
        return
    yield Check("listed", PASS, f"from {spec.package or '?'}[{spec.entry or '?'}], architecture {spec.architecture}")
    try:
        model = create_model(spec, "random", num_classes=0)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        yield Check("builds", PASS, f"{type(model).__name__}, {params:.2f}M parameters")
    except Exception as exc:
        yield Check("builds", FAIL, _error(exc))
        return
    weights = yield from _weights(spec)
    yield _depths(spec, model)
    with tempfile.TemporaryDirectory(prefix="autotransfer-check-") as tmp, use_cache(Path(tmp) / "cache"):
        run = yield from _frozen_fit(spec, weights, Path(tmp))
        yield from _round_trip(run, Path(tmp))
    yield _cat_photo(spec, weights)


def _error(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _weights(spec: BackboneSpec) -> Iterator[Check]:
    """The weights the later checks use: 'pretrained' when they load, else 'random'."""
    if spec.weights is None and spec.create is not None:
        yield Check("weights", SKIP, "the spec ships no pretrained weights (weights=None with create)")
        return "random"
    if spec.weights is None and not _timm_has_weights(spec):
        yield Check("weights", SKIP, f"timm has no pretrained weights for {spec.architecture}")
        return "random"
    try:
        create_model(spec, "pretrained", num_classes=0)
    except Exception as exc:
        yield Check("weights", FAIL, _error(exc))
        return "random"
    source = "weights()" if spec.weights is not None else "timm's pretrained loading"
    yield Check("weights", PASS, f"{source} fits the model (pretrained on {spec.pretrained_on})")
    return "pretrained"


def _timm_has_weights(spec: BackboneSpec) -> bool:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.architecture)
    return bool(cfg and (cfg.hf_hub_id or cfg.url or cfg.file))


def _depths(spec: BackboneSpec, model: torch.nn.Module) -> Check:
    from autotransfer.strategies import coarse_groups, supports_all_levels

    try:
        levels = len(model.feature_info)
        groups = len(coarse_groups(model))
        if levels < 1 or groups < 2:
            return Check("depths", FAIL, f"{levels} feature levels and {groups} coarse groups; need at least 1 and 2 "
                                         "(feature_info, group_matcher(coarse=True), stem first)")
        if not supports_all_levels(model):
            return Check("depths", FAIL, "no forward_intermediates: --all-levels and feature levels cannot read it")
        size = spec.input_size
        with torch.no_grad():
            _, maps = model.eval().forward_intermediates(torch.zeros(1, 3, size, size), indices=list(range(levels)))
        channels = [int(m.shape[1]) for m in maps]
        declared = [int(c) for c in model.feature_info.channels()] if hasattr(model.feature_info, "channels") else \
            [int(info["num_chs"]) for info in model.feature_info]
        if channels != declared:
            return Check("depths", FAIL, f"forward_intermediates gives {channels} channels, feature_info says {declared}")
        return Check("depths", PASS, f"{levels} feature levels (channels {channels}), {groups} coarse groups")
    except Exception as exc:
        return Check("depths", FAIL, _error(exc))


def write_images(root: Path, per_class: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    """root/<split>/<colour>/<i>.png: noisy images of one dominant colour per class."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.asarray(colour, float)[None, None] + rng.normal(0, 30, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _frozen_fit(spec: BackboneSpec, weights: str, tmp: Path) -> Iterator[Check]:
    from autotransfer.data import scan_folder
    from autotransfer.plan import Plan
    from autotransfer.train import fit

    data = write_images(tmp / "data", {"train": 6, "val": 3})
    run = tmp / "run"
    try:
        plan = Plan(spec.name, strategy="frozen", weights=weights, batch_size=8)
        fit(scan_folder(data), plan, run, progress=False, log=lambda _: None)
        accuracy = json.loads((run / "metrics.json").read_text())["val"]["accuracy"]
    except Exception as exc:
        yield Check("frozen fit", FAIL, _error(exc))
        return None
    yield Check("frozen fit", PASS, f"{weights} weights, {spec.input_size} px, 3 colour classes: val accuracy {accuracy:.2f}")
    return run


def _round_trip(run: Path | None, tmp: Path) -> Iterator[Check]:
    if run is None:
        yield Check("predict/evaluate/load_model", FAIL, "no model: the frozen fit failed")
        return
    from autotransfer.predict import load

    data = tmp / "data"
    try:
        model = load(run)
        images = sorted((data / "val" / "red").glob("*.png"))
        labels = [p.label for p in model.predict(images)]
        report = model.evaluate(data, "val")
        measured = json.loads((run / "metrics.json").read_text())["val"]["confusion_matrix"]
    except Exception as exc:
        yield Check("predict/evaluate", FAIL, _error(exc))
        return
    if report["confusion_matrix"] != measured:
        yield Check("predict/evaluate", FAIL, "evaluate's confusion matrix differs from the one fit measured: the "
                                              "loaded model or its preprocessing is not the trained one")
        return
    yield Check("predict/evaluate", PASS, f"predicted {labels.count('red')}/{len(labels)} red images as red; "
                                          f"evaluate reproduces fit's val confusion matrix")
    yield _fresh_load(run, model, tmp)


def _fresh_load(run: Path, model, tmp: Path) -> Check:
    """load_model in a new process: the model file must name a plugin that rebuilds it."""
    batch = torch.randn(2, 3, model.preprocessing.input_size, model.preprocessing.input_size,
                        generator=torch.Generator().manual_seed(0))
    torch.save(batch, tmp / "batch.pt")
    code = textwrap.dedent(f"""
        import torch
        from autotransfer.backbones import on_device
        from autotransfer.checkpoint import load_model
        net, _, _ = load_model({str(run)!r})
        on_device(net, "cpu")  # the layout predict computes in: the other one rounds otherwise
        with torch.no_grad():
            torch.save(net(torch.load({str(tmp / "batch.pt")!r})), {str(tmp / "logits.pt")!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Check("load_model (fresh process)", FAIL, last[:300])
    with torch.no_grad():
        expected = on_device(model.net, "cpu")(batch)
    diff = float((torch.load(tmp / "logits.pt") - expected).abs().max())
    if diff > 1e-5:
        return Check("load_model (fresh process)", FAIL, f"logits differ by {diff:.2g} from the trained model's")
    return Check("load_model (fresh process)", PASS, "rebuilds the model through its plugin, same logits")


def _cat_photo(spec: BackboneSpec, weights: str) -> Check:
    """skimage's chelsea through the spec's preprocessing and a 1000-way ImageNet head."""
    trained_on = spec.pretrained_on.lower()
    if weights != "pretrained" or "imagenet" not in trained_on or any(s in trained_on for s in ("21k", "22k")):
        return Check("preprocessing", SKIP, f"no 1000-way ImageNet head to read (pretrained on {spec.pretrained_on}, "
                                            f"{weights} weights)")
    try:
        from skimage.data import chelsea

        from autotransfer.features import eval_transform
        from autotransfer.plan import Plan
        from autotransfer.strategies import Preprocessing

        model = create_model(spec, "pretrained", num_classes=1000).eval()
        if spec.weights is not None and not _ships_head(spec, model):
            return Check("preprocessing", SKIP, "weights() carries no 1000-way classifier")
        prep = Preprocessing.for_plan(spec, Plan(spec.name))
        image = eval_transform(prep)(Image.fromarray(chelsea())).unsqueeze(0)
        with torch.inference_mode():
            top5 = model(image).softmax(1)[0].topk(5).indices.tolist()
    except Exception as exc:
        return Check("preprocessing", FAIL, _error(exc))
    if top5[0] not in CAT_CLASSES:
        return Check("preprocessing", FAIL, f"a cat photo's top-5 ImageNet classes are {top5}, top-1 not a cat "
                                            f"(281-285): check input_size, mean, std, interpolation and crop_pct of the spec")
    return Check("preprocessing", PASS, f"a cat photo lands in ImageNet class {top5[0]} (a cat; top-5 {top5})")


def _ships_head(spec: BackboneSpec, model: torch.nn.Module) -> bool:
    state, own = spec.weights(), model.state_dict()
    heads = tuple(f"{name}." for name in classifier_names(model))
    return any(k.startswith(heads) and k in state and state[k].shape == own[k].shape for k in own)
