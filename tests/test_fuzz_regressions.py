"""Every failure the fuzzers found (tests/fuzz_targets.py, benchmarks/fuzz_readers.py), as the smallest input that
triggered it, made here: each now ends in a one-line medlens error instead of another exception."""
from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TinyCNN2d, make_dicom
from medlens.cli.group import main
from medlens.errors import InputError, MedlensError, ModelError
from medlens.io import read_image
from medlens.models.loading import load_model


def one_line_error(call, kind=MedlensError) -> str:
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert message.strip() and "\n" not in message
    return message


def test_rle_data_that_makes_the_rust_decoder_panic(tmp_path):
    """pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on two segments whose offsets overlap."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, SecondaryCaptureImageStorage, "1.2.3.4"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 3, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    header = struct.pack("<16I", 2, 64, 69, *([0] * 13))
    ds.PixelData = encapsulate([header + bytes.fromhex("804e06ea28ab17")])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "panic.dcm", enforce_file_format=True)
    message = one_line_error(lambda: read_image(tmp_path / "panic.dcm"), InputError)
    assert "panic.dcm: the DICOM pixel data (RLE Lossless) cannot be decoded" in message


def test_an_unknown_value_representation_in_the_pixel_module(tmp_path):
    """pydicom raises NotImplementedError for a VR it does not know (here on Rows)."""
    path = make_dicom(tmp_path / "vr.dcm", np.zeros((4, 4), dtype=np.uint16))
    data = path.read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US")
    path.write_bytes(data[: rows + 4] + b"\x55\x80" + data[rows + 6:])
    message = one_line_error(lambda: read_image(path), InputError)
    assert "vr.dcm" in message and "Unknown Value Representation" in message


def test_a_pixel_module_value_of_odd_length(tmp_path):
    """pydicom raises BytesLengthException (not a ValueError) reading a US value of 3 bytes, here Columns."""
    path = make_dicom(tmp_path / "odd.dcm", np.zeros((4, 4), dtype=np.uint16))
    data = path.read_bytes()
    columns = data.index(b"\x28\x00\x11\x00US\x02\x00")
    path.write_bytes(data[: columns + 6] + b"\x03\x00\x04\x00\x00" + data[columns + 10:])
    message = one_line_error(lambda: read_image(path), InputError)
    assert "odd.dcm: a DICOM header value could not be read (BytesLengthException" in message


def test_a_tiff_page_without_its_width(tmp_path):
    """Pillow raises TypeError("Missing dimensions") counting the frames of a TIFF whose second page lost ImageWidth
    (a palette TIFF: tifffile leaves those to Pillow)."""
    import tifffile

    img = Image.fromarray(np.zeros((5, 4), dtype=np.uint8)).convert("P")
    img.save(tmp_path / "pages.tif", save_all=True, append_images=[img])
    data = bytearray((tmp_path / "pages.tif").read_bytes())
    with tifffile.TiffFile(str(tmp_path / "pages.tif")) as tf:
        entry = tf.pages[1].tags["ImageWidth"].offset
    data[entry: entry + 2] = struct.pack("<H", 0xFFFE)
    (tmp_path / "pages.tif").write_bytes(bytes(data))
    message = one_line_error(lambda: read_image(tmp_path / "pages.tif"), InputError)
    assert "pages.tif: the image data cannot be decoded (TypeError" in message


def test_a_nifti_header_with_a_zero_dimension(tmp_path):
    """nibabel reads dim = [3, 0, 8, 20] as shape (0, 8, 20) and returns voxels of shape (0,): the reorientation failed."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((0, 8, 20))
    header.set_data_dtype(np.float32)
    (tmp_path / "zero.nii").write_bytes(header.binaryblock + b"\0" * 4)
    message = one_line_error(lambda: read_image(tmp_path / "zero.nii"), InputError)
    assert "zero.nii: the NIfTI header gives the image a size of 0" in message


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"0 nan 0.5 0.1 0.1", b"0 0.5 1e308 0.1 0.1", b"0 inf 0.5 1 1"])
def test_yolo_box_files_that_are_binary_or_not_finite(tmp_path, content):
    from medlens.data.figshare import parse_box_file
    from medlens.evaluation_run.dataset import box_mask

    path = tmp_path / "1.txt"
    path.write_bytes(content)
    one_line_error(lambda: parse_box_file(path), InputError)
    if content.startswith(b"\xff") or b"nan" in content or b"inf" in content:
        one_line_error(lambda: box_mask(path, (16, 12)), InputError)
    else:  # a huge but finite centre is clamped to the image
        assert box_mask(path, (16, 12)).dtype == torch.bool


@pytest.mark.parametrize("args, expected", [
    (["\0"], "NUL character"),
    (["--device", "meta"], "cannot use device 'meta'"),
])
def test_explain_arguments_that_crashed(tmp_path, capsys, args, expected):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "scan.png")
    code = main(["explain", str(tmp_path / "scan.png"), "--model", "phantom-lesion", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


@pytest.mark.parametrize("sidecar, expected", [
    ({"size": [100000, 100000]}, "above medlens's limit"),
    ({"channels": 10**9}, "channels must be a whole number"),
    ({"channels": "abc"}, "channels must be a whole number"),
    ({"labels": False}, "labels must be a list of class names"),
    ({"resample": {"": 1.5}}, "resample must be text"),
    ({"multi_label": "no"}, "multi_label must be true or false"),  # was read as True: a non-empty string
    ({"std": {"": [1]}}, "std must be a number or a list of numbers"),
])
def test_sidecar_values_that_would_allocate_or_crash(tmp_path, sidecar, expected):
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TinyCNN2d().eval()), str(path))
    (tmp_path / "tiny.pt.json").write_text(json.dumps(sidecar))
    message = one_line_error(lambda: load_model(path), ModelError)
    assert expected in message


def test_an_empty_label_list_in_a_sidecar_means_no_labels(tmp_path):
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TinyCNN2d().eval()), str(path))
    (tmp_path / "tiny.pt.json").write_text(json.dumps({"labels": []}))  # crashed with TypeError
    assert load_model(path).labels == ["class 0", "class 1", "class 2"]
