from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from autotransfer.errors import PlanError
from autotransfer.plan import LIMITS, Compute, Plan, check_number


def test_defaults_are_a_valid_frozen_plan():
    plan = Plan("test_resnet")
    assert (plan.strategy, plan.cut, plan.feature_level, plan.bn_mode) == ("frozen", None, None, "frozen")


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"strategy": "half"}, r"strategy must be one of frozen, partial, full, but got 'half'"),
        ({"bn_mode": "adapt"}, r"bn_mode must be one of frozen, train, but got 'adapt'"),
        ({"strategy": "partial"}, r"strategy 'partial' needs a cut: --cut N"),
        ({"cut": 2}, r"--cut 2 only applies to strategy 'partial', not 'frozen'"),
        ({"strategy": "full", "cut": 3}, r"--cut 3 only applies to strategy 'partial', not 'full'"),
        ({"batch_size": -4}, r"batch_size must be at least 1, but got -4"),
        ({"epochs": -1}, r"epochs must be at least 0, but got -1"),
        ({"lr": 0.0}, r"lr must be positive, but got 0.0"),
        ({"backbone_lr_ratio": -0.5}, r"backbone_lr_ratio must be positive, but got -0.5"),
        ({"image_size": 8}, r"image_size must be at least 16 px, but got 8"),
        ({"all_levels": True, "strategy": "full"}, r"all_levels .* needs strategy 'frozen' and no feature_level, but got strategy 'full'"),
        ({"all_levels": True, "feature_level": 2}, r"all_levels .* but got strategy 'frozen', feature_level 2"),
        ({"all_levels_mode": "feature"}, r"all_levels_mode 'feature' says how every level is read at once; it needs all_levels true"),
        ({"all_levels": True, "all_levels_mode": "pca"}, r"all_levels_mode must be one of level, feature, ensemble, but got 'pca'"),
        ({"lr": float("nan")}, r"lr must be a finite number, but got nan"),
        ({"lr": float("inf")}, r"lr must be a finite number, but got inf"),
        ({"weight_decay": -1e-4}, r"weight_decay must be at least 0, but got -0.0001"),
        ({"backbone_lr_ratio": float("-inf")}, r"backbone_lr_ratio must be a finite number, but got -inf"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), but got 1.0"),
        ({"val_fraction": 0.0}, r"val_fraction must be between 0 and 1 \(exclusive\), but got 0.0"),
        ({"seed": -1}, r"seed must be between 0 and 2\*\*32 - 1, but got -1"),
        ({"seed": 2**32}, r"seed must be between 0 and 2\*\*32 - 1, but got 4294967296"),
        ({"compute": {"accelerator": "npu"}}, r"accelerator must be one of auto, cpu, gpu, cuda, mps, tpu, but got 'npu'"),
        ({"compute": {"devices": 0}}, r"devices must be a whole number of at least 1 or 'auto', but got 0"),
        ({"compute": {"devices": "2"}}, r"devices must be a whole number of at least 1 or 'auto', but got '2'"),
        ({"compute": {"precision": 16}}, r"precision must be one of 32, bf16-mixed, 16-mixed, but got 16"),
        ({"compute": {"gpus": 2}}, r"compute has unknown keys \['gpus'\]; known: \['accelerator', 'devices', 'precision'\]"),
        ({"compute": "gpu"}, r"compute has the wrong type: got 'gpu'"),
    ],
)
def test_inconsistent_plans_are_refused_quoting_the_value(fields, match):
    with pytest.raises(PlanError, match=match):
        Plan("test_resnet", **fields)


def test_plan_round_trips_through_json(tmp_path):
    plan = Plan(
        "test_vit", strategy="partial", cut=3, feature_level=4, bn_mode="train", weights="random",
        image_size=48, epochs=2, lr=0.05, seed=11, reasons=["small data"], compute=Compute("gpu", "auto", "bf16-mixed"),
    )
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["cut"] == 3 and data["compute"] == {"accelerator": "gpu", "devices": "auto", "precision": "bf16-mixed"}
    assert Plan.load(tmp_path / "plan.json") == plan
    del data["compute"]  # a plan.json from before it: one device, fp32
    (tmp_path / "plan.json").write_text(json.dumps(data))
    assert Plan.load(tmp_path / "plan.json").compute == Compute("auto", 1, "32")


def test_loading_a_plan_validates_it(tmp_path):
    data = json.loads(Plan("test_resnet").to_json())
    data["strategy"] = "partial"  # but no cut
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="needs a cut"):
        Plan.load(tmp_path / "plan.json")


def test_plan_file_with_unknown_keys_names_them(tmp_path):
    data = {**json.loads(Plan("test_resnet").to_json()), "epochz": 3}
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"unknown keys \['epochz'\]"):
        Plan.load(tmp_path / "plan.json")


def test_missing_or_broken_plan_file(tmp_path):
    with pytest.raises(PlanError, match=r"plan file '.*missing\.json' not found"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(PlanError, match=r"plan file '.*broken\.json' is not valid JSON"):
        Plan.load(tmp_path / "broken.json")
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(PlanError, match=r"plan file '.*binary\.json' is not valid JSON: 'utf-8' codec"):
        Plan.load(tmp_path / "binary.json")
    for text, found in (("null", "NoneType null"), ("3", "int 3"), ('["a"]', 'list ["a"]')):
        (tmp_path / "other.json").write_text(text)
        with pytest.raises(PlanError, match=rf"plan file '.*other\.json' holds {re.escape(found)}, not a Plan"):
            Plan.load(tmp_path / "other.json")


def test_options_are_checked_as_plan_fields_naming_the_option():
    check_number("lr", 0.1, "--lr")
    check_number("image_size", None, "--image-size")  # not set: the backbone's
    with pytest.raises(PlanError, match=r"^--lr must be a finite number, but got nan$"):
        check_number("lr", float("nan"), "--lr")
    assert set(LIMITS) <= {f.name for f in fields(Plan)}
    assert Compute.parse_devices(" auto ") == "auto" and Compute.parse_devices("4") == 4
    with pytest.raises(PlanError, match=r"^--devices must be a whole number of at least 1 or 'auto', but got '-1'$"):
        Compute.parse_devices("-1")
