"""Each rule fires on a Profile built for it (a real tiny profile, facts set by hand)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from autotransfer.plan import Plan
from autotransfer.profile import Profile, profile_dataset
from autotransfer.rules import THRESHOLDS, facts, rank_backbones, rank_plans, rank_plans_across_backbones

BASE = Plan("test_efficientnet", weights="random")


def tiny_profile(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, backbone: str) -> Profile:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOTRANSFER_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD", "1")
        return profile_dataset(image_folder, backbone, "random", image_size=64, progress=False)


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Profile:
    return tiny_profile(tmp_path_factory, image_folder, "test_efficientnet")


def shaped(profile: Profile, per_class: float, distance: float | None = 0.8, imbalance: float = 1.0,
           side: float = 200.0, best_level: int | None = None) -> Profile:
    size = replace(profile.size, imbalance_ratio=imbalance,
                   train_per_class=replace(profile.size.train_per_class, median=per_class))
    images = replace(profile.images, width=replace(profile.images.width, median=side),
                     height=replace(profile.images.height, median=side))
    summary = replace(profile.summary, distance=distance,
                      method="bn_gap_relative" if distance is not None else "none")
    depths = [replace(d, knn_accuracy=0.5) for d in profile.depths]
    if best_level is not None:
        depths = [replace(d, knn_accuracy=0.9) if d.feature_level == best_level else d for d in depths]
    return replace(profile, size=size, images=images, summary=summary, depths=depths)


def test_few_images_rank_frozen_extractors_first(profile: Profile) -> None:
    plans = rank_plans(shaped(profile, per_class=10), BASE)
    assert plans[0].strategy == "frozen"
    assert "10 images/class (<= 20: few)" in plans[0].reasons[0]
    assert {p.strategy for p in plans[:2]} == {"frozen"}
    assert any(p.feature_level is not None for p in plans if p.strategy == "frozen")  # a block below the top


def test_medium_near_data_fine_tunes_from_the_middle(profile: Profile) -> None:
    plans = rank_plans(shaped(profile, per_class=50, distance=0.9), BASE)
    groups = facts(shaped(profile, per_class=50)).groups
    assert plans[0].strategy == "partial" and plans[0].cut == groups // 2
    assert "near ImageNet" in plans[0].reasons[0]
    assert "frozen" in [p.strategy for p in plans]


def test_medium_far_data_retrains_more_blocks(profile: Profile) -> None:
    near = rank_plans(shaped(profile, per_class=50, distance=0.9), BASE)[0]
    far = rank_plans(shaped(profile, per_class=50, distance=THRESHOLDS.far_distance + 5), BASE)[0]
    assert far.strategy == "partial" and far.cut < near.cut
    assert "far from ImageNet" in far.reasons[0]


def test_many_images_fine_tune_everything(profile: Profile) -> None:
    plans = rank_plans(shaped(profile, per_class=1000), BASE)
    assert plans[0].strategy == "full"
    assert "many" in plans[0].reasons[0]


def test_imbalance_turns_on_class_weighting(profile: Profile) -> None:
    balanced = rank_plans(shaped(profile, per_class=50, imbalance=1.2), BASE)
    skewed = rank_plans(shaped(profile, per_class=50, imbalance=3.5), BASE)
    assert not any(p.class_weighting for p in balanced)
    assert all(p.class_weighting for p in skewed)
    assert any("imbalanced 3.5:1" in r for r in skewed[0].reasons)


def test_small_images_are_upsampled_less(profile: Profile) -> None:
    small = rank_plans(shaped(profile, per_class=50, side=32), BASE)
    assert all(p.image_size == THRESHOLDS.small_image_size for p in small)
    big = rank_plans(shaped(profile, per_class=50, side=300), BASE)
    assert all(p.image_size is None for p in big)
    fixed = rank_plans(shaped(profile, per_class=50, side=32), replace(BASE, image_size=64))
    assert all(p.image_size == 64 for p in fixed)  # the user's choice wins


def test_knn_peak_below_the_top_picks_that_feature_level(profile: Profile) -> None:
    level = next(d.feature_level for d in profile.depths if d.feature_level is not None)
    plans = rank_plans(shaped(profile, per_class=10, best_level=level), BASE)
    assert plans[0].strategy == "frozen" and plans[0].feature_level == level
    assert f"best at feature level {level}" in " ".join(plans[0].reasons)


def test_uncalibrated_distance_is_not_read_as_far(profile: Profile) -> None:
    plans = rank_plans(shaped(profile, per_class=50, distance=None), BASE)
    assert "distance to ImageNet unknown" in plans[0].reasons[0]


def test_plans_are_unique_and_valid(profile: Profile) -> None:
    for per_class in (5, 50, 5000):
        plans = rank_plans(shaped(profile, per_class=per_class), BASE)
        keys = [(p.strategy, p.cut, p.feature_level, p.all_levels, p.all_levels_mode, p.bn_mode, p.augment) for p in plans]
        assert len(keys) == len(set(keys))
        tuned = [p for p in plans if p.strategy != "frozen"]  # both fine-tuning families, at every size
        assert {(p.bn_mode, p.augment) for p in tuned} == {("frozen", "crop"), ("train", "strong")}, per_class
        assert all(p.reasons for p in plans)


def test_frozen_extractors_are_tried_at_every_level_near_the_best_knn(profile: Profile) -> None:
    shaped_profile = shaped(profile, per_class=50, best_level=1)
    f = facts(shaped_profile)
    plans = rank_plans(shaped_profile, BASE)
    frozen_levels = {p.feature_level for p in plans if p.strategy == "frozen"}
    unmeasured = set(range(f.levels)) - set(f.level_knn)
    far_below = {lvl for lvl, knn in f.level_knn.items() if knn < f.best_knn - THRESHOLDS.frozen_knn_margin}
    assert far_below, "the shaped profile must have levels far below the best k-NN"
    assert frozen_levels == {None, 1} | unmeasured  # the top, the best level, the unmeasured ones
    assert not frozen_levels & far_below
    why = next(p for p in plans if p.strategy == "frozen" and p.feature_level == 1).reasons
    assert any("k-NN" in r for r in why)


def test_a_level_exactly_one_margin_behind_the_best_knn_is_within_it(profile: Profile) -> None:
    import numpy as np

    shape = shaped(profile, per_class=10, best_level=1)
    best, behind = float(np.float32(0.95)), float(np.float32(0.90))  # 19 and 18 of 20 images, as profiled
    assert behind < best - THRESHOLDS.frozen_knn_margin  # what a plain comparison would leave out
    depths = [replace(d, knn_accuracy=best if d.feature_level == 1 else behind if d.feature_level == 2 else 0.5)
              for d in shape.depths]
    plans = rank_plans(replace(shape, depths=depths), BASE)
    assert {1, 2} <= {p.feature_level for p in plans if p.strategy == "frozen"}


# ---------------------------------------------------------------- backbones


@pytest.fixture(scope="module")
def resnet_profile(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Profile:
    return tiny_profile(tmp_path_factory, image_folder, "test_resnet")


def with_knn(profile: Profile, knn: float) -> Profile:
    return replace(shaped(profile, per_class=50), depths=[replace(d, knn_accuracy=knn) for d in profile.depths])


def test_the_cheapest_backbone_leads_unless_another_is_clearly_better(profile: Profile, resnet_profile: Profile) -> None:
    costs = {"test_efficientnet": 2.0, "test_resnet": 1.0}
    margin = THRESHOLDS.backbone_knn_margin
    close = rank_backbones([with_knn(profile, 0.80 + margin / 2), with_knn(resnet_profile, 0.80)], costs)
    assert [p.backbone for p, _ in close] == ["test_resnet", "test_efficientnet"]
    assert "test_resnet (best k-NN 0.800, 1.0x the cheapest's cost) leads: the cheapest" in close[0][1]
    assert "2.0x the cheapest's cost" in close[1][1]
    clear = rank_backbones([with_knn(profile, 0.80 + 2 * margin), with_knn(resnet_profile, 0.80)], costs)
    assert [p.backbone for p, _ in clear] == ["test_efficientnet", "test_resnet"]
    assert f"beats test_resnet's by more than {margin:g}" in clear[0][1]


def test_plans_across_backbones_lead_with_one_and_try_the_others(profile: Profile, resnet_profile: Profile) -> None:
    profiles = [with_knn(profile, 0.9), with_knn(resnet_profile, 0.5)]
    plans = rank_plans_across_backbones(profiles, {"test_efficientnet": 1.0, "test_resnet": 1.5}, BASE)
    own = rank_plans(profiles[0], BASE)
    assert [(p.backbone, p.strategy, p.cut, p.feature_level) for p in plans[: len(own)]] == [
        (p.backbone, p.strategy, p.cut, p.feature_level) for p in own]
    assert any("test_efficientnet (best k-NN 0.900, 1.0x the cheapest's cost) leads: the cheapest" in r for r in plans[0].reasons)
    others = plans[len(own):]
    other_rank = rank_plans(profiles[1], BASE)
    assert [p.backbone for p in others] == ["test_resnet", "test_resnet"]
    assert (others[0].strategy, others[0].cut) == (other_rank[0].strategy, other_rank[0].cut)  # its rules' first Plan
    assert others[1].strategy == "frozen"  # and its best frozen extractor: one more pass over the data
    assert all(any(r.startswith("other backbone test_resnet") for r in p.reasons) for p in others)
    assert rank_plans_across_backbones(profiles[:1], {}, BASE) == own  # one backbone: its own ranking


def test_every_level_at_once_is_tried_second_to_fourth_in_each_mode(profile: Profile) -> None:
    for per_class in (5, 50, 5000):
        plans = rank_plans(shaped(profile, per_class=per_class), BASE)
        assert [p.all_levels for p in plans].index(True) == 1
        assert [(p.all_levels, p.all_levels_mode) for p in plans[1:4]] == [(True, "level"), (True, "feature"), (True, "ensemble")]
        assert sum(p.all_levels for p in plans) == 3
        assert plans[1].strategy == "frozen" and "every feature level at once" in " ".join(plans[1].reasons)
        assert plans[2].strategy == "frozen" and "each feature standardised alike" in " ".join(plans[2].reasons)
        assert plans[3].strategy == "frozen" and "the mean of the 3 best frozen probes" in " ".join(plans[3].reasons)


def test_far_data_averages_single_level_probes_only_where_a_level_competes(profile: Profile) -> None:
    far = THRESHOLDS.far_distance + 5
    level = next(d.feature_level for d in profile.depths if d.feature_level is not None)
    for distance, best_level, levels_only in ((0.9, level, False), (far, level, True), (None, level, False), (far, None, False)):
        shape = shaped(profile, per_class=10, distance=distance, best_level=best_level)
        if best_level is None:  # the top well ahead of every level
            shape = replace(shape, depths=[*shape.depths[:-1], replace(shape.depths[-1], knn_accuracy=0.9)])
        plans = rank_plans(shape, BASE)
        assert {p.ensemble_levels_only for p in plans} == {levels_only}  # every Plan: the search builds trials on plans[0]
        ensemble = next(p for p in plans if p.all_levels_mode == "ensemble")
        assert ("the mean of the 3 best single-level probes" in " ".join(ensemble.reasons)) == levels_only
