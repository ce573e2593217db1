"""One rule for DICOM series folders: the batch finder and the reader accept and refuse the same folders, and the
reader says why it refuses one; the suffix table is the one both consult."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medlens.batch.inputs import discover
from medlens.errors import InputError
from medlens.io import read_image
from medlens.io.scan import FILE_TYPES, image_stem, image_suffix


def _slices(folder: Path, n: int = 3, **change) -> list[Path]:
    """`n` slices of pydicom's CT_small, 5 mm apart along z; `change` sets header values: {index: {name: value}}."""
    folder.mkdir(parents=True)
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID, ds.ImagePositionPatient = f"1.2.826.0.3.{k}", [0.0, 0.0, 5.0 * k]
        for name, value in change.get(f"s{k}", {}).items():
            if value is None:
                delattr(ds, name)
            else:
                setattr(ds, name, value)
        paths.append(folder / f"s{k}.dcm")
        ds.save_as(paths[-1])
    return paths


FOLDERS = {  # name -> (how to build it, whether it is one volume, what the reader's refusal says)
    "series": (lambda f: _slices(f), True, None),
    "no extension": (lambda f: [p.rename(p.with_suffix("")) for p in _slices(f)], True, None),
    "notes beside": (lambda f: (_slices(f), (f / "notes.txt").write_text("x")), True, None),
    "one slice": (lambda f: _slices(f, 1), False, "one DICOM image"),
    "two series": (lambda f: _slices(f, s2={"SeriesInstanceUID": "1.2.826.0.9"}), False, "holds 2 DICOM series"),
    "sizes": (lambda f: _slices(f, s1={"Rows": 64}), False, "different sizes"),
    "orientations": (lambda f: _slices(f, s1={"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}), False, "orientations"),
    "same position": (lambda f: _slices(f, s2={"ImagePositionPatient": [0.0, 0.0, 0.0]}), False, "same position"),
    "no position": (lambda f: _slices(f, 2, s0={"ImagePositionPatient": None}, s1={"ImagePositionPatient": None}),
                    False, "ImagePositionPatient"),
    "multi-frame": (lambda f: _slices(f, s0={"NumberOfFrames": 2}), False, "several frames"),
    "a png beside": (lambda f: (_slices(f), Image.fromarray(np.zeros((8, 8), np.uint8)).save(f / "a.png")), False,
                     "other pictures"),
}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_batch_finder_and_reader_agree_on_series_folders(tmp_path: Path, name: str) -> None:
    build, is_volume, reason = FOLDERS[name]
    folder = tmp_path / "in" / "case"
    build(folder)
    items = discover([tmp_path / "in"]).items
    assert ([i.kind for i in items] == ["dicom-series"]) is is_volume
    if is_volume:
        assert items[0].path == str(folder)
        scan = read_image(folder, window=False)
        assert scan.layout == "volume" and scan.pixels.shape == (3, 128, 128)
        assert scan.spacing[0] == pytest.approx(5.0)
    else:
        assert all(i.kind == "file" for i in items)  # read file by file
        with pytest.raises(InputError, match=reason):
            read_image(folder)


def test_one_suffix_table() -> None:
    assert ".dicom" in FILE_TYPES["dicom"] and ".nii.gz" in FILE_TYPES["nifti"]
    assert image_suffix("A.NII.GZ") == ".nii.gz" and image_suffix("scan.DICOM") == ".dicom"
    assert image_suffix("notes.txt") is None and image_suffix("archive.gz") is None
    assert [image_stem(n) for n in ("a.nii.gz", "b.dicom", "c.PNG", "d.txt", "e")] == ["a", "b", "c", "d", "e"]
