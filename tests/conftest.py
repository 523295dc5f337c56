"""Shared fixtures: tiny generated image folders, an isolated environment, trained runs.

Everything runs offline on CPU with timm's tiny test models and random weights. The
classes differ by their dominant colour, so a working pipeline reaches (near) perfect
accuracy and a broken one does not.
"""

from __future__ import annotations

import logging
import signal
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image

# dominant colour per class; sorted names are the class order: blue, green, red
COLOURS = {"red": (215, 35, 35), "green": (35, 195, 55), "blue": (35, 55, 215)}
CLASSES = sorted(COLOURS)
IMAGE_PX = 40
FAST = dict(  # Plan fields for a quick run on the tiny folders
    weights="random", image_size=32, epochs=1, lr=0.02, batch_size=8
)
FAST_CLI = [
    "--weights", "random", "--image-size", "32", "--epochs", "1",
    "--lr", "0.02", "--batch-size", "8", "--no-progress",
]


def photo(colour: tuple[int, int, int], seed: int, size: int = IMAGE_PX) -> Image.Image:
    """A noisy image around `colour`: many distinct colours, like a photo."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(colour, dtype=np.float64)[None, None, :] + rng.normal(0, 30, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_classes(
    root: Path, per_class: int, classes: dict[str, tuple[int, int, int]] | None = None,
    seed: int = 0,
) -> Path:
    """root/<class>/<i>.jpg for each class."""
    classes = COLOURS if classes is None else classes
    for c, (name, colour) in enumerate(sorted(classes.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(colour, seed=seed * 10_000 + c * 1_000 + i).save(folder / f"{i:02d}.jpg", quality=92)
    return root


# a backbone plugin: test_resnet with its own (seeded random) "pretrained" weights
GOOD_PLUGIN = """
    import timm
    import torch

    from autotransfer.backbones import BackboneSpec

    def weights():
        torch.manual_seed(1234)
        return timm.create_model("test_resnet", pretrained=False).state_dict()

    def backbones():
        return [
            BackboneSpec(
                name="test_resnet",
                architecture="test_resnet",
                pretrained_on="tiny-plugin-set",
                input_size=64,
                mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25),
                weights=weights,
            )
        ]
"""

BROKEN_PLUGIN = """
    raise ImportError("needs the missing_wheel package")
"""

# A plugin as an outside user writes it: an architecture timm does not have (a tiny
# LeakyReLU ResNet) that only this module registers, weights from a DataParallel training
# checkpoint (the plugin strips `module.`; no BatchNorm counters), the same network as a
# create() factory, and a name longer than the listing's old column.
LEAKY_PLUGIN = """
    import torch
    from timm.models import build_model_with_cfg, register_model
    from timm.models.resnet import BasicBlock, ResNet
    from torch import nn

    from autotransfer.backbones import BackboneSpec

    ARGS = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 24), stem_width=8, act_layer=nn.LeakyReLU)

    @register_model
    def leaky_tinynet(pretrained=False, **kwargs):
        return build_model_with_cfg(ResNet, "leaky_tinynet", pretrained, **ARGS, **kwargs)

    def checkpoint():
        torch.manual_seed(7)
        state = ResNet(**ARGS, num_classes=10).state_dict()
        return {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def weights():
        return {k.removeprefix("module."): v for k, v in checkpoint().items()}

    def spec(name, architecture, **kwargs):
        return BackboneSpec(name, architecture, "tiny-leaky-set", 32, (0.5,) * 3, (0.25,) * 3, weights=weights, **kwargs)

    def backbones():
        return [
            spec("leaky_tinynet", "leaky_tinynet"),
            spec("leaky_factory", "leaky-resnet-8-16-16-24", create=lambda num_classes: ResNet(**ARGS, num_classes=num_classes)),
            spec("leaky_tinynet_with_a_long_name", "leaky_tinynet"),
        ]
"""

# Specs that break the contract: an architecture name timm does not know, weights that are
# a path instead of a function. Their names sort before efficientnet_lite1.
BAD_SPECS_PLUGIN = """
    from autotransfer.backbones import BackboneSpec

    def backbones():
        return [
            BackboneSpec("a_misspelt_net", "leaky_tinynett", "x", 32, (0.5,) * 3, (0.5,) * 3, default_candidate=True),
            BackboneSpec("a_weights_path_net", "test_resnet", "x", 32, (0.5,) * 3, (0.5,) * 3, weights="/models/w.pth"),
        ]
"""

# A valid spec whose weights cannot be had: only using it can tell.
BAD_WEIGHTS_PLUGIN = """
    from autotransfer.backbones import BackboneSpec

    def weights():
        raise FileNotFoundError("/models/gone.pth")

    def backbones():
        return [BackboneSpec("a_gone_weights_net", "test_resnet", "x", 32, (0.5,) * 3, (0.5,) * 3, weights=weights,
                             default_candidate=True)]
"""


def write_plugins(root: Path) -> Path:
    """The leaky plugin and one plugin per way of breaking (import, specs, weights)."""
    write_plugin(root, "autotransfer-leaky", "leaky_plugin", "leaky", LEAKY_PLUGIN)
    write_plugin(root, "autotransfer-broken-plugin", "broken_plugin", "broken", BROKEN_PLUGIN)
    write_plugin(root, "autotransfer-bad-specs", "bad_specs_plugin", "bad_specs", BAD_SPECS_PLUGIN)
    write_plugin(root, "autotransfer-bad-weights", "bad_weights_plugin", "bad_weights", BAD_WEIGHTS_PLUGIN)
    return root


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`write_plugins` installed for this process (on sys.path, autoload on) and for child
    processes (`plugin_env`)."""
    site = write_plugins(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD")
    return site


def plugin_env(site: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh process that finds the plugins in `site`, as pip would
    install them; offline, autoload on unless `extra` says otherwise."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def write_plugin(root: Path, dist: str, module: str, entry: str, source: str) -> Path:
    """A minimal installed distribution under `root`: dist-info with one entry point + module.

    Put `root` on sys.path (monkeypatch.syspath_prepend) and importlib.metadata finds it.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[autotransfer.backbones]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture(autouse=True)
def isolated_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Feature cache in tmp for every test. Fast tests also run offline, in tmp, without
    third-party plugins (plugin tests switch autoload back on); `slow` tests keep the
    installed plugins and the network, for real weights."""
    cache = tmp_path / "autotransfer-cache"
    monkeypatch.setenv("AUTOTRANSFER_CACHE", str(cache))
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable at import; without this, timm retries a minute
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.chdir(tmp_path)  # stray runs/ or lightning_logs/ land in tmp, not the repo
    yield cache
    for name, module in list(sys.modules.items()):  # plugin modules written by the test
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture(scope="session", autouse=True)
def _quiet_lightning() -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_delivered() -> Iterator[None]:
    """Tests press Ctrl-C (in-process and at servers they start): a suite started with `&`
    by a non-interactive shell inherits SIGINT ignored (POSIX), and so would its children."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/<class>/*.jpg: 3 colour classes x 8 images of 40 px (a val split is drawn)."""
    return write_classes(tmp_path_factory.mktemp("data") / "colours", per_class=8)


@pytest.fixture(scope="session")
def split_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/train|val|test/<class>/*.jpg: 6 / 2 / 2 images per class."""
    root = tmp_path_factory.mktemp("data") / "splits"
    for seed, (split, n) in enumerate([("train", 6), ("val", 2), ("test", 2)]):
        write_classes(root / split, per_class=n, seed=seed + 1)
    return root


def _fit_session_run(tmp_path_factory, data: Path, name: str, **plan_fields) -> Path:
    from autotransfer.data import scan_folder
    from autotransfer.plan import Plan
    from autotransfer.train import fit

    out = tmp_path_factory.mktemp("runs") / name
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setenv("AUTOTRANSFER_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        mp.setenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        plan = Plan(**{**FAST, **plan_fields})
        fit(scan_folder(data, plan.val_fraction, plan.seed), plan, out, progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def frozen_run(tmp_path_factory, split_folder: Path) -> Path:
    """A finished run: test_efficientnet, linear head only, whole backbone."""
    return _fit_session_run(tmp_path_factory, split_folder, "frozen", backbone="test_efficientnet")


@pytest.fixture(scope="session")
def class_folder_run(tmp_path_factory, image_folder: Path) -> Path:
    """A frozen run on bare class folders, its val split drawn with a non-default seed and fraction."""
    return _fit_session_run(
        tmp_path_factory, image_folder, "class-folders", backbone="test_efficientnet", seed=3, val_fraction=0.5
    )


@pytest.fixture(scope="session")
def truncated_run(tmp_path_factory, split_folder: Path) -> Path:
    """A finished run classifying from feature level 2 of test_resnet, fine-tuned above cut 1."""
    return _fit_session_run(
        tmp_path_factory, split_folder, "truncated", backbone="test_resnet",
        strategy="partial", cut=1, feature_level=2,
    )


@pytest.fixture(scope="session")
def all_levels_run(tmp_path_factory, split_folder: Path) -> Path:
    """A frozen run reading every feature level of test_efficientnet at once."""
    return _fit_session_run(tmp_path_factory, split_folder, "all-levels", backbone="test_efficientnet", all_levels=True)


@pytest.fixture(scope="session")
def all_levels_feature_run(tmp_path_factory, split_folder: Path) -> Path:
    """all_levels_run with each feature standardised alike instead of each level."""
    return _fit_session_run(tmp_path_factory, split_folder, "all-levels-feature", backbone="test_efficientnet",
                            all_levels=True, all_levels_mode="feature")


@pytest.fixture(scope="session")
def all_levels_ensemble_run(tmp_path_factory, split_folder: Path) -> Path:
    """all_levels_run as the mean of the best probes of several depths."""
    return _fit_session_run(tmp_path_factory, split_folder, "all-levels-ensemble", backbone="test_efficientnet",
                            all_levels=True, all_levels_mode="ensemble")
