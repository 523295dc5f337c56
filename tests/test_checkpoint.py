from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.data import create_transform

from autotransfer.checkpoint import FORMAT, load_model, read_checkpoint
from autotransfer.data import load_rgb, scan_folder
from autotransfer.errors import BackboneError, RunError
from autotransfer.plan import Plan
from autotransfer.predict import evaluate_records
from autotransfer.train import fit
from conftest import CLASSES, FAST, plugin_env

RUNS = ["frozen_run", "truncated_run"]


def load_with_timm_only(path) -> tuple[torch.nn.Module, dict]:
    """The recipe from checkpoint.py's docstring, written with torch and timm alone."""
    payload = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    model = timm.create_model(payload["architecture"], pretrained=False, num_classes=0)
    pool = getattr(model.global_pool, "pool_type", model.global_pool)
    if payload["feature_level"] is not None:
        model.prune_intermediate_layers(
            indices=[payload["feature_level"]], prune_norm=False, prune_head=True
        )
    model.reset_classifier(len(payload["classes"]), pool)
    model.load_state_dict(payload["state_dict"])  # strict: every tensor fits
    return model.eval(), payload


@pytest.mark.parametrize("run_fixture", RUNS)
def test_model_file_loads_with_timm_alone_and_gives_the_same_logits(request, run_fixture, split_folder):
    run = request.getfixturevalue(run_fixture)
    plain, payload = load_with_timm_only(run / "model.pt")
    model, classes, prep = load_model(run)

    assert payload["format"] == FORMAT
    assert all(t.is_contiguous() for t in payload["state_dict"].values())  # trained channels-last, saved plain
    assert classes == payload["classes"] == CLASSES
    assert prep.input_size == payload["preprocessing"]["input_size"] == 32
    assert not model.training

    transform = create_transform(
        input_size=(3, prep.input_size, prep.input_size), interpolation=prep.interpolation,
        mean=prep.mean, std=prep.std, crop_pct=prep.crop_pct,
    )
    images = sorted((split_folder / "test").rglob("*.jpg"))
    batch = torch.stack([transform(load_rgb(p)) for p in images])
    with torch.no_grad():
        ours, theirs = model(batch), plain(batch)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    truth = torch.tensor([CLASSES.index(p.parent.name) for p in images])
    assert (ours.argmax(1) == truth).float().mean() >= 5 / 6


def test_truncated_model_file_really_is_truncated(truncated_run):
    payload = read_checkpoint(truncated_run)
    assert (payload["architecture"], payload["feature_level"]) == ("test_resnet", 2)
    assert not any(k.startswith(("layer3.", "layer4.")) for k in payload["state_dict"])
    assert payload["state_dict"]["fc.weight"].shape == (3, 48)  # level 2 of test_resnet: 48 channels


def test_model_file_loads_without_autotransfer_installed(truncated_run, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["autotransfer"] = None  # importing it would fail
        import timm, torch
        payload = torch.load({str(truncated_run / "model.pt")!r}, map_location="cpu", weights_only=True)
        model = timm.create_model(payload["architecture"], pretrained=False, num_classes=0)
        pool = getattr(model.global_pool, "pool_type", model.global_pool)
        model.prune_intermediate_layers(indices=[payload["feature_level"]], prune_norm=False, prune_head=True)
        model.reset_classifier(len(payload["classes"]), pool)
        model.load_state_dict(payload["state_dict"])
        torch.manual_seed(0)
        with torch.no_grad():
            torch.save(model.eval()(torch.randn(2, 3, 32, 32)), {str(tmp_path / "logits.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model, _, _ = load_model(truncated_run)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_a_model_pt_path_works_as_well_as_its_run_folder(frozen_run):
    assert read_checkpoint(frozen_run / "model.pt")["classes"] == read_checkpoint(frozen_run)["classes"]
    assert not list(frozen_run.glob("*.tmp"))


def test_folder_that_is_not_a_run_is_a_run_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(RunError, match=r"is not an autotransfer run \(no model\.pt\); create one with `autotransfer fit"):
            load_model(folder)


def test_unreadable_or_foreign_model_file_is_a_run_error(tmp_path):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "model.pt").write_bytes(b"\x00not a torch file")
    with pytest.raises(RunError, match="could not be read as a model file"):
        load_model(tmp_path / "garbage")

    (tmp_path / "foreign").mkdir()
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "foreign" / "model.pt")
    with pytest.raises(RunError, match=rf"is not an autotransfer model file \(format {FORMAT}\)"):
        load_model(tmp_path / "foreign")


@pytest.mark.parametrize("run", ["all_levels_run", "all_levels_feature_run", "all_levels_ensemble_run"])
def test_all_levels_model_file_predicts_what_the_run_measured(run, split_folder, request):
    all_levels_run = request.getfixturevalue(run)
    payload = read_checkpoint(all_levels_run)
    assert "all_levels_head" in payload
    plain = timm.create_model(payload["architecture"], pretrained=False, num_classes=0)
    plain.load_state_dict(payload["state_dict"])  # the backbone is still a plain timm model
    model, classes, prep = load_model(all_levels_run)
    x = torch.randn(3, 3, prep.input_size, prep.input_size)
    with torch.no_grad():  # the README's recipe, with timm alone
        final, maps = plain.eval().forward_intermediates(x, indices=list(range(len(plain.feature_info))))
        features = torch.cat([m.mean(dim=(2, 3)) for m in maps] + [plain.forward_head(final, pre_logits=True)], dim=1)
        head = payload["all_levels_head"]
        logits = ((features - head["0.mean"]) * head["0.scale"]) @ head["1.weight"].T + head["1.bias"]
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-4)
    metrics = json.loads((all_levels_run / "metrics.json").read_text())
    report = evaluate_records(all_levels_run, scan_folder(split_folder).splits["val"], classes)
    assert report["confusion_matrix"] == metrics["val"]["confusion_matrix"]
    assert report["loss"] == pytest.approx(metrics["val"]["loss"], abs=1e-4)
    assert len(metrics["cv"].get("members", [])) == (3 if run == "all_levels_ensemble_run" else 0)


# ---------------------------------------------------------------- a plugin's architecture (issue 17)


@pytest.fixture(params=["leaky_tinynet", "leaky_factory"], ids=["registered", "create"])
def plugin_run(request, plugin_site, split_folder, tmp_path):
    """A frozen run of an architecture only the plugin knows, with the plugin's weights."""
    out = tmp_path / "run"
    plan = Plan(**{**FAST, "backbone": request.param, "weights": "pretrained"})
    fit(scan_folder(split_folder), plan, out, progress=False, log=lambda _: None)
    return out


def _fresh_logits(site, tmp_path, script: str, **env) -> torch.Tensor:
    """Logits on a seeded batch from `script` (which defines `model`), run in a new process."""
    code = textwrap.dedent(script) + textwrap.dedent(f"""
        torch.manual_seed(0)
        with torch.no_grad():
            torch.save(model.eval()(torch.randn(2, 3, 32, 32)), {str(tmp_path / "logits.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=plugin_env(site, **env), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.filterwarnings("ignore:Overwriting leaky_tinynet")
def test_a_plugin_model_loads_in_a_fresh_process_through_its_plugin_or_names_it(plugin_run, plugin_site, tmp_path, monkeypatch):
    payload = read_checkpoint(plugin_run)
    assert payload["plugin"] == {"distribution": "autotransfer-leaky", "entry_point": "leaky", "module": "leaky_plugin"}
    model, _, _ = load_model(plugin_run)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(torch.randn(2, 3, 32, 32))

    # the plugin named in model.pt is imported even with autoload off
    fresh = _fresh_logits(plugin_site, tmp_path, f"""
        import torch
        from autotransfer.checkpoint import load_model
        model, classes, prep = load_model({str(plugin_run)!r})
    """, AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD="1")
    torch.testing.assert_close(fresh, expected, rtol=0, atol=0)
    if payload["backbone"] == "leaky_tinynet":
        readme = _fresh_logits(plugin_site, tmp_path, f"""
            import importlib, timm, torch
            ck = torch.load({str(plugin_run / "model.pt")!r}, weights_only=True)
            if ck["plugin"]["distribution"] != "autotransfer":  # a plugin's architecture: import it first
                importlib.import_module(ck["plugin"]["module"])
            model = timm.create_model(ck["architecture"], num_classes=0)
            pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
            model.reset_classifier(len(ck["classes"]), *([pool] if pool else []))
            model.load_state_dict(ck["state_dict"])
        """)
        torch.testing.assert_close(readme, expected, rtol=0, atol=0)

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin_site)])  # uninstalled
    with pytest.raises(BackboneError, match=r"model\.pt: backbone 'leaky_\w+' comes from the plugin "
                                            r"autotransfer-leaky\[leaky\], which is not installed; install it "
                                            r"\(pip install autotransfer-leaky\)"):
        load_model(plugin_run)


def test_the_two_all_levels_modes_differ_by_one_factor_per_level(all_levels_run, all_levels_feature_run):
    """Same features, same standardisation; "level" then scales each level's d varying
    features by LEVEL_NORM / sqrt(d), which is all that differs in the saved heads."""
    from autotransfer.checkpoint import load_model as load
    from autotransfer.strategies import LEVEL_NORM

    assert json.loads((all_levels_feature_run / "plan.json").read_text())["all_levels_mode"] == "feature"
    level, feature = (read_checkpoint(run)["all_levels_head"] for run in (all_levels_run, all_levels_feature_run))
    torch.testing.assert_close(level["0.mean"], feature["0.mean"])
    start = 0
    for dim in load(all_levels_run)[0].dims:
        alive = feature["0.scale"][start:start + dim] != 0
        ratio = level["0.scale"][start:start + dim][alive] / feature["0.scale"][start:start + dim][alive]
        torch.testing.assert_close(ratio, torch.full_like(ratio, LEVEL_NORM / int(alive.sum()) ** 0.5))
        start += dim
