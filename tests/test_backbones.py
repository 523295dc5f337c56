from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch

from autotransfer.backbones import (
    BackboneSpec,
    create_model,
    get_backbone,
    list_backbones,
    load_plugins,
)
from autotransfer.errors import BackboneError
from conftest import BROKEN_PLUGIN, GOOD_PLUGIN, write_plugin

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


@pytest.mark.filterwarnings("ignore:autotransfer. skipping backbone plugin")
def test_entry_point_plugin_is_listed_with_its_package(plugins):
    specs = {spec.name: spec for spec in list_backbones()}
    assert specs["test_resnet"].package == "autotransfer-tiny-plugin"
    assert specs["test_resnet"].pretrained_on == "tiny-plugin-set"

    loaded, _ = load_plugins()
    assert ("autotransfer-tiny-plugin", "tiny") in {(p.package, p.entry) for p in loaded}
    assert loaded[0].package == "autotransfer"  # the built-in timm plugin comes first


@pytest.mark.filterwarnings("ignore:autotransfer. skipping backbone plugin")
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


def test_broken_plugin_is_skipped_with_a_warning_naming_it(plugins):
    with pytest.warns(UserWarning, match=r"autotransfer-broken-plugin\[broken\]: ImportError: needs the missing_wheel"):
        names = {spec.name: spec.package for spec in list_backbones()}
    assert names["test_resnet"] == "autotransfer-tiny-plugin"  # the good one still loads

    with pytest.warns(UserWarning):
        loaded, failures = load_plugins()
    assert [(f.package, f.entry) for f in failures] == [("autotransfer-broken-plugin", "broken")]
    assert failures[0].error == "ImportError: needs the missing_wheel package"
    assert "broken_plugin" not in {p.entry for p in loaded}


def test_plugin_without_backbones_function_is_a_failure(tmp_path, monkeypatch):
    write_plugin(tmp_path / "site", "autotransfer-empty-plugin", "empty_plugin", "empty", "X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.warns(UserWarning, match=r"autotransfer-empty-plugin\[empty\]: TypeError"):
        _, failures = load_plugins()
    assert [f.entry for f in failures] == ["empty"]


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
