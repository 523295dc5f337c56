from __future__ import annotations

import io
import os
import shutil
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autotransfer.data import ImageRecord, load_rgb, scan_folder, stratified_split
from autotransfer.errors import DataError
from conftest import CLASSES, COLOURS, IMAGE_PX, photo, write_classes

# ---------------------------------------------------------------- load_rgb


def _rgba(path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 1), (0, 0, 255, 255))  # one opaque blue pixel
    image.save(path)


def _palette(path: Path, transparent: bool) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    image.save(path, **({"transparency": 0} if transparent else {}))


def _grey(path: Path) -> None:
    Image.new("L", (8, 8), 100).save(path)


def _sixteen_bit(path: Path) -> None:
    pixels = np.full((8, 8), 65535, dtype=np.uint16)
    pixels[0] = 0
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    image.save(path)


@pytest.mark.parametrize(
    "write, name, expected",
    [
        # composited on white: transparent pixels turn white, opaque ones keep their colour
        (_rgba, "rgba.png", {(0, 0): (255, 255, 255), (1, 1): (0, 0, 255)}),
        (lambda p: _palette(p, transparent=False), "palette.png",
         {(0, 0): (0, 0, 0), (1, 1): (10, 200, 30)}),
        (lambda p: _palette(p, transparent=True), "palette-alpha.png",
         {(0, 0): (255, 255, 255), (1, 1): (10, 200, 30)}),
        (lambda p: _palette(p, transparent=False), "palette.gif",
         {(0, 0): (0, 0, 0), (1, 1): (10, 200, 30)}),
        (_grey, "grey.png", {(0, 0): (100, 100, 100)}),
        (_sixteen_bit, "sixteen.png", {(0, 0): (0, 0, 0), (0, 5): (255, 255, 255)}),
    ],
    ids=["RGBA", "P", "P-transparency", "P-gif", "L", "I;16"],
)
def test_load_rgb_converts_every_mode_to_8bit_rgb(tmp_path, write, name, expected):
    path = tmp_path / name
    write(path)
    assert Image.open(path).mode != "RGB"  # the file really is in the odd mode
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.size == (8, 8)
    for xy, rgb in expected.items():
        assert image.getpixel(xy) == rgb


def test_load_rgb_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


# ---------------------------------------------------------------- scan_folder: layouts


def test_scan_class_folders_draws_stratified_validation(image_folder):
    scan = scan_folder(image_folder, val_fraction=0.25, seed=0)
    assert scan.layout == "class-folders"
    assert scan.classes == CLASSES
    assert scan.skipped == []
    assert set(scan.splits) == {"train", "val"}
    assert Counter(r.label for r in scan.splits["train"]) == {0: 6, 1: 6, 2: 6}
    assert Counter(r.label for r in scan.splits["val"]) == {0: 2, 1: 2, 2: 2}
    for record in scan.splits["train"] + scan.splits["val"]:
        assert Path(record.path).parent.name == CLASSES[record.label]
        assert (record.format, record.mode, record.width) == ("JPEG", "RGB", 40)
        assert record.colours > 100  # noisy "photos"


def test_scan_without_val_fraction_keeps_everything_in_train(image_folder):
    scan = scan_folder(image_folder, val_fraction=None)
    assert set(scan.splits) == {"train"}
    assert len(scan.splits["train"]) == 24


def test_scan_split_folders_and_valid_alias(tmp_path):
    write_classes(tmp_path / "train", per_class=3)
    write_classes(tmp_path / "valid", per_class=2, seed=1)  # alias of val
    write_classes(tmp_path / "test", per_class=1, seed=2)
    scan = scan_folder(tmp_path)
    assert scan.layout == "splits"
    assert {s: len(r) for s, r in scan.splits.items()} == {"train": 9, "val": 6, "test": 3}
    assert all("/valid/" in r.path for r in scan.splits["val"])


# ---------------------------------------------------------------- scan_folder: skipped files


def test_scan_skips_and_lists_unusable_files(tmp_path):
    write_classes(tmp_path, per_class=12, classes={"red": COLOURS["red"], "blue": COLOURS["blue"]})
    red = tmp_path / "red"
    buffer = io.BytesIO()
    photo(COLOURS["red"], seed=99, size=64).save(buffer, "JPEG")
    (red / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (red / "notes.txt").write_text("not an image")
    (red / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(600))
    Image.new("P", (40, 40), 0).save(red / "not-found.gif")  # a one-colour placeholder
    (red / ".DS_Store").write_bytes(b"hidden files are not looked at")

    scan = scan_folder(tmp_path, val_fraction=None)

    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert set(reasons) == {"truncated.jpg", "notes.txt", "noise.jpg", "not-found.gif"}
    assert reasons["truncated.jpg"].startswith("truncated image")
    assert reasons["notes.txt"].startswith("not a readable image")
    assert reasons["noise.jpg"].startswith("not a readable image")
    assert reasons["not-found.gif"].startswith("looks like a placeholder")
    kept = {Path(r.path).name for r in scan.splits["train"]}
    assert not kept & set(reasons)
    assert Counter(r.label for r in scan.splits["train"]) == {0: 12, 1: 12}


def test_scan_in_small_chunks_finds_the_same(tmp_path, monkeypatch):
    """The scan inspects files a chunk at a time (bounded memory on 100,000 files); chunk
    edges change nothing: same records, labels, order and skipped files."""
    write_classes(tmp_path, per_class=12, classes={"red": COLOURS["red"], "blue": COLOURS["blue"]})
    (tmp_path / "red" / "notes.txt").write_text("not an image")
    whole = scan_folder(tmp_path)
    monkeypatch.setattr("autotransfer.data.SCAN_CHUNK", 5)
    chunked = scan_folder(tmp_path)
    assert chunked.splits == whole.splits and chunked.skipped == whole.skipped
    assert len(whole.skipped) == 1 and sum(map(len, whole.splits.values())) == 24

def test_placeholder_rule_needs_ten_files_and_few_colours(tmp_path):
    """A GIF is judged only against a class of 10+ files and only when nearly flat."""
    write_classes(tmp_path / "small", per_class=5, classes={"a": COLOURS["red"], "b": COLOURS["blue"]})
    Image.new("P", (40, 40), 0).save(tmp_path / "small" / "a" / "flat.gif")
    write_classes(tmp_path / "big", per_class=12, classes={"a": COLOURS["red"], "b": COLOURS["blue"]})
    photo(COLOURS["red"], seed=7).quantize(256).save(tmp_path / "big" / "a" / "colourful.gif")

    for folder, name in [("small", "flat.gif"), ("big", "colourful.gif")]:
        scan = scan_folder(tmp_path / folder, val_fraction=None)
        assert scan.skipped == []
        assert name in {Path(r.path).name for r in scan.splits["train"]}


def test_greyscale_dataset_is_not_taken_for_placeholders(tmp_path):
    for name, level in [("dark", 30), ("light", 220)]:
        (tmp_path / name).mkdir()
        for i in range(12):
            fmt = "gif" if i == 0 else "png"
            Image.new("L", (32, 32), level + i).save(tmp_path / name / f"{i}.{fmt}")
    scan = scan_folder(tmp_path, val_fraction=None)
    assert scan.skipped == []
    assert len(scan.splits["train"]) == 24


# ---------------------------------------------------------------- scan_folder: errors


def _missing(root: Path) -> Path:
    return root / "nowhere"


def _a_file(root: Path) -> Path:
    (root / "data.zip").write_bytes(b"PK")
    return root / "data.zip"


def _empty(root: Path) -> Path:
    (root / "data").mkdir()
    (root / "data" / "readme.txt").write_text("no class folders here")
    return root / "data"


def _one_class(root: Path) -> Path:
    return write_classes(root / "data", per_class=3, classes={"cats": COLOURS["red"]})


def _unreadable_class(root: Path) -> Path:
    write_classes(root / "data", per_class=3, classes={"cats": COLOURS["red"]})
    (root / "data" / "dogs").mkdir()
    (root / "data" / "dogs" / "dog.jpg").write_text("<html>404</html>")
    return root / "data"


def _empty_class(root: Path) -> Path:
    write_classes(root / "data", per_class=3, classes={"cats": COLOURS["red"]})
    (root / "data" / "dogs").mkdir()
    return root / "data"


def _val_without_train(root: Path) -> Path:
    return write_classes(root / "data" / "val", per_class=2).parent


def _unknown_class_in_val(root: Path) -> Path:
    write_classes(root / "data" / "train", per_class=2)
    write_classes(root / "data" / "val", per_class=1, classes={"purple": (128, 0, 128)})
    return root / "data"


@pytest.mark.parametrize(
    "make, match",
    [
        (_missing, r"nowhere does not exist; expected a folder like .*nowhere/<class>/<image>"),
        (_a_file, r"data\.zip is a file; expected a folder"),
        (_empty, r"data has 0 class folders; need at least 2"),
        (_one_class, r"data has 1 class folder \('cats'\); need at least 2"),
        (_unreadable_class, r"class 'dogs' has no readable image in .*data/dogs"),
        (_empty_class, r"class 'dogs' has no readable image"),
        (_val_without_train, r"data has val/ but no train/; add .*data/train/<class>"),
        (_unknown_class_in_val, r"purple is a class that .*train does not have"),
    ],
    ids=["missing", "file", "no-classes", "one-class", "unreadable-class", "empty-class",
         "val-without-train", "unknown-val-class"],
)
def test_scan_rejects_bad_folders(tmp_path, make, match):
    with pytest.raises(DataError, match=match) as info:
        scan_folder(make(tmp_path))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- stratified_split


def _records(counts: dict[int, int]) -> list[ImageRecord]:
    return [
        ImageRecord(f"/d/{label}/{i:03d}.jpg", label, f"{label}-{i}", "JPEG", "RGB", 8, 8, 64)
        for label, n in counts.items() for i in range(n)
    ]


def test_stratified_split_is_seeded():
    records = _records({0: 20, 1: 20})
    first = stratified_split(records, 0.25, seed=3)
    assert stratified_split(list(reversed(records)), 0.25, seed=3) == first  # order-free
    assert stratified_split(records, 0.25, seed=4) != first
    train, val = first
    assert sorted(train + val, key=lambda r: r.path) == sorted(records, key=lambda r: r.path)
    assert not {r.path for r in train} & {r.path for r in val}


def test_stratified_split_keeps_class_proportions():
    train, val = stratified_split(_records({0: 40, 1: 10, 2: 20}), 0.2, seed=0)
    assert Counter(r.label for r in val) == {0: 8, 1: 2, 2: 4}
    assert Counter(r.label for r in train) == {0: 32, 1: 8, 2: 16}


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_stratified_split_keeps_one_image_on_each_side(fraction):
    train, val = stratified_split(_records({0: 2, 1: 3, 2: 30}), fraction, seed=0)
    for label in (0, 1, 2):
        assert any(r.label == label for r in train)
        assert any(r.label == label for r in val)


@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.9])
def test_stratified_split_keeps_a_single_image_in_train(fraction):
    train, val = stratified_split(_records({0: 1, 1: 10}), fraction, seed=0)
    assert [r.label for r in train].count(0) == 1
    assert [r.label for r in val].count(0) == 0


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_stratified_split_rejects_bad_fractions(fraction):
    with pytest.raises(DataError, match=f"but got {fraction}"):
        stratified_split(_records({0: 4, 1: 4}), fraction, seed=0)


# ---------------------------------------------------------------- content_hash


def test_content_hash_changes_iff_a_file_changes(image_folder, tmp_path):
    data = shutil.copytree(image_folder, tmp_path / "data")
    before = scan_folder(data, val_fraction=None).content_hash("train")
    assert scan_folder(data, val_fraction=None).content_hash("train") == before

    target = data / "red" / "03.jpg"
    stat = target.stat()
    photo(COLOURS["red"], seed=12345).save(target, quality=92)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: content counts
    changed = scan_folder(data, val_fraction=None).content_hash("train")
    assert changed != before

    (data / "red" / "03.jpg").rename(data / "green" / "moved.jpg")  # same bytes, other label
    assert scan_folder(data, val_fraction=None).content_hash("train") not in (before, changed)


# ---------------------------------------------------------------- scan_folder: what is not DATA


def _two_classes(root: Path, per_class: int = 3) -> Path:
    return write_classes(root, per_class=per_class, classes={"cats": COLOURS["red"], "dogs": COLOURS["blue"]})


def _names(records: list[ImageRecord]) -> list[str]:
    return sorted(Path(r.path).relative_to(Path(r.path).parents[1]).as_posix() for r in records)


def test_scan_skips_and_lists_symlinks_that_leave_data(tmp_path):
    data = _two_classes(tmp_path / "data")
    elsewhere = write_classes(tmp_path / "elsewhere", per_class=2, classes={"birds": COLOURS["green"]}, seed=5)
    (data / "birds").symlink_to(elsewhere / "birds")  # a class folder that lives elsewhere
    (data / "cats" / "far.jpg").symlink_to(elsewhere / "birds" / "00.jpg")  # one file that does
    (data / "cats" / "nested").symlink_to(elsewhere / "birds")  # a folder deeper down
    (data / "dogs" / "near.jpg").symlink_to(data / "dogs" / "00.jpg")  # inside DATA: a plain duplicate

    scan = scan_folder(data, val_fraction=None)

    assert scan.classes == ["cats", "dogs"]
    reasons = {Path(s.path).relative_to(data).as_posix(): s.reason for s in scan.skipped}
    assert set(reasons) == {"birds", "cats/far.jpg", "cats/nested"}
    for reason in reasons.values():
        assert "outside" in reason and str(elsewhere) in reason and "AUTOTRANSFER_FOLLOW_SYMLINKS" in reason
    assert _names(scan.splits["train"]) == [*(f"cats/{i:02d}.jpg" for i in range(3)),
                                            *(f"dogs/{i:02d}.jpg" for i in range(3)), "dogs/near.jpg"]

    followed = scan_folder(data, val_fraction=None, follow_symlinks=True)
    assert followed.classes == ["birds", "cats", "dogs"] and followed.skipped == []
    assert len(followed.splits["train"]) == 2 + (3 + 1 + 2) + (3 + 1)


def test_follow_symlinks_comes_from_the_environment(tmp_path, monkeypatch):
    data = _two_classes(tmp_path / "data")
    write_classes(tmp_path / "elsewhere", per_class=2, classes={"birds": COLOURS["green"]})
    (data / "birds").symlink_to(tmp_path / "elsewhere" / "birds")
    monkeypatch.setenv("AUTOTRANSFER_FOLLOW_SYMLINKS", "1")
    assert scan_folder(data, val_fraction=None).classes == ["birds", "cats", "dogs"]


def test_scan_never_follows_symlink_loops(tmp_path):
    data = _two_classes(tmp_path / "data")
    (data / "everything").symlink_to(data)  # a class linked to DATA itself: every class again
    (data / "up").symlink_to(tmp_path)  # a folder that holds DATA (as `/` does)
    (data / "cats" / "again").symlink_to(data / "cats")  # a class inside itself
    (data / "dogs" / "loop").symlink_to(data / "dogs" / "loop")  # a link to itself
    (data / "dogs" / "gone.jpg").symlink_to(data / "nowhere.jpg")  # a dangling link

    for follow in (False, True):
        scan = scan_folder(data, val_fraction=None, follow_symlinks=follow)
        assert scan.classes == ["cats", "dogs"]
        assert len(scan.splits["train"]) == 6
        reasons = {Path(s.path).relative_to(data).as_posix(): s.reason for s in scan.skipped}
        assert set(reasons) == {"everything", "up", "cats/again", "dogs/loop", "dogs/gone.jpg"}
        for name in ("everything", "up", "cats/again"):
            assert "loop" in reasons[name]
        assert "broken" in reasons["dogs/loop"] and "broken" in reasons["dogs/gone.jpg"]


def test_a_class_of_symlinks_only_says_how_to_follow_them(tmp_path):
    data = _two_classes(tmp_path / "data")
    write_classes(tmp_path / "pool", per_class=2, classes={"birds": COLOURS["green"]})
    (data / "birds").mkdir()
    for image in (tmp_path / "pool" / "birds").iterdir():
        (data / "birds" / image.name).symlink_to(image)
    with pytest.raises(DataError, match=r"class 'birds' has no readable image .*2 symlink\(s\) out of DATA "
                                        r"skipped; AUTOTRANSFER_FOLLOW_SYMLINKS=1 follows them") as info:
        scan_folder(data)
    assert "\n" not in str(info.value)


def test_scan_skips_run_folders(tmp_path):
    """A RUN written into DATA (`fit DATA --out DATA/run`, or `fit .` run inside DATA)
    is not a class on the next fit, and its figures are not training images."""
    data = _two_classes(tmp_path / "data")
    for run in (data / "run", data / "runs" / "data-auto", data / "cats" / "old"):
        run.mkdir(parents=True)
        (run / "plan.json").write_text("{}")
        photo(COLOURS["green"], seed=1).save(run / "figure.png")
    (data / "model-only").mkdir()
    (data / "model-only" / "model.pt").write_bytes(b"weights")
    (data / "fresh").mkdir()  # the RUN this command is about to write: still empty

    scan = scan_folder(data, val_fraction=None, exclude=[data / "fresh"])

    assert scan.classes == ["cats", "dogs"]
    assert _names(scan.splits["train"]) == [*(f"cats/{i:02d}.jpg" for i in range(3)), *(f"dogs/{i:02d}.jpg" for i in range(3))]
    reasons = {Path(s.path).relative_to(data).as_posix(): s.reason for s in scan.skipped}
    assert set(reasons) == {"run", "runs", "cats/old", "model-only", "fresh"}
    assert "plan.json" in reasons["run"] and "model.pt" in reasons["model-only"]
    assert "only RUN folders" in reasons["runs"]


# ---------------------------------------------------------------- stratified_split: duplicates


def _with_copies(counts: dict[int, int], copies: int, label_of_copy: int | None = None) -> list[ImageRecord]:
    """`copies` images of each class also saved under a second name (same sha1), in
    the same class or, with `label_of_copy`, in that one (a label conflict)."""
    records = _records(counts)
    for label in counts:
        for r in [r for r in records if r.label == label][:copies]:
            other = r.label if label_of_copy is None else label_of_copy
            records.append(replace(r, path=r.path.replace(".jpg", "-copy.jpg"), label=other))
    return records


def _sides(train: list[ImageRecord], val: list[ImageRecord]) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for side, records in (("train", train), ("val", val)):
        for r in records:
            sides.setdefault(r.sha1, set()).add(side)
    return sides


@pytest.mark.parametrize("label_of_copy", [None, 1], ids=["same-class", "label-conflict"])
def test_stratified_split_keeps_duplicates_on_one_side(label_of_copy):
    records = _with_copies({0: 20, 1: 20, 2: 10}, copies=6, label_of_copy=label_of_copy)
    for seed in range(20):
        train, val = stratified_split(records, 0.2, seed)
        assert all(len(sides) == 1 for sides in _sides(train, val).values()), seed
        assert sorted(train + val, key=lambda r: r.path) == sorted(records, key=lambda r: r.path)
        assert stratified_split(list(reversed(records)), 0.2, seed) == (train, val)  # seeded, order-free
        if label_of_copy is None:  # still stratified: each class's share of val, +-1 image for a pair
            for label, n in Counter(r.label for r in records).items():
                assert abs(sum(r.label == label for r in val) - round(n * 0.2)) <= 1, (seed, label)


def test_stratified_split_without_duplicates_is_unchanged():
    """No duplicates: the same split as before groups existed (runs drawn earlier keep their val)."""
    train, val = stratified_split(_records({0: 10, 1: 7}), 0.3, seed=5)
    assert [r.path for r in val] == [
        "/d/0/002.jpg", "/d/0/003.jpg", "/d/0/001.jpg", "/d/1/003.jpg", "/d/1/002.jpg",
    ]
    assert len(train) == 12


def test_stratified_split_copies_of_one_image_stay_in_train():
    records = _with_copies({0: 1, 1: 10}, copies=1)  # class 0: one image saved twice
    train, val = stratified_split(records, 0.5, seed=0)
    assert [r.label for r in train].count(0) == 2 and [r.label for r in val].count(0) == 0


def test_scan_draws_val_without_duplicates_across_it(tmp_path):
    data = _two_classes(tmp_path / "data", per_class=10)
    for i in range(5):
        shutil.copy(data / "cats" / f"{i:02d}.jpg", data / "cats" / f"copy{i}.jpg")
    for seed in range(5):
        scan = scan_folder(data, val_fraction=0.3, seed=seed)
        assert all(len(sides) == 1 for sides in _sides(scan.splits["train"], scan.splits["val"]).values())
        assert {r.label for r in scan.splits["val"]} == {0, 1}


# ---------------------------------------------------------------- scan_folder: threads and warnings


def test_scan_leaves_the_warning_filters_alone(tmp_path, monkeypatch):
    """Every file below warns (PIL's DecompressionBombWarning); the scan's worker threads
    must not leave a global filter behind (catch_warnings is not thread-safe)."""
    data = _two_classes(tmp_path / "data", per_class=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", IMAGE_PX * IMAGE_PX - 1)  # each 40x40 file is "too large"
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(data / "cats" / "00.jpg").close()
    before = list(warnings.filters)
    for _ in range(10):
        scan = scan_folder(data, val_fraction=None, workers=8)
        assert len(scan.splits["train"]) == 64
        assert warnings.filters == before
