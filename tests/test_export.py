from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from autotransfer.checkpoint import load_model
from autotransfer.data import scan_folder
from autotransfer.errors import AutotransferError
from autotransfer.export import check_images, export, metadata_path
from autotransfer.plan import Plan
from autotransfer.train import fit
from conftest import CLASSES, FAST

RUNS = ["frozen_run", "truncated_run", "all_levels_run"]  # frozen, partial above a cut at level 2, every level

# a fresh interpreter (-I: no PYTHONPATH, no cwd) in which autotransfer, timm and the
# plugin cannot be imported; it fails if any of them was imported anyway
GUARD = """
    import sys
    BLOCKED = ("autotransfer", "timm", "leaky_plugin")
    for name in BLOCKED:
        sys.modules[name] = None  # importing it raises ImportError
"""
UNTOUCHED = """
    assert all(sys.modules.get(name) is None for name in BLOCKED), "imported a blocked module"
"""


def _fresh(script: str, tmp_path) -> torch.Tensor:
    code = textwrap.dedent(GUARD) + textwrap.dedent(script) + textwrap.dedent(UNTOUCHED)
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return torch.load(tmp_path / "logits.pt")


def _expected(run) -> tuple[torch.Tensor, torch.Tensor]:
    model, _, prep = load_model(run)
    batch = check_images(prep)[:3]
    with torch.no_grad():
        return batch, model(batch)


def _torchscript_logits(path, batch, tmp_path) -> torch.Tensor:
    torch.save(batch, tmp_path / "batch.pt")
    return _fresh(f"""
        import torch
        model = torch.jit.load({str(path)!r})
        torch.save(model(torch.load({str(tmp_path / "batch.pt")!r})), {str(tmp_path / "logits.pt")!r})
    """, tmp_path)


@pytest.mark.parametrize("run_fixture", RUNS)
def test_torchscript_export_runs_with_torch_alone_and_matches(request, run_fixture, tmp_path):
    run = request.getfixturevalue(run_fixture)
    done = export(run, "torchscript", tmp_path / "model.ts")
    assert done.path == tmp_path / "model.ts" and done.max_abs_diff < 1e-4 and done.images == 4
    meta = json.loads(metadata_path(done.path).read_text())
    assert meta["classes"] == CLASSES
    assert (meta["input_size"], meta["model_format"]) == (32, "torchscript")
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(meta)

    batch, expected = _expected(run)
    got = _torchscript_logits(done.path, batch, tmp_path)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("run_fixture", RUNS)
def test_onnx_export_runs_in_onnxruntime_and_matches(request, run_fixture, tmp_path):
    pytest.importorskip("onnx", reason="pip install 'autotransfer[export]' to test ONNX export")
    pytest.importorskip("onnxruntime", reason="pip install 'autotransfer[export]' to test ONNX export")
    run = request.getfixturevalue(run_fixture)
    done = export(run, "onnx", tmp_path / "model.onnx")
    assert done.max_abs_diff < 1e-4
    batch, expected = _expected(run)
    torch.save(batch, tmp_path / "batch.pt")
    got = _fresh(f"""
        import onnxruntime, torch
        session = onnxruntime.InferenceSession({str(done.path)!r}, providers=["CPUExecutionProvider"])
        batch = torch.load({str(tmp_path / "batch.pt")!r}).numpy()
        torch.save(torch.from_numpy(session.run(["logits"], {{"image": batch}})[0]), {str(tmp_path / "logits.pt")!r})
    """, tmp_path)
    assert (got - expected).abs().max() < 1e-4


def test_onnx_without_the_package_is_one_line_saying_what_to_install(frozen_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(AutotransferError, match=r"needs the onnx package, which is not installed: pip install 'autotransfer\[export\]'"):
        export(frozen_run, "onnx", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.filterwarnings("ignore:Overwriting leaky_tinynet")
def test_a_plugin_architecture_exports_and_runs_where_the_plugin_is_not_installed(plugin_site, split_folder, tmp_path):
    run = tmp_path / "run"
    plan = Plan(**{**FAST, "backbone": "leaky_tinynet", "weights": "pretrained", "strategy": "partial", "cut": 2})
    fit(scan_folder(split_folder), plan, run, progress=False, log=lambda _: None)
    done = export(run, "torchscript")
    assert done.path == run / "model.torchscript.pt"
    batch, expected = _expected(run)
    got = _torchscript_logits(done.path, batch, tmp_path)  # -I: plugin_site is not on the path
    assert (got - expected).abs().max() < 1e-4


def test_cli_export_says_it_checked(frozen_run, tmp_path):
    from click.testing import CliRunner

    from autotransfer.cli import main

    out = tmp_path / "exported" / "m.pt"
    result = CliRunner().invoke(main, ["export", str(frozen_run), "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and metadata_path(out).is_file()
    assert "checked against the PyTorch model on 4 images: max abs difference of logits" in result.output
