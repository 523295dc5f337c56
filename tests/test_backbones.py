from __future__ import annotations

import importlib
import re
from dataclasses import replace

import huggingface_hub.constants
import pytest
import timm
import torch

from autotransfer import backbones as registry
from autotransfer.backbones import (
    BackboneSpec,
    create_model,
    get_backbone,
    list_backbones,
    load_plugins,
    on_device,
)
from autotransfer.errors import BackboneError
from autotransfer.plan import Plan
from autotransfer.strategies import build_net
from conftest import BROKEN_PLUGIN, GOOD_PLUGIN, write_plugin

# each test imports the plugin modules afresh; timm's registry keeps the first one's model
pytestmark = pytest.mark.filterwarnings("ignore:Overwriting leaky_tinynet")

@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A working and a broken plugin distribution on sys.path, autoload switched on."""
    root = tmp_path / "site"
    write_plugin(root, "autotransfer-tiny-plugin", "tiny_plugin", "tiny", GOOD_PLUGIN)
    write_plugin(root, "autotransfer-broken-plugin", "broken_plugin", "broken", BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD")
    return root


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", pretrained=False).state_dict()


# ---------------------------------------------------------------- plugin discovery


def test_entry_point_plugin_is_listed_with_its_package(plugins):
    specs = {spec.name: spec for spec in list_backbones()}
    assert specs["test_resnet"].package == "autotransfer-tiny-plugin"
    assert specs["test_resnet"].pretrained_on == "tiny-plugin-set"

    loaded, _ = load_plugins()
    assert ("autotransfer-tiny-plugin", "tiny") in {(p.package, p.entry) for p in loaded}
    assert loaded[0].package == "autotransfer"  # the built-in timm plugin comes first


def test_plugin_spec_wins_over_timm_and_its_weights_are_used(plugins):
    spec = get_backbone("test_resnet")
    assert spec.package == "autotransfer-tiny-plugin"
    assert (spec.input_size, spec.std) == (64, (0.25, 0.25, 0.25))

    model = create_model(spec, "pretrained", num_classes=0)  # offline: only the plugin has them
    expected = _state(1234)
    own = model.state_dict()
    assert set(own) == {k for k in expected if not k.startswith("fc.")}
    for key, tensor in own.items():
        assert torch.equal(tensor, expected[key]), key


def test_broken_plugin_is_skipped_and_kept_as_a_failure_naming_it(plugins):
    names = {spec.name: spec.package for spec in list_backbones()}
    assert names["test_resnet"] == "autotransfer-tiny-plugin"  # the good one still loads

    loaded, failures = load_plugins()
    assert [(f.package, f.entry) for f in failures] == [("autotransfer-broken-plugin", "broken")]
    assert failures[0].error == "ImportError: needs the missing_wheel package"
    assert "broken_plugin" not in {p.entry for p in loaded}


def test_plugin_without_backbones_function_is_a_failure(tmp_path, monkeypatch):
    write_plugin(tmp_path / "site", "autotransfer-empty-plugin", "empty_plugin", "empty", "X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD")
    _, failures = load_plugins()
    assert [(f.entry, f.error.split(":")[0]) for f in failures] == [("empty", "TypeError")]


# ---------------------------------------------------------------- the plugin contract (issue 17)


def test_every_broken_plugin_and_spec_is_one_failure_with_its_reason_and_never_a_backbone(plugin_site, recwarn):
    found = registry.discover()
    failures = {(f.package, f.entry, f.backbone): f.error for f in found.failures}
    assert len(found.failures) == len(failures) == 3, found.failures
    assert failures[("autotransfer-broken-plugin", "broken", "")] == "ImportError: needs the missing_wheel package"
    assert failures[("autotransfer-bad-specs", "bad_specs", "a_misspelt_net")].startswith(
        "architecture 'leaky_tinynett' is not a timm model (did you mean leaky_tinynet?) and the spec has no create()")
    assert failures[("autotransfer-bad-specs", "bad_specs", "a_weights_path_net")] == (
        "weights is a str, not a function returning a state dict")
    names = {spec.name for spec in list_backbones()}
    assert {"leaky_tinynet", "leaky_factory", "a_gone_weights_net"} <= names  # weights are not loaded to list
    assert not names & {"a_misspelt_net", "a_weights_path_net"}
    assert not [w for w in recwarn if "plugin" in str(w.message)]  # the CLI reports them, once


def test_a_failed_spec_or_plugin_says_why_when_its_name_is_asked_for(plugin_site):
    with pytest.raises(BackboneError, match=r"^backbone 'a_misspelt_net' of plugin autotransfer-bad-specs\[bad_specs\] "
                                            r"is unusable: architecture 'leaky_tinynett' is not a timm model"):
        get_backbone("a_misspelt_net")
    with pytest.raises(BackboneError, match=r"^unknown backbone 'missing_wheel_net'.*; plugin autotransfer-broken-plugin"
                                            r"\[broken\]: ImportError: needs the missing_wheel package \(it might offer it\)$"):
        get_backbone("missing_wheel_net")


@pytest.mark.parametrize("name", ["leaky_tinynet", "leaky_factory"], ids=["registered", "create"])
def test_an_architecture_only_the_plugin_has_gets_the_plugin_weights(plugin_site, name):
    spec = get_backbone(name)
    assert (spec.package, spec.entry, spec.module) == ("autotransfer-leaky", "leaky", "leaky_plugin")
    model = create_model(spec, "pretrained", num_classes=3)

    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    expected = importlib.import_module("leaky_plugin").weights()  # no num_batches_tracked, a 10-way fc
    for key, tensor in model.state_dict().items():
        if key.startswith("fc."):
            assert tensor.shape[0] == 3, key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, expected[key]), key
    net = build_net(spec, Plan(name, strategy="frozen", weights="random"), 3)  # no classifier in its cfg
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["model.fc.weight", "model.fc.bias"]
    if spec.create is not None:
        with pytest.raises(BackboneError, match=r"ships no pretrained weights for 'leaky_factory'; pass --weights random"):
            create_model(replace(spec, weights=None), "pretrained")



@pytest.mark.parametrize("value", ["1", "yes"])
def test_disable_autoload_hides_plugins(plugins, monkeypatch, recwarn, value):
    monkeypatch.setenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD", value)
    loaded, failures = load_plugins()
    assert [p.package for p in loaded] == ["autotransfer"]
    assert failures == []
    assert all(spec.package == "autotransfer" for spec in list_backbones())
    assert get_backbone("test_resnet").package == "autotransfer"  # timm's own, not the plugin's
    assert not [w for w in recwarn if "skipping backbone plugin" in str(w.message)]


# ---------------------------------------------------------------- lookup


def test_any_timm_name_resolves_through_the_builtin_plugin():
    spec = get_backbone("test_vit")
    assert (spec.name, spec.architecture, spec.package) == ("test_vit", "test_vit", "autotransfer")
    assert spec.weights is None
    assert spec.input_size == timm.get_pretrained_cfg("test_vit").input_size[-1]


def test_unknown_backbone_suggests_the_close_name():
    with pytest.raises(BackboneError, match=r"unknown backbone 'test_resnt'; did you mean .*test_resnet"):
        get_backbone("test_resnt")


def test_unknown_backbone_without_close_name_points_to_the_listing():
    with pytest.raises(BackboneError, match=r"unknown backbone 'zzqqxx'; see `autotransfer backbones`") as info:
        get_backbone("zzqqxx")
    assert "did you mean" not in str(info.value)


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weights_without_batchnorm_counters_load_in_any_float_dtype(tmp_path, dtype):
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in _state(42).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "no-counters.pth")
    model = create_model(get_backbone("test_resnet"), str(tmp_path / "no-counters.pth"), num_classes=0)
    for key, tensor in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, state[key].float()), key


def test_weights_that_do_not_fit_name_the_first_real_mismatch(tmp_path):
    state = _state(42)
    first, second = list(timm.create_model("test_resnet", num_classes=0).state_dict())[:2]
    spec = get_backbone("test_resnet")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "data-parallel.pth")
    with pytest.raises(BackboneError, match=rf"first: {re.escape(first)} is missing \(the first key the model lacks: "
                                            rf"module\.{re.escape(first)}\); expected the model's own key names"):
        create_model(spec, str(tmp_path / "data-parallel.pth"))
    torch.save({**state, second: torch.zeros(2)}, tmp_path / "reshaped.pth")
    with pytest.raises(BackboneError, match=rf"1 tensors missing or of another shape; first: {re.escape(second)} "
                                            rf"has shape \(2,\), the model's is \({state[second].shape[0]},\)"):
        create_model(spec, str(tmp_path / "reshaped.pth"))


@pytest.mark.parametrize("wrapped", [False, True], ids=["state-dict", "wrapped-in-state_dict"])
def test_weights_file_loads_those_exact_tensors(tmp_path, wrapped):
    state = _state(42)
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    spec = get_backbone("test_resnet")

    torch.manual_seed(0)  # a different random init underneath
    model = create_model(spec, str(path), num_classes=3)

    own = model.state_dict()
    for key, tensor in own.items():
        if key.startswith("fc."):  # 1000-class head left out, the fresh 3-class one kept
            assert tensor.shape[0] == 3
        else:
            assert torch.equal(tensor, state[key]), key


def test_random_weights_are_not_the_file_weights():
    spec = get_backbone("test_resnet")
    torch.manual_seed(42)
    model = create_model(spec, "random", num_classes=0)
    assert model.num_classes == 0
    assert not torch.equal(model.conv1[0].weight, _state(43)["conv1.0.weight"])


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pth")
    with pytest.raises(BackboneError, match=r"do not fit ResNet: \d+ tensors missing"):
        create_model(get_backbone("test_resnet"), str(tmp_path / "vit.pth"))


def test_missing_weights_file_is_a_backbone_error(tmp_path):
    with pytest.raises(BackboneError, match=r"weights file '.*nope\.pth' not found; pass --weights"):
        create_model(get_backbone("test_resnet"), str(tmp_path / "nope.pth"))


def test_unreadable_weights_file_is_a_backbone_error(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"definitely not a torch file")
    with pytest.raises(BackboneError, match=r"could not read weights file"):
        create_model(get_backbone("test_resnet"), str(tmp_path / "junk.pth"))


def test_offline_pretrained_weights_are_a_backbone_error_naming_weights_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(BackboneError, match=r"could not load pretrained weights for 'test_resnet'.*--weights FILE"):
        create_model(get_backbone("test_resnet"), "pretrained")


def test_plugin_spec_equality_ignores_weights_callable():
    a = BackboneSpec("x", "test_resnet", "none", 64, (0.5,) * 3, (0.5,) * 3, weights=lambda: {})
    b = BackboneSpec("x", "test_resnet", "none", 64, (0.5,) * 3, (0.5,) * 3)
    assert a == b


def test_on_the_cpu_a_network_computes_in_channels_last_memory_and_the_same_outputs():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
        placed = on_device(model, "cpu")
        after = placed(images)
    assert placed is model
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # pointwise 1x1 convs are both; 3x3 ones are not
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)

