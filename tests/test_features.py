from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autotransfer.backbones import get_backbone
from autotransfer.data import scan_folder
from autotransfer.errors import UsageError
from autotransfer.features import (
    MAX_WORKERS,
    WORKERS_ENV,
    FeatureWriter,
    cache_dir,
    cache_feature_levels,
    cached_features,
    eval_transform,
    extract_features,
    feature_key,
    loader_workers,
    train_transform,
    weights_id,
)
from autotransfer.plan import AUGMENTS
from autotransfer.plan import Plan
from autotransfer.strategies import ALL_LEVELS, Preprocessing, build_net
from conftest import CLASSES, photo


def setup(arch: str, image_folder: Path, **fields):
    spec = get_backbone(arch)
    plan = Plan(arch, weights="random", image_size=32, **fields)
    net = build_net(spec, plan, num_classes=len(CLASSES))
    return net, scan_folder(image_folder), Preprocessing.for_plan(spec, plan)


def test_cached_features_are_reused_on_the_second_call(image_folder, isolated_env):
    net, scan, prep = setup("test_efficientnet", image_folder)
    first = cached_features(net, scan, "train", prep, "test_efficientnet", "random:seed=0", None, progress=False)
    feats, labels, reused = first
    assert reused is False
    assert feats.shape == (len(scan.splits["train"]), 256)
    assert labels.tolist() == [r.label for r in scan.splits["train"]]

    files = list(cache_dir().glob("*.npy"))
    assert len(files) == 1 and cache_dir().is_relative_to(isolated_env)  # not ~/.cache

    torch.nn.init.zeros_(net.model.conv_stem.weight)  # a recomputation would differ
    feats2, labels2, reused2 = cached_features(
        net, scan, "train", prep, "test_efficientnet", "random:seed=0", None, progress=False
    )
    assert reused2 is True
    assert torch.equal(feats2, feats) and torch.equal(labels2, labels)
    assert list(cache_dir().glob("*")) == files  # no temporary files left behind


def test_cached_features_equal_a_direct_extraction(image_folder):
    net, scan, prep = setup("test_resnet", image_folder)
    cached, _, _ = cached_features(net, scan, "val", prep, "test_resnet", "w", None, progress=False)
    direct, labels = extract_features(net, scan.splits["val"], prep, batch_size=2, progress=False)
    torch.testing.assert_close(cached, direct)
    assert labels.tolist() == [r.label for r in scan.splits["val"]]


def test_extract_features_restores_train_mode_and_runs_in_eval(image_folder):
    net, scan, prep = setup("test_efficientnet", image_folder, strategy="full", bn_mode="train")
    net.train()
    a, _ = extract_features(net, scan.splits["val"], prep, batch_size=4, progress=False)
    assert net.training and net.model.bn1.training
    b, _ = extract_features(net, scan.splits["val"], prep, batch_size=1, progress=False)
    torch.testing.assert_close(a, b)  # batch-independent: BN used running statistics


def _key(prep: Preprocessing, **changes) -> str:
    args = {"architecture": "test_resnet", "weights_id": "random:seed=0", "feature_level": None,
            "prep": prep, "data_hash": "abc"}
    return feature_key(**{**args, **changes})


def test_feature_key_holds_everything_features_depend_on():
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    base = _key(prep)
    assert _key(prep) == base
    variants = [
        _key(prep, feature_level=2),
        _key(prep, feature_level=0),
        _key(replace(prep, input_size=48)),
        _key(replace(prep, mean=(0.4, 0.5, 0.5))),
        _key(replace(prep, crop_pct=1.0)),
        _key(prep, architecture="test_vit"),
        _key(prep, weights_id="random:seed=1"),
        _key(prep, data_hash="abd"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_changed_feature_level_or_image_size_computes_new_features(image_folder):
    net, scan, prep = setup("test_resnet", image_folder)
    top, _, reused = cached_features(net, scan, "val", prep, "test_resnet", "w", None, progress=False)
    assert not reused

    truncated, _, _ = setup("test_resnet", image_folder, feature_level=2)
    level2, _, reused = cached_features(truncated, scan, "val", prep, "test_resnet", "w", 2, progress=False)
    assert not reused
    assert (top.shape[1], level2.shape[1]) == (96, 48)  # test_resnet: top and level 2 widths

    bigger = replace(prep, input_size=48)
    _, _, reused = cached_features(net, scan, "val", bigger, "test_resnet", "w", None, progress=False)
    assert not reused
    assert len(list(cache_dir().glob("*.npy"))) == 3
    for level, p in [(None, prep), (2, prep), (None, bigger)]:  # all three now cached
        n = truncated if level == 2 else net
        assert cached_features(n, scan, "val", p, "test_resnet", "w", level, progress=False)[2]


def test_changed_data_computes_new_features(image_folder, tmp_path):
    net, scan, prep = setup("test_resnet", image_folder)
    cached_features(net, scan, "train", prep, "test_resnet", "w", None, progress=False)
    data = shutil.copytree(image_folder, tmp_path / "copy")
    assert cached_features(net, scan_folder(data), "train", prep, "test_resnet", "w", None, progress=False)[2]
    photo((0, 0, 0), seed=1).save(data / "red" / "00.jpg")
    photo((0, 0, 0), seed=2).save(data / "red" / "01.jpg")  # one of the two is in train
    assert not cached_features(net, scan_folder(data), "train", prep, "test_resnet", "w", None, progress=False)[2]


def test_transforms_give_the_planned_size():
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    image = Image.new("RGB", (60, 45), (10, 20, 30))
    assert eval_transform(prep)(image).shape == (3, 32, 32)
    for augment in AUGMENTS:
        views = [train_transform(prep, augment)(photo((200, 30, 30), seed=0)) for _ in range(2)]
        assert views[0].shape == (3, 32, 32)
        assert not torch.equal(views[0], views[1])  # random: two views of one image differ


def test_tiny_sets_load_in_process(monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert loader_workers(24) == 0
    assert 2 <= loader_workers(100_000) <= MAX_WORKERS


def test_worker_count_can_be_set_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert loader_workers(24) == 3 and loader_workers(100_000) == 3
    monkeypatch.setenv(WORKERS_ENV, "0")
    assert loader_workers(100_000) == 0
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(UsageError, match="AUTOTRANSFER_WORKERS.*'many'"):
        loader_workers(100_000)


def test_features_are_written_in_batches_and_read_back_memory_mapped(image_folder):
    net, scan, prep = setup("test_resnet", image_folder)
    feats, labels, reused = cached_features(net, scan, "train", prep, "test_resnet", "w", None, batch_size=2, progress=False)
    assert not reused
    direct, direct_labels = extract_features(net, scan.splits["train"], prep, progress=False)
    torch.testing.assert_close(feats, direct)
    assert torch.equal(labels, direct_labels)
    (path,) = cache_dir().glob("*.npy")
    assert isinstance(np.load(path, mmap_mode="r"), np.memmap)
    saved = torch.from_numpy(np.load(path))
    feats[:] = 0  # copy-on-write: the caller's copy changes, the file does not
    again, _, reused = cached_features(net, scan, "train", prep, "test_resnet", "w", None, progress=False)
    assert reused and torch.equal(again, saved)  # not `direct`: batches of 2 and of 32 may round apart


def test_damaged_or_half_written_cache_files_are_recomputed(image_folder):
    net, scan, prep = setup("test_resnet", image_folder)
    feats = cached_features(net, scan, "val", prep, "test_resnet", "w", None, progress=False)[0].clone()
    (path,) = cache_dir().glob("*.npy")
    path.write_bytes(path.read_bytes()[:-40])  # truncated (in place: the clone above keeps the old rows)
    again, _, reused = cached_features(net, scan, "val", prep, "test_resnet", "w", None, progress=False)
    assert not reused and torch.equal(again, feats)

    with pytest.raises(RuntimeError, match="2 rows written, 5 expected"):
        with FeatureWriter(cache_dir() / "short.npy", rows=5) as writer:
            writer.add(torch.ones(2, 3))
    with pytest.raises(KeyboardInterrupt):
        with FeatureWriter(cache_dir() / "stopped.npy", rows=5) as writer:
            writer.add(torch.ones(2, 3))
            raise KeyboardInterrupt
    assert sorted(p.name for p in cache_dir().iterdir()) == [path.name]  # nothing half-written left


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet", "test_vit"])
def test_one_pass_caches_every_level_as_the_truncated_network_computes_it(arch, image_folder):
    spec = get_backbone(arch)
    plan = Plan(arch, weights="random", image_size=32)
    scan = scan_folder(image_folder)
    levels = [None, *range(len(build_net(spec, plan, 2).model.feature_info))]
    cached = cache_feature_levels(spec, plan, scan, levels, progress=False)
    if arch != "test_vit":  # CNNs: average pooling of every level's map is what truncation does
        assert sorted(cached, key=str) == sorted(levels, key=str)
    files = list(cache_dir().glob("*.npy"))
    assert len(files) == len(cached) * len(scan.splits)
    prep = Preprocessing.for_plan(spec, plan)
    for level in levels:
        net = build_net(spec, replace(plan, feature_level=level), len(CLASSES))
        feats, labels, reused = cached_features(net, scan, "val", prep, arch, weights_id(spec, "random", 0), level, progress=False)
        assert reused == (level in cached)
        direct, direct_labels = extract_features(net, scan.splits["val"], prep, progress=False)
        torch.testing.assert_close(feats, direct, rtol=1e-3, atol=1e-4)
        assert torch.equal(labels, direct_labels)
    assert cache_feature_levels(spec, plan, scan, cached, progress=False) == []  # all on disk: no pass


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_one_pass_caches_the_all_levels_features_too(arch, image_folder):
    spec = get_backbone(arch)
    plan = Plan(arch, weights="random", image_size=32, all_levels=True)
    scan = scan_folder(image_folder)
    cached = cache_feature_levels(spec, plan, scan, [None], progress=False, all_levels=True)
    assert ALL_LEVELS in cached
    net = build_net(spec, plan, len(CLASSES))
    prep = Preprocessing.for_plan(spec, plan)
    feats, labels, reused = cached_features(net, scan, "train", prep, arch, weights_id(spec, "random", 0), ALL_LEVELS, progress=False)
    assert reused
    direct, direct_labels = extract_features(net, scan.splits["train"], prep, progress=False)
    torch.testing.assert_close(feats, direct, rtol=1e-3, atol=1e-4)
    assert torch.equal(labels, direct_labels) and feats.shape[1] == sum(net.dims)
