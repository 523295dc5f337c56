"""Rule engine: a Profile in, a ranked list of Plans out, each with its reasons in words.

The cs231n quadrants (size x distance to ImageNet) are the skeleton; what we measured
fills in the numbers (README, "How it decides"). Every threshold lives in `THRESHOLDS`,
with the evidence that set it. Rules only propose: the search tries their Plans first
and keeps whatever wins on validation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autotransfer.plan import Plan
from autotransfer.profile import Profile
from autotransfer.strategies import all_levels_supported, depth_of


@dataclass(frozen=True)
class Thresholds:
    # Images per class in train. Measured (RESEARCH.md, tf_efficientnet_lite0, 6 epochs):
    # with ~10/class every fine-tuning variant lost to a frozen extractor, often by 10-50
    # points; with ~50/class fine-tuning from the middle won by 2-6 points. The switch lies
    # between, so "few" ends at 20 and "many" (full fine-tuning first) starts at 500.
    few_per_class: float = 20
    many_per_class: float = 500
    # Summary distance (profile.summary.distance, relative BN gap: 1.0 = the calibration
    # photos), measured at the input size trials train at. Near sets (hymenoptera, flowers:
    # 0.76-1.04 at 128 or 224 px) below it, pneumoniamnist far above (5.6-5.9 at 128 px),
    # cifar10 on it (2.0-2.1 at 128 px; its k-NN gate keeps the far ensemble rule off it).
    far_distance: float = 2.0
    # Largest/smallest class at or above this: weight the loss by inverse frequency.
    imbalance_ratio: float = 3.0
    # Images whose median side is below this are upsampled to `small_image_size` instead
    # of the backbone's size: 4x fewer pixels than 224 for CIFAR-sized inputs, measured
    # here as the resolution where fine-tuning fits a CPU budget (RESEARCH.md, 128 px).
    small_image_side: int = 96
    small_image_size: int = 128
    # Frozen extractors are also tried at every feature level whose k-NN accuracy is within
    # this of the best depth's, and at levels the profile does not measure: they share one
    # forward pass, so each costs only a linear head. In the quick bench (64 px) the best
    # frozen depth was a level below the top in 4 of 12 cells, up to 14 points better than
    # the rules' single pick, and always within 0.05 of the best k-NN depth.
    frozen_knn_margin: float = 0.05
    # Backbones: a costlier backbone leads only when its best k-NN accuracy (any depth)
    # beats every cheaper candidate's by more than this. One standard error of a k-NN
    # accuracy near 0.9 on the profile's 400 images is 0.015; within it the cheaper
    # backbone leaves the budget more trials (Kornblith et al. 2019: ImageNet accuracy
    # predicts transfer, but the EfficientNet-Lite0/1/2 steps are 1-2 points apart).
    backbone_knn_margin: float = 0.02


THRESHOLDS = Thresholds()

# Why a frozen extractor on every level at once is always tried, second (it costs one
# linear head on the shared pass). Measured offline on the 36 quick-bench cells (3 seeds,
# 64 px): adding it to the frozen depths and picking on val gained 2.2 held-out points on
# average over the best single depth picked on val, better in 17 more cells than worse.
ALL_LEVELS_REASON = ("every feature level at once (Head2Toe): early levels keep what the top "
                     "specialises away; it costs one linear head on the shared pass")

# Why the every-level head is also tried with each feature standardised alike (third,
# same cost). Measured (benchmarks/results/level_scaling.md, 50/class, same features and
# probe): per-feature scaling beat the per-level one by 0.4-3.1 held-out points on the
# photo sets and lost by 1.4-2.2 on pneumoniamnist; CV picked the better in 4 of 6 cells.
FEATURE_SCALING_REASON = ("every feature level, each feature standardised alike (the wide top levels weigh most, "
                          "the plain linear-probe protocol): it beat levels weighed alike on photo sets and lost on a far one")

# Why the mean of the best frozen probes is tried too (fourth; it refits the frozen probes
# on the shared features, seconds). Measured offline (benchmarks/results/frozen_selection.md,
# 4 datasets x 10 and 50/class x 10 seeds): averaging the 3 best depths by CV beat the best
# single depth by CV on held-out images.
ENSEMBLE_REASON = ("the mean of the 3 best frozen probes by cross-validation (each level, the top, every level "
                   "at once): one probe picked on few images is often picked by noise; the mean of three is steadier")

# Far from ImageNet the ensemble's members are single levels only (Plan.ensemble_levels_only):
# the top layers transfer worst to a distant task (Yosinski et al. 2014), and the every-level
# heads are dominated by the top's 1,280 features. Measured offline on the two sets the
# profile puts at or above far_distance (benchmarks/results/frozen_selection_far.md, 10 seeds,
# paired with the full candidate set): pneumoniamnist 10/class +3.8 ± 1.7 held-out points,
# 50/class +0.3 ± 0.7; cifar10 (2.0-2.1, at the threshold) 10/class -0.3 ± 0.3, 50/class -0.7 ± 0.3,
# and -8.9 in one bench seed where the guard let the mean of levels 4, 3 and 2 through (0.507
# vs 0.596). So only where the profile also sees a level below the top within
# frozen_knn_margin of the best depth's k-NN: pneumoniamnist's levels 1-3 matched its best
# (0.90-1.00) in every bench seed, cifar10's best level trailed its top by 0.07-0.19.
ENSEMBLE_FAR_REASON = ("far from ImageNet: the mean of the 3 best single-level probes by cross-validation; the top "
                       "and the every-level heads, dominated by the top's ImageNet-specific features, are left out of it")

# The second fine-tuning family (issue 15): fastai's fine_tune recipe, measured there on
# unseen sets with the same backbone: at 10 images/class it beat every frozen probe by 4
# points on a satellite set and matched the best on silhouettes, and it collapsed on two
# tiny grayscale sets (-15 and -9): the val comparison with the best probe decides.
FASTAI_REASON = ("fastai's recipe: everything fine-tuned with BatchNorm adapting, strong augmentation, "
                 "backbone at 0.1x the head's lr, one-cycle; it wins on some small sets where LP-FT does not")


@dataclass(frozen=True)
class Facts:
    """What the rules read off a Profile, in the units the reasons are written in."""

    per_class: float
    distance: float | None
    distance_method: str
    imbalance: float
    median_side: float
    levels: int  # timm feature levels of the backbone
    best_level: int | None  # feature level with the best k-NN accuracy (None = top)
    best_level_knn: float
    top_knn: float
    best_knn: float  # best k-NN accuracy at any depth, feature level or not
    level_knn: dict[int, float]  # k-NN accuracy at the feature levels the profile measured
    groups: int


def facts(profile: Profile) -> Facts:
    depths = profile.depths
    levels = [d for d in depths if d.feature_level is not None]
    top = depths[-1]
    best = max(levels, key=lambda d: (d.knn_accuracy, d.logme), default=top)
    groups, n_levels = depth_of(profile.backbone, None)
    # Only the calibrated distance is in the units of the thresholds; a raw gap is not.
    calibrated = profile.summary.method == "bn_gap_relative"
    # The top group's output is the whole backbone (feature level None), unless only a
    # level below it beats it on k-NN by a clear margin.
    best_level = best.feature_level if best.knn_accuracy > top.knn_accuracy + 0.01 else None
    return Facts(
        per_class=profile.size.train_per_class.median,
        distance=profile.summary.distance if calibrated else None,
        distance_method=profile.summary.method,
        imbalance=profile.size.imbalance_ratio,
        median_side=min(profile.images.width.median, profile.images.height.median),
        levels=n_levels,
        best_level=best_level,
        best_level_knn=best.knn_accuracy,
        top_knn=top.knn_accuracy,
        best_knn=max(d.knn_accuracy for d in depths),
        level_knn={d.feature_level: d.knn_accuracy for d in levels},
        groups=groups,
    )


def rank_plans(profile: Profile, base: Plan, t: Thresholds = THRESHOLDS) -> list[Plan]:
    """Ranked Plans for this data, best guess first, each carrying its reasons."""
    f = facts(profile)
    common: list[str] = []
    base = replace(base, backbone=profile.backbone, weights=profile.weights, all_levels=False)
    if f.imbalance >= t.imbalance_ratio:
        base = replace(base, class_weighting=True)
        common.append(f"classes imbalanced {f.imbalance:.1f}:1 (>= {t.imbalance_ratio:g}) -> loss weighted by inverse class frequency")
    upsampled = input_size(f.median_side, t)
    if base.image_size is None and upsampled is not None:
        base = replace(base, image_size=upsampled)
        common.append(f"small images (median side {f.median_side:.0f} px < {t.small_image_side}) -> upsampled to {upsampled} px, not the backbone's size")

    far = f.distance is not None and f.distance >= t.far_distance
    # far, and a level below the top as good as the best depth on k-NN: the ensemble averages
    # single levels only (on base: the search builds every trial's Plan from it)
    levels_compete = bool(f.level_knn) and _near_best(f.best_level_knn, f, t)
    base = replace(base, ensemble_levels_only=far and levels_compete)
    where = (
        f"{'far from' if far else 'near'} ImageNet ({f.distance_method} {f.distance:.2f}, far from {t.far_distance:g})"
        if f.distance is not None else "distance to ImageNet unknown"
    )
    size = f"{f.per_class:.0f} images/class"
    depth_reason = (
        f"k-NN on features is best at feature level {f.best_level} ({f.best_level_knn:.3f} vs {f.top_knn:.3f} at the top)"
        if f.best_level is not None else f"k-NN on features is best at the top ({f.top_knn:.3f})"
    )
    frozen_best = _plan(base, "frozen", None, f.best_level, [*common, depth_reason])
    frozen_top = _plan(base, "frozen", None, None, [*common, "the classic frozen extractor at the top"])
    frozen_below = _plan(base, "frozen", None, max(0, f.levels - 2), [*common, "one feature level below the top: with few images the best frozen cut was 1-2 blocks below the top on every set we measured"])
    frozen_all = replace(base, strategy="frozen", cut=None, feature_level=None, all_levels=True, reasons=[*common, ALL_LEVELS_REASON])
    frozen_all_features = replace(frozen_all, all_levels_mode="feature", reasons=[*common, FEATURE_SCALING_REASON])
    ensemble_reason = (
        f"{ENSEMBLE_FAR_REASON} (k-NN at a level below the top {f.best_level_knn:.3f}, within {t.frozen_knn_margin:g} "
        f"of the best depth's {f.best_knn:.3f})" if base.ensemble_levels_only else ENSEMBLE_REASON
    )
    frozen_ensemble = replace(frozen_all, all_levels_mode="ensemble", reasons=[*common, ensemble_reason])
    half = max(1, f.groups // 2)
    partial_mid = _plan(base, "partial", half, None, [*common, f"fine-tune the top {f.groups - half} of {f.groups} groups (from the middle)"])
    partial_far = _plan(base, "partial", max(1, half - 1), None, [*common, "far from ImageNet: more blocks retrained than near it"])
    full = _plan(base, "full", None, None, list(common))
    fastai_full = replace(
        _plan(base, "full", None, None, [*common, FASTAI_REASON]), bn_mode="train", augment="strong", backbone_lr_ratio=0.1,
    )

    if f.per_class <= t.few_per_class:
        lead = f"{size} (<= {t.few_per_class:g}: few) and {where} -> frozen extractor"
        ranked = [frozen_best, frozen_below, frozen_top, partial_mid, fastai_full]
    elif f.per_class >= t.many_per_class:
        lead = f"{size} (>= {t.many_per_class:g}: many) and {where} -> full fine-tuning"
        ranked = [full, partial_far if far else partial_mid, fastai_full, frozen_best]
    elif far:
        lead = f"{size} (between {t.few_per_class:g} and {t.many_per_class:g}) and {where} -> fine-tune from an earlier block"
        ranked = [partial_far, partial_mid, frozen_best, full, fastai_full]
    else:
        lead = f"{size} (between {t.few_per_class:g} and {t.many_per_class:g}) and {where} -> fine-tune from the middle, frozen as fallback"
        ranked = [partial_mid, frozen_best, full, fastai_full]
    if all_levels_supported(base.backbone):  # second to fourth: linear heads on the shared pass
        ranked[1:1] = [frozen_all, frozen_all_features, frozen_ensemble]
    ranked += [frozen_top] + [
        _plan(base, "frozen", None, level, [*common, reason]) for level, reason in _frozen_levels(f, t)
    ]
    ranked = _unique(ranked)
    ranked[0] = replace(ranked[0], reasons=[lead, *ranked[0].reasons])
    for i, plan in enumerate(ranked[1:], start=2):
        ranked[i - 1] = replace(plan, reasons=[f"alternative {i}: {lead.split(' -> ')[0]}", *plan.reasons])
    return ranked


def input_size(median_side: float, t: Thresholds = THRESHOLDS) -> int | None:
    """The input size the rules train images of this median side at: small ones upsampled
    to `small_image_size`, others at the backbone's own size (None). The selector profiles
    at it too, so the profile's distances and k-NN are those of the pixels trials see."""
    return t.small_image_size if median_side < t.small_image_side else None


def rank_backbones(
    profiles: list[Profile], costs: dict[str, float], t: Thresholds = THRESHOLDS
) -> list[tuple[Profile, str]]:
    """Candidate backbones, the leading one first, each with why it stands where it does.

    Cheapest first; a costlier one moves ahead only when its best k-NN accuracy beats the
    leader's by more than `backbone_knn_margin`. `costs`: seconds of one estimated full
    fine-tune per backbone name.
    """
    if not profiles:
        raise ValueError("need at least one profile to rank backbones")
    by_cost = sorted(profiles, key=lambda p: costs[p.backbone])
    knn = {p.backbone: facts(p).best_knn for p in profiles}
    leader, why = by_cost[0], "the cheapest"
    for candidate in by_cost[1:]:
        if knn[candidate.backbone] > knn[leader.backbone] + t.backbone_knn_margin:
            why = f"its k-NN beats {leader.backbone}'s by more than {t.backbone_knn_margin:g}"
            leader = candidate
    if leader is by_cost[0] and len(by_cost) > 1:
        why += f", and no costlier backbone beats its k-NN by more than {t.backbone_knn_margin:g}"

    def standing(p: Profile) -> str:
        cost = costs[p.backbone] / costs[by_cost[0].backbone]
        return f"{p.backbone} (best k-NN {knn[p.backbone]:.3f}, {cost:.1f}x the cheapest's cost)"

    return [(leader, f"backbone {standing(leader)} leads: {why}")] + [
        (p, f"other backbone {standing(p)}") for p in by_cost if p is not leader
    ]


def rank_plans_across_backbones(
    profiles: list[Profile], costs: dict[str, float], base: Plan, t: Thresholds = THRESHOLDS
) -> list[Plan]:
    """The leading backbone's ranked Plans, then each other backbone's first Plan and its
    best frozen extractor (one pass over the data): the search can compare backbones
    before the sampler explores them. One profile: that backbone's `rank_plans`."""
    if len(profiles) == 1:
        return rank_plans(profiles[0], base, t)
    ranked = rank_backbones(profiles, costs, t)
    (leader, lead), others = ranked[0], ranked[1:]
    plans = rank_plans(leader, base, t)
    plans[0] = replace(plans[0], reasons=[*plans[0].reasons, lead])
    for profile, why in others:
        own = rank_plans(profile, base, t)
        frozen = next((p for p in own if p.strategy == "frozen"), None)
        picks = own[:1] + ([frozen] if frozen is not None and frozen is not own[0] else [])
        plans += [replace(p, reasons=[*p.reasons, why]) for p in picks]
    return plans


def _frozen_levels(f: Facts, t: Thresholds) -> list[tuple[int, str]]:
    """Feature levels worth a frozen trial, with why: near the best k-NN, or unmeasured."""
    out = []
    for level in range(f.levels):
        knn = f.level_knn.get(level)
        if knn is None:
            out.append((level, f"frozen at feature level {level}: not measured by the profile, and it costs no extra pass over the data"))
        elif _near_best(knn, f, t):
            out.append((level, f"frozen at feature level {level}: k-NN {knn:.3f}, within {t.frozen_knn_margin:g} of the best depth's {f.best_knn:.3f}"))
    return out


def _near_best(knn: float, f: Facts, t: Thresholds) -> bool:
    """Within `frozen_knn_margin` of the best depth's k-NN. The profile's k-NN accuracies
    are float32 steps of 1/images: a level exactly one margin behind (0.90 vs 0.95 on 20
    images) is within it, not lost to rounding (0.9 < 0.95 - 0.05 in floating point)."""
    return knn >= f.best_knn - t.frozen_knn_margin - 1e-6


def _plan(base: Plan, strategy: str, cut: int | None, level: int | None, reasons: list[str]) -> Plan:
    return replace(base, strategy=strategy, cut=cut, feature_level=level, reasons=reasons)


def _unique(plans: list[Plan]) -> list[Plan]:
    seen, out = set(), []
    for plan in plans:
        key = (plan.strategy, plan.cut, plan.feature_level, plan.all_levels, plan.all_levels_mode, plan.bn_mode, plan.augment)
        if key not in seen:
            seen.add(key)
            out.append(plan)
    return out
