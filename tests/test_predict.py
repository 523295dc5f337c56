from __future__ import annotations

import json
import shutil

import pytest

from autotransfer.errors import DataError
from autotransfer.predict import evaluate_folder, predict_images
from conftest import CLASSES, COLOURS, photo, write_classes


def test_evaluate_takes_the_test_split_first(frozen_run, split_folder):
    report = evaluate_folder(frozen_run, split_folder)
    assert report["split"] == "test"
    assert report["n"] == 6
    assert report["accuracy"] == 1.0 and report["macro_f1"] == 1.0
    assert report["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert report["per_class_accuracy"] == {name: 1.0 for name in CLASSES}
    assert report["skipped"] == []


def test_evaluate_a_chosen_split_and_a_class_folder_layout(frozen_run, split_folder, image_folder):
    assert evaluate_folder(frozen_run, split_folder, split="train")["n"] == 18
    report = evaluate_folder(frozen_run, image_folder)
    assert (report["split"], report["n"]) == ("all", 24)
    assert report["accuracy"] >= 23 / 24


def test_evaluate_val_on_class_folders_redraws_the_runs_split(class_folder_run, image_folder):
    report = evaluate_folder(class_folder_run, image_folder, split="val")
    val = json.loads((class_folder_run / "metrics.json").read_text())["val"]
    assert (report["split"], report["n"]) == ("val", 12)  # 0.5 of 8 per class, not the default 0.2
    assert report["confusion_matrix"] == val["confusion_matrix"]
    assert evaluate_folder(class_folder_run / "model.pt", image_folder, split="val")["n"] == 12


def test_evaluate_remaps_a_subset_of_classes(frozen_run, tmp_path):
    # two of the model's three classes, so folder labels (0, 1) != model labels (1, 2)
    data = write_classes(tmp_path / "data", per_class=3, classes={k: COLOURS[k] for k in ("green", "red")}, seed=5)
    report = evaluate_folder(frozen_run, data)
    assert report["accuracy"] == 1.0
    assert report["confusion_matrix"] == [[0, 0, 0], [0, 3, 0], [0, 0, 3]]
    assert report["per_class_accuracy"]["blue"] is None  # no blue images: no accuracy


def test_evaluate_errors(frozen_run, split_folder, image_folder, tmp_path):
    with pytest.raises(DataError, match=r"has no test/ folder, only class folders; pass --split val"):
        evaluate_folder(frozen_run, image_folder, split="test")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(frozen_run / "model.pt", bare)
    with pytest.raises(DataError, match=r"has no val/ folder and .*bare has no plan.json"):
        evaluate_folder(bare, image_folder, split="val")
    no_test = shutil.copytree(split_folder / "train", tmp_path / "no-test" / "train")
    with pytest.raises(DataError, match=r"has no test/ folder \(found train/\); pass --split"):
        evaluate_folder(frozen_run, no_test.parent, split="test")
    data = shutil.copytree(split_folder / "test", tmp_path / "data")
    write_classes(data, per_class=2, classes={"purple": (128, 0, 128)})
    with pytest.raises(DataError, match=r"classes the model does not know \(purple\); the model knows: blue, green, red"):
        evaluate_folder(frozen_run, data)


def test_predict_images_top_k(frozen_run, tmp_path):
    paths = []
    for name in ("red", "blue"):
        paths.append(tmp_path / f"{name}.png")
        photo(COLOURS[name], seed=77).save(paths[-1])
    results = predict_images(frozen_run, paths, top_k=2)
    assert [r["image"] for r in results] == [str(p) for p in paths]
    for result, truth in zip(results, ("red", "blue")):
        probs = [p["probability"] for p in result["top_k"]]
        assert len(probs) == 2
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6 and all(0 <= p <= 1 for p in probs)
        assert result["top_k"][0]["class"] == truth


def test_predict_top_k_is_capped_by_the_class_count(frozen_run, tmp_path):
    photo(COLOURS["green"], seed=1).save(tmp_path / "g.jpg")
    (result,) = predict_images(frozen_run, [tmp_path / "g.jpg"], top_k=10)
    assert sorted(p["class"] for p in result["top_k"]) == CLASSES
    assert sum(p["probability"] for p in result["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_image_errors(frozen_run, tmp_path):
    with pytest.raises(DataError, match=r"image '.*nope\.jpg' not found"):
        predict_images(frozen_run, [tmp_path / "nope.jpg"])
    (tmp_path / "fake.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"'.*fake\.jpg' is not a readable image"):
        predict_images(frozen_run, [tmp_path / "fake.jpg"])
