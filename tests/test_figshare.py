"""Tests of the figshare brain-tumour loader: layout checks, the fixed block split, box -> mask, on real and fake folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import shared_dataset
from medlens.data.figshare import (BLOCK, CLASSES, box_to_mask, load_arrays, parse_box_file, read_image, scan_folder,
                                   split_of)
from medlens.errors import InputError


def _fake_dataset(root: Path, numbers_per_class: dict[str, list[int]]) -> Path:
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in numbers_per_class.get(name, []):
            Image.fromarray((torch.arange(32 * 32).reshape(32, 32) % 251).to(torch.uint8).numpy()).save(root / name / f"{n}.jpg")
            (root / name / f"{n}.txt").write_text(f"{label} 0.5 0.25 0.5 0.25\n")
    return root


def test_split_by_blocks_of_30():
    assert [split_of(n) for n in (1, 30, 31, 150, 151, 180, 181, 300, 301)] == [
        "test", "test", "train", "train", "val", "val", "train", "train", "test"]
    splits = [split_of(n) for n in range(1, 3001)]
    assert splits.count("test") == 300 and splits.count("val") == 300 and splits.count("train") == 2400
    for block in range(100):  # one split per block of consecutive numbers
        assert len({split_of(block * BLOCK + k) for k in range(1, BLOCK + 1)}) == 1


def test_box_to_mask_matches_pixel_centre_rule():
    box = (0.5, 0.25, 0.5, 0.25)
    mask = box_to_mask(box, (16, 32))
    ref = torch.zeros(16, 32, dtype=torch.bool)
    for i in range(16):
        for j in range(32):
            x, y = (j + 0.5) / 32, (i + 0.5) / 16
            ref[i, j] = abs(x - 0.5) <= 0.25 and abs(y - 0.25) <= 0.125
    assert torch.equal(mask, ref)
    assert int(mask.sum()) == 4 * 16  # rows 2..5 (y centres 0.156..0.344), columns 8..23
    tiny = box_to_mask((0.5, 0.5, 0.001, 0.001), 10)
    assert int(tiny.sum()) == 1 and bool(tiny[5, 5])


def test_fake_folder_scans_and_loads(tmp_path):
    root = _fake_dataset(tmp_path / "ds", {"pituitary": [1, 2, 40], "meningioma": [160, 33], "glioma": [301, 3]})
    items = scan_folder(root)
    assert [s.number for s in items] == [1, 2, 3, 33, 40, 160, 301]
    assert {s.number: s.class_name for s in items}[160] == "meningioma"
    assert {s.number: s.split for s in items} == {1: "test", 2: "test", 3: "test", 33: "train", 40: "train", 160: "val", 301: "test"}
    test = load_arrays(root, "test", size=16)
    assert test["images"].shape == (4, 1, 16, 16) and test["images"].dtype == torch.uint8
    assert test["labels"].tolist() == [0, 0, 2, 2]
    assert read_image(root / "pituitary" / "1.jpg").shape == (1, 32, 32)


def test_missing_empty_and_mislabelled_folders_raise(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="none of the class folders"):
        scan_folder(tmp_path / "empty")
    root = _fake_dataset(tmp_path / "ds", {"pituitary": [1], "meningioma": [2], "glioma": [3]})
    (root / "glioma" / "3.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    with pytest.raises(InputError, match=r"3\.txt.*label 1.*mislabelled"):
        scan_folder(root)
    (root / "glioma" / "3.txt").write_text("2 0.5 half 0.2 0.2\n")
    with pytest.raises(InputError, match=r"3\.txt.*expected one line"):
        scan_folder(root)
    (root / "glioma" / "3.txt").unlink()
    with pytest.raises(InputError, match=r"3\.jpg has no box file"):
        scan_folder(root)
    only_two = _fake_dataset(tmp_path / "two", {"pituitary": [1]})
    (only_two / "glioma").rmdir()
    with pytest.raises(InputError, match="lacks the class folder"):
        scan_folder(only_two)
    with pytest.raises(InputError, match="box .* outside"):
        (tmp_path / "b.txt").write_text("0 0.5 0.5 1.5 0.2")
        parse_box_file(tmp_path / "b.txt")


def test_shared_dataset_split_is_disjoint_by_blocks():
    root = shared_dataset("brain-tumor-figshare")
    items = scan_folder(root)
    assert len(items) > 2000
    by_split = {s: {i.number for i in items if i.split == s} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"]) and not (by_split["val"] & by_split["test"])
    blocks = {s: {(n - 1) // BLOCK for n in nums} for s, nums in by_split.items()}
    assert not (blocks["train"] & blocks["test"]) and not (blocks["val"] & blocks["test"]) and not (blocks["train"] & blocks["val"])
    for s in ("train", "val", "test"):
        assert {i.label for i in items if i.split == s} == {0, 1, 2}
    assert 0.07 < len(by_split["test"]) / len(items) < 0.13


def test_shared_dataset_boxes_make_masks_on_the_tumour():
    root = shared_dataset("brain-tumor-figshare")
    items = scan_folder(root, splits=["test"])[::16]
    brighter = 0
    for s in items:
        img = read_image(s.image_path)[0].float()
        mask = box_to_mask(s.box, img.shape)
        assert abs(int(mask.sum()) - s.box[2] * s.box[3] * img.numel()) <= 2 * (s.box[2] + s.box[3]) * 512 + 4
        brighter += bool(img[mask].mean() > img[img > 10].mean())
    # contrast-enhanced tumours are mostly brighter than the rest of the head
    assert brighter >= 0.6 * len(items)
