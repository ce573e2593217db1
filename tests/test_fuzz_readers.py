"""A short, derandomized fuzz run in the suite (the long one is benchmarks/fuzz_readers.py): DICOM, PNG/JPEG/TIFF/BMP,
NIfTI, YOLO box files, sidecar JSON and `medlens explain` arguments each end in a result or a one-line medlens error."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import fuzz_targets as F
from helpers import TinyCNN2d, write_noise_png

SHORT = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


DICOM_SEEDS = F.dicom_seed_bytes()


@SHORT
@given(data=F.dicom_inputs(DICOM_SEEDS))
def test_fuzz_dicom(folder, data):
    F.check_dicom(data, folder)


@SHORT
@given(item=F.raster_inputs())
def test_fuzz_raster(folder, item):
    F.check_raster(item, folder)


@SHORT
@given(item=F.nifti_inputs())
def test_fuzz_nifti(folder, item):
    F.check_nifti(item, folder)


@settings(SHORT, max_examples=60)
@given(data=F.BOX_FILE)
def test_fuzz_yolo_boxes(folder, data):
    F.check_boxes(data, folder)


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-model") / "tiny.pt"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TinyCNN2d(num_classes=3).eval()), str(path))
    return path


@settings(SHORT, max_examples=30)
@given(data=F.SIDECAR)
def test_fuzz_sidecar_json(scripted_model, data):
    F.check_sidecar(data, scripted_model)


@pytest.fixture(scope="module")
def phantom_image(tmp_path_factory):
    return write_noise_png(tmp_path_factory.mktemp("fuzz-cli") / "scan.png", (48, 40))


@settings(SHORT, max_examples=15)
@given(args=F.cli_arguments())
def test_fuzz_explain_arguments(phantom_image, tmp_path_factory, args):
    F.check_cli(args, phantom_image, tmp_path_factory.mktemp("out"))
