"""The command line through click's CliRunner (in process) and `python -m` (subprocess)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from autotransfer import __version__
from autotransfer.checkpoint import FORMAT
from autotransfer.cli import main
from conftest import (
    BROKEN_PLUGIN, CLASSES, COLOURS, FAST_CLI, GOOD_PLUGIN, photo, plugin_env, write_classes, write_plugin,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode"),
    pytest.mark.filterwarnings("ignore:Overwriting leaky_tinynet"),  # each test imports the test plugins afresh
]


def run(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str | Path):
    result = run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


# ---------------------------------------------------------------- fit


@pytest.mark.parametrize(
    "backbone, strategy_args",
    [("test_efficientnet", ["--strategy", "frozen"]), ("test_vit", ["--strategy", "full", "--feature-level", "3"]),
     ("test_resnet", ["--strategy", "frozen", "--all-levels"])],
    ids=["frozen", "full", "all-levels"],
)
def test_fit_writes_a_run(image_folder, tmp_path, backbone, strategy_args):
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "red" / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    result = ok("fit", data, "--backbone", backbone, *strategy_args, *FAST_CLI, "--out", out)

    assert f"{data}: 3 classes, train 18, val 6 images" in result.stdout
    assert f"run saved in {out}/" in result.stdout
    assert "skipped 1 file(s) that are not usable images" in result.stderr
    assert "notes.txt: not a readable image" in result.stderr
    for name in ("model.pt", "plan.json", "scan.json", "metrics.json"):
        assert (out / name).is_file(), name
    finetuned = strategy_args[1] != "frozen"
    assert (out / "logs" / "finetune" / "metrics.csv").is_file() is finetuned
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["backbone"], plan["strategy"], plan["weights"], plan["image_size"]) == (
        backbone, strategy_args[1], "random", 32,
    )
    assert plan["all_levels"] is ("--all-levels" in strategy_args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 5 / 6
    assert ("finetune_val_accuracy" in metrics["stages"]) is finetuned


def test_fit_warns_about_leaks_conflicts_and_what_is_not_data(split_folder, tmp_path):
    """`fit` with a given strategy reads no profile, yet says what `profile` would."""
    data = shutil.copytree(split_folder, tmp_path / "data")
    shutil.copy(data / "train" / "red" / "00.jpg", data / "val" / "red" / "copy.jpg")  # leakage
    shutil.copy(data / "train" / "red" / "01.jpg", data / "train" / "blue" / "red-01.jpg")  # two labels
    elsewhere = write_classes(tmp_path / "elsewhere", per_class=2, classes={"grey": (128, 128, 128)})
    (data / "train" / "grey").symlink_to(elsewhere / "grey")
    result = ok("fit", data, "--strategy", "frozen", "--backbone", "test_efficientnet", *FAST_CLI, "--out", tmp_path / "run")

    assert f"{data}: 3 classes" in result.stdout
    assert f"{data / 'train' / 'grey'}: symlink to {elsewhere / 'grey'}, outside DATA" in result.stderr
    assert "warning: 2 files are identical across splits (leakage)" in result.stderr
    assert f"{data / 'train' / 'red' / '00.jpg'} [train] = {data / 'val' / 'red' / 'copy.jpg'} [val]" in result.stderr
    assert "warning: identical files carry different labels (1 group(s))" in result.stderr
    assert "red-01.jpg [train]" in result.stderr


def test_fit_partial_then_fit_plan_reproduces_it(image_folder, tmp_path):
    first = tmp_path / "first"
    ok("fit", image_folder, "--backbone", "test_resnet", "--strategy", "partial", "--cut", "2",
       *FAST_CLI, "--out", first)
    plan = json.loads((first / "plan.json").read_text())
    assert (plan["strategy"], plan["cut"]) == ("partial", 2)

    again = tmp_path / "again"
    result = ok("fit", image_folder, "--plan", first / "plan.json", "--out", again, "--no-progress")
    assert "features: reused from cache" in result.stdout
    assert json.loads((again / "plan.json").read_text()) == plan
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, again))
    assert m2["val"] == m1["val"] and m2["stages"] == m1["stages"]
    s1, s2 = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (first, again))
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


# ---------------------------------------------------------------- evaluate / predict


def test_evaluate(frozen_run, split_folder):
    text = ok("evaluate", frozen_run, split_folder).stdout
    assert "test split: 6 images" in text
    assert "accuracy 1.0000, macro-F1 1.0000" in text
    assert "confusion matrix (rows: true, columns: predicted):" in text

    report = json.loads(ok("evaluate", frozen_run, split_folder, "--split", "val", "--json").stdout)
    assert (report["split"], report["n"], report["accuracy"]) == ("val", 6, 1.0)
    assert list(report["per_class_accuracy"]) == CLASSES


def test_predict_json(frozen_run, tmp_path):
    images = []
    for name in CLASSES:
        images.append(tmp_path / f"{name}.jpg")
        photo(COLOURS[name], seed=3).save(images[-1])
    results = json.loads(ok("predict", frozen_run, *images, "--top-k", "2", "--json").stdout)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result, truth in zip(results, CLASSES):
        probs = [p["probability"] for p in result["top_k"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6
        assert result["top_k"][0]["class"] == truth

    text = ok("predict", frozen_run, images[0]).stdout
    assert text.startswith(f"{images[0]}: blue ")
    assert text.count(",") == 2  # top 3 by default


# ---------------------------------------------------------------- backbones / demo-data


def test_backbones_json_lists_plugins_and_failures(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_plugin(site, "autotransfer-tiny-plugin", "tiny_plugin", "tiny", GOOD_PLUGIN)
    write_plugin(site, "autotransfer-broken-plugin", "broken_plugin", "broken", BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD")

    listing = json.loads(ok("backbones", "--json").stdout)
    rows = {row["name"]: row for row in listing["backbones"]}
    tiny = rows["test_resnet"]
    assert (tiny["package"], tiny["architecture"], tiny["pretrained_on"]) == (
        "autotransfer-tiny-plugin", "test_resnet", "tiny-plugin-set",
    )
    assert (tiny["groups"], tiny["levels"], tiny["input_size"]) == (5, 5, 64)
    assert 0.3 < tiny["params_m"] < 0.4
    assert listing["failed_plugins"] == [{
        "package": "autotransfer-broken-plugin", "entry": "broken",
        "error": "ImportError: needs the missing_wheel package", "backbone": "",
    }]

    text = ok("backbones")
    assert any(line.split()[:2] == ["test_resnet", "autotransfer-tiny-plugin"] for line in text.stdout.splitlines())
    assert "failed plugin autotransfer-broken-plugin[broken]: ImportError" in text.stderr


# ---------------------------------------------------------------- third-party backbones (issue 17)

PLUGIN_FAILURES = [
    "failed plugin autotransfer-broken-plugin[broken]: ImportError: needs the missing_wheel package",
    "failed backbone a_misspelt_net of autotransfer-bad-specs[bad_specs]: architecture 'leaky_tinynett' is not a timm model",
    "failed backbone a_weights_path_net of autotransfer-bad-specs[bad_specs]: weights is a str, not a function",
]


def _reports_each_failure_once(stderr: str) -> None:
    failed = [line for line in stderr.splitlines() if line.startswith("failed ")]
    assert len(failed) == len(PLUGIN_FAILURES), stderr
    for expected in PLUGIN_FAILURES:
        assert sum(line.startswith(expected) for line in failed) == 1, (expected, stderr)


def _python_m(site: Path, *args, **env) -> subprocess.CompletedProcess:
    """`python -m autotransfer ARGS` in a fresh process that has the plugins installed."""
    done = subprocess.run([sys.executable, "-m", "autotransfer", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=plugin_env(site, **env), cwd=site.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_plugin_architecture_works_in_every_command_each_in_a_fresh_process(plugin_site, split_folder, tmp_path):
    """The plugin registers its architecture with timm when imported; each command runs in
    a process where nothing else imported it."""
    fast = ["--image-size", "32", "--no-progress"]
    _python_m(plugin_site, "profile", split_folder, "--backbone", "leaky_tinynet", "--max-images", "12",
              *fast, "--out", tmp_path / "profile.json")
    assert json.loads((tmp_path / "profile.json").read_text())["architecture"] == "leaky_tinynet"

    run_dir = tmp_path / "run"
    _python_m(plugin_site, "fit", split_folder, "--strategy", "frozen", "--backbone", "leaky_tinynet", *fast,
              "--batch-size", "8", "--out", run_dir)
    assert torch.load(run_dir / "model.pt", weights_only=True)["plugin"]["distribution"] == "autotransfer-leaky"

    image = next((split_folder / "test" / "red").glob("*.jpg"))
    predicted = json.loads(_python_m(plugin_site, "predict", run_dir, image, "--json").stdout)
    assert predicted[0]["image"] == str(image) and len(predicted[0]["top_k"]) == 3
    # model.pt names its plugin, which loads even with autoload off
    report = json.loads(_python_m(plugin_site, "evaluate", run_dir, split_folder, "--json",
                                  AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD="1").stdout)
    assert (report["split"], report["n"]) == ("test", 6)
    _python_m(plugin_site, "report", run_dir, "--no-progress")
    assert json.loads((run_dir / "report" / "report.json").read_text())
    loaded = subprocess.run(
        [sys.executable, "-c", "from autotransfer.checkpoint import load_model; import sys; "
         "net, classes, prep = load_model(sys.argv[1]); print(type(net).__name__, len(classes))", str(run_dir)],
        capture_output=True, text=True, timeout=600, env=plugin_env(plugin_site, AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD="1"),
    )
    assert loaded.returncode == 0 and loaded.stdout.split()[-1] == "3", loaded.stdout + loaded.stderr
    exported = _python_m(plugin_site, "export", run_dir, "--out", tmp_path / "model.ts",
                         AUTOTRANSFER_DISABLE_PLUGIN_AUTOLOAD="1")
    assert (tmp_path / "model.ts").is_file() and "checked against the PyTorch model" in exported.stdout + exported.stderr


def test_broken_plugins_are_listed_once_with_their_reason_and_break_neither_listing_nor_fit(
    plugin_site, image_folder, tmp_path
):
    text = ok("backbones")
    _reports_each_failure_once(text.stderr)
    header, *rows = text.stdout.splitlines()[:-1]
    names = [row.split()[0] for row in rows]
    assert "leaky_tinynet_with_a_long_name" in names and "a_gone_weights_net" in names
    assert not {"a_misspelt_net", "a_weights_path_net"} & set(names)
    for row in rows:  # columns stay aligned with a name of 30 characters
        assert len(row) == len(header), (header, row)
        assert row[header.index("package") - 1] == " " and row[header.index("package"):].startswith("autotransfer")
    listing = json.loads(ok("backbones", "--json").stdout)
    assert len(listing["failed_plugins"]) == len(PLUGIN_FAILURES)

    # the default candidates: efficientnet-lite's, never a plugin that sorts before them
    result = ok("fit", image_folder, "--trials", "1", "--max-images", "24", "--image-size", "32", "--epochs", "1",
                "--batch-size", "8", "--no-progress", "--out", tmp_path / "auto")
    _reports_each_failure_once(result.stderr)
    assert "profiling backbones: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2" in result.stdout

    for name, why in [
        ("a_misspelt_net", "is unusable: architecture 'leaky_tinynett' is not a timm model (did you mean leaky_tinynet?)"),
        ("a_weights_path_net", "is unusable: weights is a str, not a function returning a state dict"),
        ("missing_wheel_net", "plugin autotransfer-broken-plugin[broken]: ImportError: needs the missing_wheel package"),
        ("a_gone_weights_net", "could not load the weights of 'a_gone_weights_net' (FileNotFoundError: /models/gone.pth)"),
    ]:
        result = run("fit", image_folder, "--strategy", "frozen", "--backbone", name, "--image-size", "32",
                     "--no-progress", "--out", tmp_path / name)  # pretrained weights
        assert result.exit_code == 1, result.output
        error = result.stderr.splitlines()[-1]
        assert error.startswith("Error: ") and why in error, error
        assert "Traceback" not in result.output


def test_a_candidate_whose_weights_fail_is_dropped_from_the_search_with_the_reason(plugin_site, image_folder, tmp_path):
    result = ok("fit", image_folder, "--backbone", "a_gone_weights_net", "--backbone", "leaky_tinynet", "--trials", "1",
                "--max-images", "24", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--no-progress",
                "--out", tmp_path / "run")
    assert ("dropped backbone a_gone_weights_net: plugin autotransfer-bad-weights could not load the weights of "
            "'a_gone_weights_net' (FileNotFoundError: /models/gone.pth)") in result.stdout
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["backbone"] == "leaky_tinynet"


def test_demo_data_exports_the_digits(tmp_path):
    pytest.importorskip("sklearn")
    result = ok("demo-data", tmp_path / "digits", "--size", "16")
    assert f"wrote 1797 images in 10 classes to {tmp_path / 'digits'}/" in result.stdout
    folders = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert folders == [str(d) for d in range(10)]
    assert sum(1 for _ in (tmp_path / "digits").rglob("*.png")) == 1797
    first = Image.open(next((tmp_path / "digits" / "0").glob("*.png")))
    assert (first.size, first.mode) == ((16, 16), "L")


# ---------------------------------------------------------------- user errors


def _one_class(tmp: Path) -> Path:
    return write_classes(tmp / "one", per_class=2, classes={"cats": COLOURS["red"]})


def _unreadable_class(tmp: Path) -> Path:
    write_classes(tmp / "bad", per_class=2, classes={"cats": COLOURS["red"]})
    (tmp / "bad" / "dogs").mkdir()
    (tmp / "bad" / "dogs" / "dog.jpg").write_bytes(b"\x00" * 100)
    return tmp / "bad"


def _not_a_run(tmp: Path) -> Path:
    (tmp / "not-a-run").mkdir()
    return tmp / "not-a-run"


def _pickled_model(tmp: Path, name: str) -> Path:
    """A whole pickled timm model, not a state dict: torch explains that over many lines."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm.create_model("test_resnet"), path)
    return path


def _model_file(tmp: Path, **change) -> Path:
    """RUN/model.pt in autotransfer's format (a plain 3-class test_resnet), `change` applied:
    it loads with torch, but its weights may not fit what it says it is."""
    payload = {
        "format": FORMAT, "architecture": "test_resnet", "feature_level": None, "classes": CLASSES,
        "preprocessing": {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                          "crop_pct": 1.0},
        "state_dict": timm.create_model("test_resnet", num_classes=3).state_dict(),
    }
    (tmp / "run").mkdir()
    torch.save({**payload, **change}, tmp / "run" / "model.pt")
    return tmp / "run"


def _file(path: Path, content: bytes = b"{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _bomb(tmp: Path) -> Path:
    """A PNG whose header claims 30,000 x 30,000 pixels: Pillow refuses to decode it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0))
    return _file(tmp / "bomb.png", b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b""))


PROFILE_CLI = ["--backbone", "test_efficientnet", "--weights", "random", "--image-size", "32", "--max-images", "12",
               "--no-progress"]

ERRORS = {
    "missing-folder": (lambda t, d: ["fit", t / "nowhere"], r"nowhere does not exist"),
    "one-class": (lambda t, d: ["fit", _one_class(t)], r"has 1 class folder \('cats'\); need at least 2"),
    "unreadable-class": (lambda t, d: ["fit", _unreadable_class(t)], r"class 'dogs' has no readable image"),
    "unknown-backbone": (
        lambda t, d: ["fit", d, "--backbone", "test_resnt"],
        r"unknown backbone 'test_resnt'; did you mean test_resnet",
    ),
    "evaluate-not-a-run": (lambda t, d: ["evaluate", _not_a_run(t), d], r"not-a-run is not an autotransfer run"),
    "predict-not-a-run": (
        lambda t, d: ["predict", _not_a_run(t), d / "red" / "00.jpg"], r"not-a-run is not an autotransfer run",
    ),
    "cut-out-of-range": (
        lambda t, d: ["fit", d, "--backbone", "test_resnet", "--strategy", "partial", "--cut", "9", *FAST_CLI],
        r"cut must be between 1 and 4 for test_resnet .*but got 9",
    ),
    "cut-without-partial": (lambda t, d: ["fit", d, "--cut", "2"], r"--cut 2 only applies to strategy 'partial'"),
    "missing-plan": (lambda t, d: ["fit", d, "--plan", t / "plan.json"], r"plan file '.*plan\.json' not found"),
    "missing-weights": (
        lambda t, d: ["fit", d, "--backbone", "test_resnet", "--weights", t / "w.pth"],
        r"weights file '.*w\.pth' not found",
    ),
    "weights-not-a-state-dict": (
        lambda t, d: ["fit", d, "--backbone", "test_resnet", "--weights", _pickled_model(t, "full.pth")],
        r"could not read weights file '.*full\.pth' \(UnpicklingError: .*\); expected a state dict",
    ),
    "model-pt-not-ours": (
        lambda t, d: ["evaluate", _pickled_model(t, "run/model.pt").parent, d],
        r"model\.pt could not be read as a model file \(UnpicklingError: .*\); expected the model\.pt",
    ),
    # numbers: every option and Plan field finite and in range (plan.check_number)
    "lr-nan": (lambda t, d: ["fit", d, "--strategy", "full", "--lr", "nan"], r"--lr must be a finite number, but got nan"),
    "lr-inf": (lambda t, d: ["plan", d, "--lr", "inf"], r"--lr must be a finite number, but got inf"),
    "seed-negative": (lambda t, d: ["fit", d, "--seed", "-1"], r"--seed must be between 0 and 2\*\*32 - 1, but got -1"),
    "profile-seed-negative": (lambda t, d: ["profile", d, "--seed", "-1"], r"--seed must be between 0 and 2\*\*32 - 1"),
    "label-smoothing-nan": (lambda t, d: ["fit", d, "--label-smoothing", "nan"], r"--label-smoothing must be a finite number"),
    "val-fraction-1": (lambda t, d: ["fit", d, "--val-fraction", "1"], r"--val-fraction must be between 0 and 1 \(exclusive\), but got 1.0"),
    # where it trains (plan.Compute), checked on this machine before any work
    "devices-not-a-count": (lambda t, d: ["fit", d, "--devices", "two"], r"--devices must be a whole number of at least 1 or 'auto', but got 'two'"),
    "fp16-on-cpu": (
        lambda t, d: ["fit", d, "--accelerator", "cpu", "--precision", "16-mixed", "--out", t / "run"],
        r"precision 16-mixed \(fp16 autocast\) needs a GPU, and this run trains on the CPU; use --precision bf16-mixed",
    ),
    "plan-negative-weight-decay": (
        lambda t, d: ["fit", d, "--plan", _file(t / "p.json", b'{"backbone": "test_resnet", "weight_decay": -0.1}')],
        r"weight_decay must be at least 0, but got -0.1",
    ),
    "plan-nan-lr": (
        lambda t, d: ["fit", d, "--plan", _file(t / "p.json", b'{"backbone": "test_resnet", "lr": NaN}')],
        r"lr must be a finite number, but got nan",
    ),
    # user files that are not what they should be
    "plan-null": (lambda t, d: ["fit", d, "--plan", _file(t / "p.json", b"null")], r"p\.json' holds NoneType null, not a Plan"),
    "plan-number": (lambda t, d: ["fit", d, "--plan", _file(t / "p.json", b"3")], r"p\.json' holds int 3, not a Plan"),
    "plan-not-utf8": (
        lambda t, d: ["fit", d, "--plan", _file(t / "p.json", b"\xff\xfe{}")],
        r"p\.json' is not valid JSON: 'utf-8' codec can't decode",
    ),
    "search-json-damaged": (
        lambda t, d: ["fit", d, "--resume", "--out", _file(t / "run" / "search.json", b"{damaged").parent],
        r"search\.json is damaged \(JSONDecodeError: .*\); restore it, or start a new search",
    ),
    "worker-search-json-not-utf8": (
        lambda t, d: ["worker", _file(t / "run" / "search.json", b"\xff{}").parent],
        r"search\.json is damaged \(UnicodeDecodeError: ",
    ),
    "predict-decompression-bomb": (
        lambda t, d: ["predict", _model_file(t), _bomb(t)], r"bomb\.png' is too large to decode safely \(Image size",
    ),
    "model-pt-wrong-architecture": (
        lambda t, d: ["predict", _model_file(t, architecture="test_efficientnet"), d / "red" / "00.jpg"],
        r"model\.pt does not fit its own description \(RuntimeError: Error\(s\) in loading state_dict .*train it again",
    ),
    "model-pt-wrong-class-count": (
        lambda t, d: ["evaluate", _model_file(t, classes=["cat", "dog"]), d],
        r"model\.pt does not fit its own description \(RuntimeError: .* size mismatch for fc\.weight",
    ),
    "model-pt-wrong-keys": (
        lambda t, d: ["predict", _model_file(t, state_dict={"conv1.w": torch.zeros(1)}), d / "red" / "00.jpg"],
        r"model\.pt does not fit its own description \(RuntimeError: .* Missing key",
    ),
    "model-pt-unknown-architecture": (
        lambda t, d: ["predict", _model_file(t, architecture="no_such_net"), d / "red" / "00.jpg"],
        r"model\.pt does not fit its own description \(RuntimeError: Unknown model \(no_such_net\)\)",
    ),
    # places autotransfer cannot write to
    "out-is-a-file": (
        lambda t, d: ["fit", d, "--backbone", "test_efficientnet", "--strategy", "frozen", *FAST_CLI,
                      "--out", _file(t / "a-file")],
        r"a-file\b.*(file|folder)",
    ),
    "out-under-a-file": (
        lambda t, d: ["fit", d, "--backbone", "test_efficientnet", "--strategy", "frozen", *FAST_CLI,
                      "--out", _file(t / "a-file") / "run"],
        r"a-file/run': Not a directory; part of that path is a file, not a folder",
    ),
    "plan-out-missing-folder": (
        lambda t, d: ["plan", d, *PROFILE_CLI, "--out", t / "missing" / "plan.json"],
        r"missing/plan\.json': No such file or directory; .*create the folder",
    ),
}


def _one_line_error(result, match: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_exit_1_without_traceback(case, tmp_path, image_folder):
    make_args, match = ERRORS[case]
    _one_line_error(run(*make_args(tmp_path, image_folder)), match)


def test_help_and_a_wrong_data_path_answer_without_importing_torch(tmp_path):
    """torch, timm and Lightning take seconds to import: `--help` and a mistyped DATA must
    not wait for them (5.6 s before, 0.1-0.3 s now on 2 cores)."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from autotransfer.cli import main\n"
        "for args in (['--help'], ['fit', '--help'], ['fit', sys.argv[1]], ['profile', sys.argv[1]], ['plan', sys.argv[1]]):\n"
        "    result = CliRunner().invoke(main, args)\n"
        "    print(result.exit_code, (result.output.strip().splitlines() or [''])[-1])\n"
        "print(sorted(m for m in ('torch', 'timm', 'pytorch_lightning', 'optuna') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[-1] == "[]", done.stdout + done.stderr
    assert [line.split()[0] for line in lines[:-1]] == ["0", "0", "1", "1", "1"], lines
    assert all("does not exist" in line for line in lines[2:5]), lines


def test_the_package_api_loads_on_first_use():
    import autotransfer
    from autotransfer import api

    assert {"fit", "load", "plan", "profile", "Run"} <= set(dir(autotransfer))
    assert autotransfer.fit is api.fit and autotransfer.Run is api.Run and autotransfer.load is api.load
    with pytest.raises(AttributeError, match="no attribute 'fitt'"):
        autotransfer.fitt
    # `autotransfer.plan` / `.profile` are the API's functions, not the submodules of the same
    # names, whether the command line imported those submodules first or not (fresh processes)
    for first in ("import autotransfer", "import autotransfer, autotransfer.cli, autotransfer.plan, autotransfer.profile"):
        code = f"{first}\nf = autotransfer.plan\nprint(callable(f), f is autotransfer.plan, callable(autotransfer.profile))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.stdout.split() == ["True", "True", "True"], (first, done.stdout, done.stderr)


def test_the_model_file_of_the_bad_model_cases_loads_unchanged(tmp_path, image_folder):
    ok("predict", _model_file(tmp_path), image_folder / "red" / "00.jpg")


def _read_only(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


def _writes_despite_chmod(folder: Path) -> bool:
    try:
        (_read_only(folder) / "x").touch()
    except PermissionError:
        return False
    return True


UNWRITABLE = {  # (arguments, environment) -> match
    "cache-under-a-file": (
        lambda t, d, run_dir: (["fit", d, "--backbone", "test_efficientnet", "--strategy", "frozen", *FAST_CLI,
                                "--out", t / "run"], {"AUTOTRANSFER_CACHE": _file(t / "a-file") / "cache"}),
        r"Not a directory; it is in autotransfer's cache; point AUTOTRANSFER_CACHE to a writable folder",
    ),
    "read-only-cache": (
        lambda t, d, run_dir: (["fit", d, "--backbone", "test_efficientnet", "--strategy", "frozen", *FAST_CLI,
                                "--out", t / "run"], {"AUTOTRANSFER_CACHE": _read_only(t / "cache")}),
        r"Permission denied; it is in autotransfer's cache; point AUTOTRANSFER_CACHE",
    ),
    "read-only-out": (
        lambda t, d, run_dir: (["fit", d, "--backbone", "test_efficientnet", "--strategy", "frozen", *FAST_CLI,
                                "--out", _read_only(t / "run")], {}),
        r"Permission denied; make it readable and writable \(chmod u\+rw\) or pass another path",
    ),
    "read-only-run": (
        lambda t, d, run_dir: (["report", _read_only(shutil.copytree(run_dir, t / "run")), "--no-progress"], {}),
        r"run/report': Permission denied; make it readable and writable",
    ),
}


@pytest.mark.parametrize("case", list(UNWRITABLE))
def test_unwritable_places_are_one_line_exit_1(case, tmp_path, image_folder, frozen_run, monkeypatch):
    if case.startswith("read-only") and _writes_despite_chmod(tmp_path / "probe"):
        pytest.skip("this user (root) writes into read-only folders; cache-under-a-file and out-under-a-file "
                    "take the same way out")
    make, match = UNWRITABLE[case]
    args, env = make(tmp_path, image_folder, frozen_run)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    _one_line_error(run(*args), match)


def test_bugs_keep_their_traceback_and_ask_to_be_reported(monkeypatch, tmp_path):
    monkeypatch.setattr("autotransfer.api.load", lambda *args: {}["a bug"])
    result = run("predict", tmp_path, tmp_path / "x.jpg")
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    notes = getattr(result.exception, "__notes__", None) or [result.stderr]  # Python 3.10: no notes
    assert any("please report it" in note for note in notes)


def test_usage_errors_exit_2():
    result = run("fit", "somewhere", "--strategy", "half")
    assert result.exit_code == 2
    assert "Invalid value for '--strategy'" in result.output


@pytest.mark.parametrize("command", ["fit", "plan"])
@pytest.mark.parametrize("option", [["--feature-level", "2"], ["--all-levels"]])
def test_depth_options_without_strategy_are_usage_errors(command, option, image_folder):
    """A decision picks the depth itself: a given one would be silently dropped."""
    result = run(command, image_folder, *option)
    assert result.exit_code == 2, result.output
    assert f"{option[0]}" in result.output and "add --strategy frozen" in result.output


def test_version():
    assert ok("--version").stdout.strip() == f"autotransfer, version {__version__}"


def test_python_m_autotransfer_help():
    done = subprocess.run(
        [sys.executable, "-m", "autotransfer", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: ")
    for command in ("fit", "evaluate", "predict", "backbones", "demo-data"):
        assert f"  {command} " in done.stdout


# ---------------------------------------------------------------- one RUN, one run (issue 16)


def _search_run(tmp: Path, data: Path, name: str = "R", finished: bool = True) -> Path:
    """A search RUN on `data` as `fit` leaves it (trials faked): search.json with the data's
    hash, a SQLite study in RUN, and either 2 finished trials adopted or 3 queued ones."""
    import os
    from test_search import BASE, fake_trial, rule_plans

    from autotransfer.data import scan_folder
    from autotransfer.search import SearchConfig, adopt_best, default_storage, enqueue_plans, fill_queue, open_study, run_search
    from autotransfer.selector import data_hash

    out = tmp / name
    out.mkdir()
    config = SearchConfig(
        data=str(data), storage=default_storage(out), backbones=[BASE.backbone], base=BASE, trials=2 if finished else 3,
        data_hash=data_hash(scan_folder(data, BASE.val_fraction, BASE.seed)),
    )
    config.save(out)
    study = open_study(config)
    enqueue_plans(study, rule_plans(), config.backbones)
    fill_queue(study, config.trials)
    if finished:
        run_search(study, config, out, fake_trial)
        adopt_best(study, out)
    assert os.listdir(out)
    return out


def _with(path: Path, name: str) -> Path:
    (path / name).write_text("mine")
    return path


RUN_ERRORS = {
    "fit-into-a-search-run": (
        lambda t, d: ["fit", d, "--trials", "2", "--out", _search_run(t, d)],
        r"--out .*/R is not empty \(leaderboard\.csv, metrics\.json, model\.pt, \.\.\.\); a RUN holds one run: continue "
        r"its search with `autotransfer fit .* --resume --out .*/R`, choose a new --out, or add --overwrite",
    ),
    "explicit-fit-into-a-search-run": (
        lambda t, d: ["fit", d, "--strategy", "frozen", *FAST_CLI, "--out", _search_run(t, d)],
        r"--out .*/R is not empty .*add --overwrite to replace it",
    ),
    "fit-into-an-explicit-run": (
        lambda t, d: ["fit", d, "--trials", "2", "--out", (t / "E").mkdir() or _with(t / "E", "plan.json")],
        r"--out .*/E is not empty \(plan\.json\); a RUN holds one run: choose a new --out, or add --overwrite",
    ),
    "overwrite-keeps-what-autotransfer-did-not-write": (
        lambda t, d: ["fit", d, "--strategy", "frozen", "--out", _with(_search_run(t, d), "notes.txt"), "--overwrite"],
        r"--overwrite would delete .*/R/notes\.txt, which autotransfer did not write",
    ),
    "resume-on-other-data": (
        lambda t, d: ["fit", write_classes(t / "other", 3, {"cats": COLOURS["red"], "dogs": COLOURS["blue"]}),
                      "--resume", "--out", _search_run(t, d)],
        r"other is not the data the search in .*/R ran on \(.*colours; its classes, files or labels differ\)",
    ),
    "resume-without-its-study": (
        lambda t, d: ["fit", d, "--resume", "--out", _without(_search_run(t, d), "study.db")],
        r"the study of .*/R is not in its storage .*/R/study\.db; restore it, or start again",
    ),
}


def _without(path: Path, name: str) -> Path:
    (path / name).unlink()
    return path


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_a_run_holds_one_run_and_says_so_in_one_line(case, tmp_path, image_folder):
    make_args, match = RUN_ERRORS[case]
    _one_line_error(run(*make_args(tmp_path, image_folder)), match)


def test_overwrite_replaces_a_search_run_by_an_explicit_one(tmp_path, image_folder):
    out = _search_run(tmp_path, image_folder)
    ok("fit", image_folder, "--backbone", "test_efficientnet", "--strategy", "frozen", *FAST_CLI, "--out", out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "plan.json", "scan.json"]
    assert json.loads((out / "plan.json").read_text())["strategy"] == "frozen"
    assert torch.load(out / "model.pt", weights_only=True)["classes"] == CLASSES


def _fake_trials(monkeypatch, runner) -> None:
    monkeypatch.setattr("autotransfer.selector.trial_runner", lambda scan, log, budget=None: runner)


def test_ctrl_c_in_a_search_says_what_was_kept_exits_130_and_resume_reruns_the_trial(tmp_path, image_folder, monkeypatch):
    import optuna
    from test_search import _interrupted_in_fine_tuning, _rules_fine_tune_ran_again, fake_trial

    out = _search_run(tmp_path, image_folder, finished=False)
    _fake_trials(monkeypatch, _interrupted_in_fine_tuning("lightning"))
    stopped = run("fit", image_folder, "--resume", "--out", out)
    assert stopped.exit_code == 130, stopped.output
    assert "Traceback" not in stopped.output
    assert stopped.stderr.splitlines() == [
        f"interrupted: {out} keeps 1 finished trial(s), 2 queued (1 after an interruption), 1 failed; "
        f"continue with `autotransfer fit {image_folder} --resume --out {out}`"
    ]

    _fake_trials(monkeypatch, fake_trial)
    resumed = ok("fit", image_folder, "--resume", "--out", out)
    assert f"resuming the search in {out}: 1 finished trial(s), 2 queued (1 after an interruption), 1 failed" in resumed.stdout
    _rules_fine_tune_ran_again(optuna.load_study(study_name="autotransfer", storage=f"sqlite:///{out / 'study.db'}"), 1)


SIGTERM_IN_FINE_TUNING = """
import os, signal
from autotransfer.cli import main
from autotransfer.train import ClassifierTask

real_step = ClassifierTask.training_step

def terminated(self, batch, index):
    os.killpg(0, signal.SIGTERM)  # as `kill -TERM -PGID`, `timeout` or a scheduler: the loader's workers get it too
    return real_step(self, batch, index)

ClassifierTask.training_step = terminated
main({args!r})
"""


def test_sigterm_in_a_search_is_ctrl_c_and_resume_reruns_the_trials_own_plan(tmp_path, image_folder):
    """SIGTERM to the whole process group in a real fine-tuning trial (the rules rank the
    first one 6th here), with loader workers. Without its own handler the trial died of the
    workers' deaths (a DataLoader error, a failed trial whose Plan the resume replaced by a
    sampled one)."""
    import os
    import signal
    import subprocess
    import sys

    import optuna

    out = tmp_path / "R"
    args = ["fit", str(image_folder), "--backbone", "test_efficientnet", "--trials", "6", *FAST_CLI, "--out", str(out)]
    stopped = subprocess.run([sys.executable, "-c", SIGTERM_IN_FINE_TUNING.format(args=args)], capture_output=True,
                             text=True, timeout=300, start_new_session=True, env={**os.environ, "AUTOTRANSFER_WORKERS": "2"})
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.splitlines()[-1].startswith(f"interrupted: {out} keeps "), stopped.stderr
    study = optuna.load_study(study_name="autotransfer", storage=f"sqlite:///{out / 'study.db'}")
    (failed,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert failed.user_attrs["plan"]["strategy"] != "frozen"
    (retry,) = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == failed.number]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["fixed_params"] == failed.params

    ok("fit", image_folder, "--resume", "--out", out)
    study = optuna.load_study(study_name="autotransfer", storage=f"sqlite:///{out / 'study.db'}")
    rerun = study.trials[retry.number]
    assert rerun.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # it ran
    assert rerun.user_attrs["plan"] == failed.user_attrs["plan"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the resume in this process gave it back


def test_ctrl_c_in_an_explicit_fit_keeps_the_best_weights_and_exits_130(tmp_path, image_folder, monkeypatch):
    import os
    import signal

    from autotransfer.train import ClassifierTask

    real_step = ClassifierTask.training_step

    def ctrl_c(self, batch, index):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: Python raises it inside this step
        return real_step(self, batch, index)

    monkeypatch.setattr(ClassifierTask, "training_step", ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    try:
        result = run("fit", image_folder, "--backbone", "test_efficientnet", "--strategy", "full", *FAST_CLI, "--out", out)
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert restored is handler  # Lightning set it to SIG_IGN: the next Ctrl-C (a notebook's) would do nothing
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: {out}/model.pt keeps the best weights of the finetune stage so far (metrics.json says "
        "\"interrupted\"); train again with --overwrite"
    )
    assert "Traceback" not in result.output
    assert json.loads((out / "metrics.json").read_text())["interrupted"] == "finetune"


def test_ctrl_c_leaves_ctrl_c_working_after_lightning_ignored_it():
    """Lightning sets SIGINT to SIG_IGN when it catches a Ctrl-C (for its shutdown) and
    never restores it: a notebook could not be interrupted again, a test after it neither."""
    import signal

    from autotransfer.errors import Interrupted, interruptible

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Interrupted, match="kept"):
            with interruptible(lambda: "kept"):
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # what pytorch_lightning/trainer/call.py does
                raise KeyboardInterrupt
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert restored is handler


def test_a_moved_run_resumes_in_its_new_place(tmp_path, image_folder, monkeypatch):
    from test_search import fake_trial

    out = _search_run(tmp_path, image_folder)
    moved = shutil.move(out, tmp_path / "R2")
    out.mkdir()  # a new folder where the run was
    _fake_trials(monkeypatch, fake_trial)
    resumed = ok("fit", image_folder, "--resume", "--out", moved)
    assert f"resuming the search in {moved}: 2 finished trial(s), 0 queued" in resumed.stdout
    assert not any(out.iterdir())


def test_ctrl_c_in_a_worker_says_what_was_kept_and_exits_130(tmp_path, image_folder, monkeypatch):
    from test_search import _interrupted_in_fine_tuning

    out = _search_run(tmp_path, image_folder, finished=False)
    _fake_trials(monkeypatch, _interrupted_in_fine_tuning("keyboard"))
    stopped = run("worker", out)
    assert stopped.exit_code == 130, stopped.output
    assert stopped.stderr.splitlines()[-1] == (
        f"interrupted: {out}'s study keeps 1 finished trial(s), 2 queued (1 after an interruption), 1 failed; "
        f"any worker or `autotransfer fit DATA --resume --out {out}` runs the queued ones"
    )


def test_ctrl_c_in_any_other_command_is_one_line_and_exit_130(tmp_path, image_folder, monkeypatch):
    """profile, bench, evaluate...: no traceback and no click "Aborted!" (exit 1), but the
    same exit status as fit's (130) and a line saying what is kept."""
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("autotransfer.profile"), "profile_dataset", interrupted)
    stopped = run("profile", image_folder)
    assert stopped.exit_code == 130, stopped.output
    assert stopped.stderr.strip().splitlines() == [
        "interrupted: profile stopped by Ctrl-C; files it had finished (and feature caches) are kept, nothing half-written is"
    ]


# ---------------------------------------------------------------- output for logs and scripts (issue 18)


def test_a_piped_run_has_no_carriage_returns(image_folder, tmp_path):
    """Progress bars redraw their line with \\r: in a log file that is noise. Without
    --no-progress, a run whose output goes to pipes draws none (Lightning's, the feature
    pass's, the profile's) and prints whole lines only."""
    fast = [a for a in FAST_CLI if a != "--no-progress"]
    commands = {
        "fit": ["fit", image_folder, "--backbone", "test_resnet", "--strategy", "full", *fast, "--out", tmp_path / "run"],
        "plan": ["plan", image_folder, *PROFILE_CLI[:-1], "--out", tmp_path / "plan.json"],
    }
    for name, args in commands.items():
        done = subprocess.run([sys.executable, "-m", "autotransfer", *map(str, args)], capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()
        assert b"\r" not in done.stdout + done.stderr, name
        assert done.stdout.endswith(b"\n"), name


def test_quiet_prints_only_the_result(image_folder, tmp_path):
    args = ["--backbone", "test_efficientnet", "--strategy", "frozen", *FAST_CLI]
    out = tmp_path / "run"
    lines = ok("fit", image_folder, *args, "--quiet", "--out", out).stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("done in ") and "val accuracy" in lines[0]
    assert lines[1] == f"run saved in {out}/ (model.pt, plan.json, metrics.json)"
    planned = ok("plan", image_folder, *PROFILE_CLI, "-q", "--out", tmp_path / "plan.json").stdout.splitlines()
    assert planned[0] == "ranked plans:" and planned[1].startswith("1. test_efficientnet")
    assert planned[-1].startswith("top plan written to ")


SEARCH_CLI = ["--backbone", "test_efficientnet", "--trials", "2", "--max-images", "24",
              *[a for a in FAST_CLI if a != "--no-progress"]]


def test_the_quick_start_on_a_terminal_shows_the_ranked_table_the_bar_and_the_decision(image_folder, tmp_path):
    """`autotransfer fit DATA` in a pseudo-terminal, as a user sees it; the same command
    piped into a log prints whole plain lines (no carriage return, no colour code) and
    decides the same."""
    command = [sys.executable, "-m", "autotransfer", "fit", str(image_folder), *SEARCH_CLI]
    screen = _in_a_terminal([*command, "--out", str(tmp_path / "tty")])
    table = screen[screen.index("ranked plans"):screen.index("(every reason")]
    assert re.search(r"#\s+backbone\s+plan\s+cost\s+why", table), screen
    assert re.search(r"1\s+test_efficientnet\s+frozen @ top\s+1 pass\s+6 images/class", table), screen
    assert "trial 0 balanced accuracy 1.0000 (cross-validated)" in screen
    assert re.search(r"search\s.*2/2 trials", screen), screen
    box = screen[screen.index("autotransfer fit: done"):]
    assert re.search(r"decision\s+test_efficientnet, frozen extractor", box), screen
    assert re.search(r"why\s+won the search: trial \d of 2", box) and f"{tmp_path / 'tty'}/model.pt" in box

    piped = subprocess.run([*command, "--out", str(tmp_path / "log")], capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr.decode()
    assert b"\r" not in piped.stdout + piped.stderr and b"\x1b" not in piped.stdout + piped.stderr
    log = piped.stdout.decode().splitlines()
    assert re.fullmatch(r" *1 \| test_efficientnet \| frozen @ top +\| +1 pass \| 6 images/class.*", log[log.index("ranked plans (the rules' order; the search tries them first):") + 3])
    assert [line for line in log if line.startswith("decision: ")] == [f"decision: {_decision(tmp_path / 'tty')}"]
    assert (tmp_path / "log" / "plan.json").read_text() == (tmp_path / "tty" / "plan.json").read_text()


def _decision(run_dir: Path) -> str:
    from autotransfer.plan import Plan, describe

    return describe(Plan.load(run_dir / "plan.json"))


def _in_a_terminal(command: list[str], columns: int = 120) -> str:
    """What `command` shows in a pseudo-terminal COLUMNS wide, colour and cursor codes removed."""
    import fcntl
    import os
    import pty
    import select
    import termios

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(command, stdin=child_fd, stdout=child_fd, stderr=child_fd, close_fds=True,
                               env={**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns)})
    os.close(child_fd)
    shown = b""
    try:
        while True:
            ready, _, _ = select.select([main_fd], [], [], 300)
            assert ready, "no output for 300 s"
            try:
                chunk = os.read(main_fd, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main_fd)
        assert process.wait(timeout=60) == 0, shown.decode(errors="replace")[-3000:]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", shown.decode(errors="replace"))


def test_json_results_are_one_document_on_stdout(image_folder, tmp_path):
    out = tmp_path / "run"
    fitted = ok("fit", image_folder, *SEARCH_CLI, "--json", "--out", out)
    result = json.loads(fitted.stdout)
    assert result["decided"] is True and result["plan"] == json.loads((out / "plan.json").read_text())
    assert result["val"]["balanced_accuracy"] >= 5 / 6 and result["seconds"] > 0 and result["run"] == str(out)
    assert result["files"] == {name: str(out / name) for name in ("model.pt", "plan.json", "metrics.json", "leaderboard.csv")}
    assert "ranked plans" in fitted.stderr and "trial 1 balanced accuracy" in fitted.stderr

    planned = ok("plan", image_folder, *PROFILE_CLI, "--json", "--out", tmp_path / "plan.json")
    plans = json.loads(planned.stdout)
    assert plans[0] == json.loads((tmp_path / "plan.json").read_text()) and all(p["reasons"] for p in plans)
    assert f"{image_folder}: 3 classes" in planned.stderr

    profiled = ok("profile", image_folder, *PROFILE_CLI, "--json", "--out", tmp_path / "profile.json")
    assert json.loads(profiled.stdout) == json.loads((tmp_path / "profile.json").read_text())


def test_logger_tensorboard_writes_event_files_and_a_missing_logger_says_what_to_install(image_folder, tmp_path,
                                                                                         monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ok("fit", image_folder, "--backbone", "test_resnet", "--strategy", "full", *FAST_CLI, "--logger", "tensorboard",
       "--out", out)
    events = EventAccumulator(str(out / "logs" / "finetune"))
    events.Reload()
    assert {"val_balanced_acc", "train_loss"} <= set(events.Tags()["scalars"])
    assert not (out / "logs" / "finetune" / "metrics.csv").exists()

    for logger, package in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        with monkeypatch.context() as patched:
            for module in (package, "tensorboardX"):
                patched.setitem(sys.modules, module, None)  # as if not installed
            _one_line_error(run("fit", image_folder, "--logger", logger, "--out", tmp_path / logger),
                            rf"logger {logger} needs the {package} package, which is not installed: "
                            rf"pip install 'autotransfer\[{logger}\]'$")
        assert not (tmp_path / logger).exists()
