"""The profiler on tiny random-init timm models and generated images; real data in `slow`."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from autotransfer.backbones import create_model, get_backbone
from autotransfer.cli import main
from autotransfer.data import scan_folder
from autotransfer.errors import DataError
from autotransfer.features import cached_features, eval_transform, extract_features
from autotransfer.plan import Plan
from autotransfer.rules import THRESHOLDS, input_size
from autotransfer.profile import (
    SCHEMA,
    Profile,
    _is_bn,
    format_profile,
    load_profile,
    profile_dataset,
    quality,
    quality_warnings,
    save_profiles,
    stratified_sample,
)
from autotransfer.features import weights_id
from autotransfer.strategies import Preprocessing, build_net, coarse_groups

DATASETS = Path(os.environ.get("AUTOTRANSFER_DATASETS", Path(__file__).parents[2] / "shared" / "datasets"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """One AUTOTRANSFER_CACHE per module, so the calibration is computed once per model."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOTRANSFER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with two colour-coded classes, a train/val duplicate and two bad files."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for label, channel in (("red", 0), ("blue", 2)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, size=(32, 40, 3), dtype=np.uint8)
                pixels[..., channel] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")
    shutil.copy(root / "train" / "red" / "0.png", root / "val" / "red" / "copy.png")  # leakage
    (root / "train" / "blue" / "notes.txt").write_text("not an image")
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    return root


def _profile(data: Path, backbone: str = "test_efficientnet", **options) -> Profile:
    options = {"weights": "random", "image_size": 64, "progress": False, **options}
    if backbone == "test_vit":
        options["image_size"] = None  # fixed 160 px input
    return profile_dataset(data, backbone, **options)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet", "test_vit"])
def test_profile_every_depth(cache, data: Path, backbone: str) -> None:
    profile = _profile(data, backbone)
    model = create_model(get_backbone(backbone), "random")
    assert [d.group for d in profile.depths] == list(range(len(coarse_groups(model))))
    has_bn = any(_is_bn(m) for m in model.modules())
    for depth in profile.depths:
        assert depth.channels > 0
        assert (depth.bn_gap is not None) == (has_bn and depth.bn_layers > 0)
        assert depth.frechet is not None and depth.frechet >= 0  # works with or without BN
        assert 0 <= depth.knn_accuracy <= 1
    assert profile.summary.method == ("bn_gap_relative" if has_bn else "frechet")
    assert profile.head is not None and 0 <= profile.head.entropy <= 1
    assert profile.baselines.knn_accuracy == pytest.approx(13 / 25)  # 13 red (with the copy) of 25
    assert profile.baselines.knn_balanced_accuracy == 0.5
    text = format_profile(profile)
    assert "baseline (trivial)" in text and "LogME" in text


def test_profile_size_images_and_quality(cache, data: Path) -> None:
    profile = _profile(data)
    assert profile.size.images == {"train": 16, "val": 9}
    assert profile.size.per_class["val"] == {"blue": 4, "red": 5}
    assert profile.images.width.median == 40 and profile.images.height.max == 32
    assert profile.images.formats == {"PNG": 25}
    assert profile.images.grayscale_fraction == 0
    assert profile.images.channel_mean[0] > profile.images.channel_mean[1]
    skipped = {Path(s.path).name for s in profile.quality.skipped}
    assert skipped == {"notes.txt", "broken.jpg"}
    [group] = profile.quality.duplicates
    assert group.leak and not group.label_conflict
    assert [Path(p).relative_to(data).as_posix() for p in group.paths] == ["train/red/0.png", "val/red/copy.png"]
    assert group.splits == ["train", "val"]
    assert profile.quality.leaked_files == 2
    text = format_profile(profile)
    assert "LEAK" in text and "copy.png" in text and "notes.txt" in text
    assert any("leakage" in note for note in profile.summary.notes)


def test_quality_warnings_name_leaks_and_label_conflicts(data: Path, tmp_path: Path) -> None:
    """What `fit` prints from the scan alone, as `profile` notes it."""
    assert quality_warnings(quality(scan_folder(data))) == [
        "warning: 2 files are identical across splits (leakage); keep one copy:",
        f"  {data / 'train/red/0.png'} [train] = {data / 'val/red/copy.png'} [val]",
    ]
    conflicted = shutil.copytree(data, tmp_path / "data")
    shutil.copy(conflicted / "train" / "red" / "1.png", conflicted / "train" / "blue" / "red-1.png")
    lines = quality_warnings(quality(scan_folder(conflicted)), max_listed=0)
    assert lines[-2:] == ["warning: identical files carry different labels (1 group(s)); keep the right one:",
                          "  ... and 1 more group(s)"]


def test_schema_round_trip(cache, data: Path, tmp_path: Path) -> None:
    profile = _profile(data)
    assert profile.schema == SCHEMA
    assert Profile.from_json(profile.to_json()) == profile
    profile.save(tmp_path / "profile.json")
    assert Profile.load(tmp_path / "profile.json") == profile
    with pytest.raises(DataError, match="schema"):
        Profile.from_json('{"schema": "autotransfer.profile/0"}')
    with pytest.raises(DataError, match="not found"):
        Profile.load(tmp_path / "missing.json")


def test_a_run_keeps_the_profile_of_every_candidate_backbone(cache, data: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    leader = _profile(data)
    other = replace(leader, backbone="test_resnet")
    single, several = tmp_path / "single", tmp_path / "several"
    single.mkdir(), several.mkdir()
    save_profiles([leader], single)
    assert not (single / "profiles").exists()
    assert load_profile(single, leader.backbone) == leader == load_profile(single, None)
    assert load_profile(single, "test_resnet") is None  # a report never shows another backbone's depths
    save_profiles([leader, other], several)
    assert Profile.load(several / "profile.json") == leader
    assert load_profile(several, "test_resnet") == other and load_profile(several, leader.backbone) == leader


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_bn_gap_is_zero_when_data_makes_the_running_stats(cache, data: Path, tmp_path: Path, backbone: str) -> None:
    """Recompute every BN's running statistics on exactly the profiled images, then profile."""
    spec = get_backbone(backbone)
    torch.manual_seed(0)
    model = create_model(spec, "random", num_classes=1000)
    scan = scan_folder(data)
    prep = Preprocessing.for_plan(spec, Plan(backbone, image_size=64))
    transform = eval_transform(prep)
    batch = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in scan.splits["train"] + scan.splits["val"]])
    bns = [m for m in model.modules() if _is_bn(m)]
    positions = {}
    for module in bns:
        module.reset_running_stats()
        module.momentum = None  # cumulative average: one batch gives exactly its statistics
        module.register_forward_pre_hook(lambda m, x: positions.__setitem__(m, x[0].numel() // x[0].shape[1]))
    model.train()
    with torch.no_grad():
        model(batch)  # a single batch: train-mode normalisation equals eval-mode normalisation
    for module in bns:  # ... once the stored variance is un-Bessel-corrected, as train mode used it
        module.running_var.mul_((positions[module] - 1) / positions[module])
        module._forward_pre_hooks.clear()
    torch.save(model.state_dict(), tmp_path / "weights.pth")

    profile = _profile(data, backbone, weights=str(tmp_path / "weights.pth"))
    gaps = [d.bn_gap for d in profile.depths if d.bn_gap is not None]
    assert gaps and max(gaps) < 1e-6, gaps
    # the same weights with their own random-init statistics are measurably off
    other = _profile(data, backbone, weights="random")
    assert max(d.bn_gap for d in other.depths if d.bn_gap is not None) > 100 * max(gaps)


def test_profile_fills_the_feature_cache_fit_reads(cache, data: Path, tmp_path: Path) -> None:
    spec = get_backbone("test_efficientnet")
    torch.manual_seed(0)
    torch.save(create_model(spec, "random").state_dict(), tmp_path / "w.pth")
    plan = Plan("test_efficientnet", weights=str(tmp_path / "w.pth"), image_size=64)

    _profile(data, weights=plan.weights)
    scan = scan_folder(data)
    net = build_net(spec, plan, len(scan.classes))
    prep = Preprocessing.for_plan(spec, plan)
    feats, labels, reused = cached_features(net, scan, "train", prep, spec.architecture, weights_id(spec, plan.weights, plan.seed), None, progress=False)
    assert reused
    fresh, fresh_labels = extract_features(net, scan.splits["train"], prep, progress=False)
    assert torch.equal(labels, fresh_labels)
    assert torch.allclose(feats, fresh, atol=1e-4)


def test_stratified_sample(cache, data: Path) -> None:
    records = scan_folder(data).splits["train"]
    sample = stratified_sample(records, 6, seed=0)
    assert len(sample) == 6
    assert sorted(r.label for r in sample) == [0, 0, 0, 1, 1, 1]
    assert sample == [r for r in records if r in sample]  # order kept
    assert stratified_sample(records, 100, 0) == records
    profile = _profile(data, max_images=10)
    assert profile.sample.images == 10 and profile.sample.stratified and profile.sample.available == 25
    assert any("sampled 10 of 25" in note for note in profile.summary.notes)


def test_calibration_folder(cache, data: Path) -> None:
    """Your own near-ImageNet photos set the reference level instead of the bundled ones."""
    profile = _profile(data, calibration=data / "train")
    assert profile.calibration.source.startswith("folder:") and profile.calibration.images == 16
    for depth, reference in zip(profile.depths, profile.calibration.bn_gap):
        assert depth.bn_gap_relative == pytest.approx(depth.bn_gap / reference)


def test_damaged_calibration_cache_is_recomputed(data: Path, isolated_env: Path) -> None:
    """A cache is not user data: a damaged file is computed again, not an error."""
    first = _profile(data, calibration=data / "train")
    cached = list((isolated_env / "calibration").glob("*.pt"))
    assert len(cached) == 1
    cached[0].write_bytes(b"half a file")
    again = _profile(data, calibration=data / "train")
    assert again.calibration.bn_gap == first.calibration.bn_gap
    assert torch.load(cached[0], weights_only=True)["images"] == 16  # written again, whole


def test_cli_profile(cache, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, [
        "profile", str(data), "--backbone", "test_resnet", "--weights", "random",
        "--image-size", "64", "--out", str(out), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert Profile.load(out).backbone == "test_resnet" and Profile.load(out).image_size == 64
    assert "LEAK" in result.output and "relative BN gap" in result.output


def test_profile_measures_small_images_at_the_size_fit_trains_them_at(cache, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["profile", str(data), "--backbone", "test_resnet", "--weights", "random",
                                       "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert scan_folder(data).median_side() == 32 < THRESHOLDS.small_image_side  # 32 x 40 px images
    assert Profile.load(out).image_size == THRESHOLDS.small_image_size == input_size(32)
    assert input_size(THRESHOLDS.small_image_side) is None  # photos: the backbone's own size


@pytest.mark.parametrize("args", [
    ["/no/such/folder"],
    ["{data}", "--backbone", "no_such_net"],
    ["{data}", "--backbone", "test_resnet", "--weights", "random", "--calibration", "/no/such/photos"],
])
def test_cli_profile_bad_input(cache, data: Path, tmp_path: Path, args: list[str]) -> None:
    args = [a.format(data=data) for a in args]
    result = CliRunner().invoke(main, ["profile", *args, "--out", str(tmp_path / "p.json"), "--no-progress"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("Error: ")


@pytest.mark.slow
def test_real_data_near_vs_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hymenoptera and flowers are nearer to ImageNet than pneumoniamnist, overall and at most depths."""
    names = ["hymenoptera", "flowers", "pneumoniamnist"]
    if not all((DATASETS / n).is_dir() for n in names):
        pytest.skip(f"{DATASETS} lacks {names}; set AUTOTRANSFER_DATASETS")
    monkeypatch.setenv("AUTOTRANSFER_CACHE", str(tmp_path / "cache"))
    profiles = {
        n: profile_dataset(DATASETS / n, "efficientnet_lite0", max_images=200, progress=False) for n in names
    }
    far = profiles["pneumoniamnist"]
    for near in (profiles["hymenoptera"], profiles["flowers"]):
        assert near.summary.distance < far.summary.distance
        nearer = [a.bn_gap < b.bn_gap for a, b in zip(near.depths, far.depths)]
        assert sum(nearer) > len(nearer) / 2, nearer
        assert near.head.entropy < far.head.entropy
    assert far.images.grayscale_fraction == 1.0
    skipped = [Path(s.path).name for s in profiles["hymenoptera"].quality.skipped]
    assert "imageNotFound.gif" in skipped
