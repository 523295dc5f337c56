"""Freezing, BN modes, gradients and truncation, on torch + timm alone (no Trainer)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from autotransfer.backbones import get_backbone
from autotransfer.errors import PlanError
from autotransfer.plan import Plan
from autotransfer.strategies import LEVEL_NORM, MultiLevelNet, Preprocessing, TransferNet, build_net, describe_backbone

# timm's coarse groups written out by hand (stem first), the oracle for --cut
GROUPS = {
    "test_efficientnet": [
        ("conv_stem.", "bn1."), ("blocks.0.",), ("blocks.1.",), ("blocks.2.",), ("blocks.3.",),
        ("blocks.4.", "conv_head.", "bn2."),
    ],
    "test_resnet": [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)],
    "test_vit": [
        ("cls_token", "pos_embed", "patch_embed."), ("blocks.0.",), ("blocks.1.",), ("blocks.2.",),
        ("blocks.3.",), ("blocks.4.",), ("blocks.5.", "norm."),
    ],
}
CLASSIFIER = {"test_efficientnet": "classifier.", "test_resnet": "fc.", "test_vit": "head."}
ARCHS = list(GROUPS)
CUTS = [(arch, cut) for arch, groups in GROUPS.items() for cut in range(1, len(groups))]


def net_for(arch: str, **fields) -> TransferNet:
    return build_net(get_backbone(arch), Plan(arch, weights="random", **fields), num_classes=3)


def group_of(arch: str, name: str) -> int | None:
    """Index of the coarse group a parameter or module name belongs to; None: classifier."""
    if (name + ".").startswith(CLASSIFIER[arch]):
        return None
    hits = [i for i, prefixes in enumerate(GROUPS[arch])
            if any((name + ".").startswith(p) or name == p for p in prefixes)]
    assert len(hits) == 1, f"{arch}: {name} is in groups {hits}"
    return hits[0]


def trainable(net: TransferNet) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in net.model.named_parameters()}


def one_backward(net: TransferNet, size: int = 32) -> None:
    torch.manual_seed(0)
    net.train()
    loss = nn.functional.cross_entropy(net(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 0]))
    loss.backward()


# ---------------------------------------------------------------- requires_grad per strategy


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_match_timm_coarse_groups(arch):
    net = net_for(arch, strategy="full")
    assert len(net.groups) == len(GROUPS[arch])
    for index, group in enumerate(net.groups):
        assert {group_of(arch, n) for n in group.params} == {index}
    grouped = {n for g in net.groups for n in g.params}
    assert {n for n in trainable(net) if n not in grouped} == {
        n for n in trainable(net) if n.startswith(CLASSIFIER[arch])
    }


@pytest.mark.parametrize("arch, cut", CUTS)
def test_partial_freezes_exactly_the_lowest_cut_groups(arch, cut):
    net = net_for(arch, strategy="partial", cut=cut)
    assert net.frozen_groups == cut
    for name, requires_grad in trainable(net).items():
        group = group_of(arch, name)
        expect_frozen = group is not None and group < cut
        assert requires_grad is not expect_frozen, f"{name} (group {group}) with cut {cut}"


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_trains_only_the_classifier(arch):
    net = net_for(arch, strategy="frozen")
    assert net.frozen_groups == len(GROUPS[arch])
    flags = trainable(net)
    assert {n for n, t in flags.items() if t} == {n for n in flags if n.startswith(CLASSIFIER[arch])}
    assert {id(p) for p in net.classifier.parameters()} == {
        id(p) for p in net.model.parameters() if p.requires_grad
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_full_freezes_nothing(arch):
    net = net_for(arch, strategy="full")
    assert net.frozen_groups == 0
    assert all(trainable(net).values())


# ---------------------------------------------------------------- train/eval modes


def modules_in_groups(net: TransferNet, arch: str, groups: range) -> list[tuple[str, nn.Module]]:
    """Every module inside those groups, parameter-less ones (activations, dropout) too."""
    return [(n, m) for n, m in net.model.named_modules() if n and _in(arch, n, groups)]


def _in(arch: str, name: str, groups: range) -> bool:
    return any(
        (name + ".").startswith(p) for g in groups for p in GROUPS[arch][g] if p.endswith(".")
    )


@pytest.mark.parametrize("arch, cut", CUTS)
def test_frozen_blocks_stay_in_eval_mode_after_train(arch, cut):
    net = net_for(arch, strategy="partial", cut=cut, bn_mode="train")
    n_groups = len(GROUPS[arch])
    for _ in range(2):  # also after an eval() / train() round trip, as Lightning does
        net.train()
        frozen = modules_in_groups(net, arch, range(cut))
        fine_tuned = modules_in_groups(net, arch, range(cut, n_groups))
        assert frozen and fine_tuned
        assert [n for n, m in frozen if m.training] == []
        assert [n for n, m in fine_tuned if not m.training] == []  # BN adapts: bn_mode train
        assert net.training and net.classifier.training
        net.eval()
        assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_strategy_keeps_the_whole_backbone_in_eval_mode(arch):
    net = net_for(arch, strategy="frozen", bn_mode="train").train()
    backbone = modules_in_groups(net, arch, range(len(GROUPS[arch])))
    assert [n for n, m in backbone if m.training] == []
    assert net.classifier.training


def test_frozen_backbone_is_deterministic_in_train_mode_even_with_drop_path():
    """Drop-path has no parameters; inside a frozen block it must be switched off.

    (test_vit: the tiny CNNs have no residual branch where drop-path would act at init.)
    """
    arch = "test_vit"
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=3, drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fine_tuned = TransferNet(model, frozen_groups=0, bn_mode="frozen").train()
        assert not torch.equal(fine_tuned.features(x), fine_tuned.features(x))  # drop-path on
        frozen = TransferNet(model, frozen_groups=len(GROUPS[arch]), bn_mode="frozen").train()
        assert torch.equal(frozen.features(x), frozen.features(x))


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
@pytest.mark.parametrize("strategy, cut", [("full", None), ("partial", 2)])
def test_bn_mode_frozen_keeps_every_batchnorm_in_eval_mode(arch, strategy, cut):
    net = net_for(arch, strategy=strategy, cut=cut, bn_mode="frozen").train()
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 3
    assert not any(m.training for m in norms)
    convs = [n for n, m in modules_in_groups(net, arch, range(2, len(GROUPS[arch])))
             if isinstance(m, nn.Conv2d)]
    assert convs and all(net.model.get_submodule(n).training for n in convs)

    running = [m.running_mean.clone() for m in norms]  # eval BN: statistics do not move
    one_backward(net)
    assert all(torch.equal(before, m.running_mean) for before, m in zip(running, norms))


def test_bn_mode_train_updates_statistics_of_fine_tuned_blocks_only():
    net = net_for("test_resnet", strategy="partial", cut=2, bn_mode="train")
    norms = {n: m for n, m in net.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    before = {n: m.running_mean.clone() for n, m in norms.items()}
    one_backward(net)
    moved = {n for n, m in norms.items() if not torch.equal(before[n], m.running_mean)}
    assert moved == {n for n in norms if group_of("test_resnet", n) >= 2}


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "strategy, cut, feature_level",
    [("full", None, None), ("partial", 2, None), ("partial", 1, 2)],
    ids=["full", "partial", "partial-truncated"],
)
def test_every_trainable_parameter_gets_a_gradient(arch, strategy, cut, feature_level):
    net = net_for(arch, strategy=strategy, cut=cut, feature_level=feature_level, bn_mode="train")
    one_backward(net)
    params = dict(net.model.named_parameters())
    # in the graph (timm's own check): zero-initialised last BNs of residual branches
    # make some of those gradients exactly zero at init, so zero is allowed here
    no_grad = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(p.grad.abs().sum() > 0 for p in net.classifier.parameters())
    leaked = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
    assert leaked == []
    assert sum(p.requires_grad for p in params.values()) < len(params) or strategy == "full"


# ---------------------------------------------------------------- invalid depth


@pytest.mark.parametrize("arch", ARCHS)
def test_invalid_cut_is_a_plan_error_quoting_it(arch):
    n_groups = len(GROUPS[arch])
    for cut in (0, -1, n_groups, n_groups + 5):
        with pytest.raises(PlanError, match=rf"cut must be between 1 and {n_groups - 1} for {arch}.*but got {cut};"):
            net_for(arch, strategy="partial", cut=cut)


@pytest.mark.parametrize("arch", ARCHS)
def test_invalid_feature_level_is_a_plan_error_quoting_it(arch):
    levels = len(timm.create_model(arch, num_classes=0).feature_info)
    for level in (-1, levels, 99):
        with pytest.raises(PlanError, match=rf"feature_level must be between 0 and {levels - 1} for {arch}.*but got {level}$"):
            net_for(arch, feature_level=level)


def test_truncation_leaves_fewer_groups_to_cut():
    net = net_for("test_resnet", strategy="partial", cut=1, feature_level=1)
    assert len(net.groups) == 2
    with pytest.raises(PlanError, match=r"between 1 and 1 .* with feature level 1 .*but got 2"):
        net_for("test_resnet", strategy="partial", cut=2, feature_level=1)


# ---------------------------------------------------------------- truncation


LEVELS = [(arch, level) for arch, n in
          [("test_efficientnet", 5), ("test_resnet", 5), ("test_vit", 6)] for level in range(n)]


@pytest.mark.parametrize("arch, level", LEVELS)
def test_feature_level_gives_that_levels_feature_dim(arch, level):
    expected = timm.create_model(arch, num_classes=0).feature_info[level]["num_chs"]
    net = net_for(arch, feature_level=level).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert net.features(x).shape == (2, expected)
        assert net(x).shape == (2, 3)
    assert net.classifier.in_features == expected


@pytest.mark.parametrize("arch, pool", [("test_efficientnet", "avg"), ("test_resnet", "avg"), ("test_vit", "token")])
def test_truncation_keeps_the_original_pooling(arch, pool):
    net = net_for(arch, feature_level=1)
    global_pool = net.model.global_pool
    assert getattr(global_pool, "pool_type", global_pool) == pool


def test_full_depth_uses_the_top_features():
    net = net_for("test_efficientnet")
    with torch.no_grad():
        assert net.features(torch.randn(1, 3, 32, 32)).shape[1] == net.model.num_features == 256


# ---------------------------------------------------------------- misc


def test_build_net_is_seeded():
    a, b = net_for("test_vit", seed=5), net_for("test_vit", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = net_for("test_vit", seed=6)
    assert not torch.equal(a.model.head.weight, c.model.head.weight)


def test_preprocessing_follows_the_plan_then_the_backbone():
    spec = get_backbone("test_resnet")
    assert Preprocessing.for_plan(spec, Plan("test_resnet", image_size=48)).input_size == 48
    default = Preprocessing.for_plan(spec, Plan("test_resnet"))
    assert (default.input_size, default.mean, default.interpolation) == (
        spec.input_size, tuple(spec.mean), spec.interpolation,
    )


def test_describe_backbone_reports_depth_coordinates():
    row = describe_backbone(get_backbone("test_vit"))
    assert (row["groups"], row["levels"], row["package"]) == (7, 6, "autotransfer")
    assert 0.1 < row["params_m"] < 1.0


# ---------------------------------------------------------------- every level at once


@pytest.mark.parametrize("arch", ARCHS)
def test_all_levels_reads_every_level_and_trains_only_its_head(arch):
    net = build_net(get_backbone(arch), Plan(arch, weights="random", image_size=32, all_levels=True), num_classes=3)
    assert isinstance(net, MultiLevelNet)
    model = net.model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=list(range(len(model.feature_info))))
        expected = [m.mean(dim=(2, 3)) for m in maps] + [model.forward_head(final, pre_logits=True)]
        torch.testing.assert_close(net.features(x), torch.cat(expected, dim=1))
    assert net.dims == [int(e.shape[1]) for e in expected]
    assert not any(p.requires_grad for p in model.parameters())
    net.train()
    assert not any(m.training for m in model.modules())  # the backbone stays in eval mode
    one_backward(net)
    assert {name for name, p in net.named_parameters() if p.grad is not None} == {"classifier.1.weight", "classifier.1.bias"}


def test_all_levels_weighs_every_level_the_same():
    net = build_net(get_backbone("test_resnet"), Plan("test_resnet", weights="random", image_size=32, all_levels=True), 3)
    with torch.no_grad():
        features = net.features(torch.randn(16, 3, 32, 32) * 3 + 1)
    net.set_standardisation(features)
    standardised = net.classifier[0](features)
    torch.testing.assert_close(standardised.mean(dim=0), torch.zeros(standardised.shape[1]), atol=1e-4, rtol=0)
    start = 0
    for dim in net.dims:  # each level: mean squared norm LEVEL_NORM^2 over the training images
        level = standardised[:, start:start + dim]
        assert float(level.pow(2).sum(dim=1).mean()) == pytest.approx(LEVEL_NORM ** 2, rel=1e-3)
        start += dim


def test_all_levels_per_feature_scaling_standardises_each_feature_and_drops_dead_ones():
    net = build_net(get_backbone("test_resnet"), Plan("test_resnet", weights="random", image_size=32, all_levels=True), 3)
    with torch.no_grad():
        features = net.features(torch.randn(16, 3, 32, 32) * 3 + 1)
    features[:, 0] = 2.5  # a dead unit: constant on the training images
    net.set_standardisation(features, "feature")
    standardised = net.classifier[0](features)
    alive = features.std(dim=0, unbiased=False) > 1e-6
    assert not alive[0] and alive.sum() > 100
    torch.testing.assert_close(standardised.std(dim=0, unbiased=False)[alive], torch.ones(int(alive.sum())), atol=1e-3, rtol=0)
    assert float(standardised[:, ~alive].abs().max()) == 0.0
    net.set_standardisation(features, "level")  # the default weighs levels: different scales
    assert not torch.allclose(net.classifier[0](features), standardised)
    with pytest.raises(ValueError, match="scaling must be 'level' or 'feature'"):
        net.set_standardisation(features, "pca")
