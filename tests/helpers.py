"""What many test modules build: seeded tiny CNNs (2-D, 3-D, torchvision), DICOM/NIfTI/PNG writers, the CLI run
in-process, the shared data folder, and small measuring tools (correlation, activations, threads). Tests import it
as `helpers` (pytest puts tests/ on the path); no test module imports another test module."""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """The folder of a dataset under ../shared/data, or skip the test with a clear message."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"needs ../shared/data/{name} (not present on this machine); this test runs where the shared data is.")
    return path


# --------------------------------------------------------------------------------------------- models


class _TinyCNN(nn.Module):
    """conv-BN-ReLU, max-pool, conv-BN-ReLU, global average pool, linear; `dims` picks 2-D or 3-D layers."""

    def __init__(self, dims: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        conv, norm, pool, gap = {
            2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
            3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d),
        }[dims]
        self.features = nn.Sequential(
            conv(in_channels, 8, 3, padding=1), norm(8), nn.ReLU(inplace=True),
            pool(2),
            conv(8, 16, 3, padding=1), norm(16), nn.ReLU(inplace=True),
        )
        self.pool = gap(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyCNN2d(_TinyCNN):
    """A small 2-D CNN with a global-average-pool + linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__(2, in_channels, num_classes)


class TinyCNN3d(_TinyCNN):
    """A small 3-D CNN: conv-BN-ReLU twice, global average pool, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__(3, in_channels, num_classes)


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, so canonizers and hygiene are really tested.

    Returns the model, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def make_tiny2d(seed: int = 0, in_channels: int = 1, num_classes: int = 3) -> nn.Module:
    """TinyCNN2d with weights drawn after torch.manual_seed(seed) and BatchNorm statistics from randomise_bn(seed)."""
    torch.manual_seed(seed)
    return randomise_bn(TinyCNN2d(in_channels=in_channels, num_classes=num_classes), seed)


def make_tiny3d(seed: int = 0, in_channels: int = 1, num_classes: int = 3) -> nn.Module:
    """TinyCNN3d seeded as make_tiny2d seeds its 2-D twin."""
    torch.manual_seed(seed)
    return randomise_bn(TinyCNN3d(in_channels=in_channels, num_classes=num_classes), seed)


def torchvision_model(name: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A torchvision architecture with seeded random weights (never downloaded)."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return randomise_bn(model, seed)


# --------------------------------------------------------------------------------------------- files


def make_dicom(path: Path, arr: np.ndarray, **attrs: Any) -> Path:
    """A minimal, valid DICOM file from a uint16/int16 array (H, W) or frames (N, H, W); `attrs` set or override
    header attributes (e.g. WindowCenter=40, PhotometricInterpretation="MONOCHROME1")."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    if arr.ndim == 3:
        ds.NumberOfFrames = int(arr.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
    ds.PixelSpacing = [0.5, 0.7]
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def with_functional_groups(source: Path, target: Path) -> Path:
    """Write `source` (a multi-frame Enhanced MR such as pydicom-data's emri_small.dcm, whose functional groups were
    stripped) to `target` with the shared and per-frame functional groups an Enhanced MR carries: orientation and
    spacing (0.9 x 0.8 mm, 4 mm slices) shared, one position per frame 4 mm apart. Also used by
    benchmarks/dicom_conformance.py."""
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(source)
    shared, measures, orientation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.9, 0.8], 4.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(int(ds.NumberOfFrames)):
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-30.0, -20.0, 4.0 * k]
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.save_as(target)
    return target


def make_nifti(path: Path, data: np.ndarray, slope: float = 1.0, inter: float = 0.0, affine: Any = None) -> Path:
    """A NIfTI-1 file holding `data` with the given scaling and affine (identity when None)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def write_noise_png(path: Path, shape: tuple[int, int], seed: int = 0, high: int = 256, **save: Any) -> Path:
    """An 8-bit grey PNG of uniform noise in [0, high) drawn from np.random.RandomState(seed)."""
    Image.fromarray(np.random.RandomState(seed).randint(0, high, shape).astype(np.uint8)).save(path, **save)
    return path


# --------------------------------------------------------------------------------------------- running


def run(capsys: pytest.CaptureFixture, *args: Any) -> tuple[int, str, str]:
    """`medlens ARGS...` in this process (FutureWarnings silenced): (exit code, stdout, stderr)."""
    from medlens.cli.group import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_in_threads(jobs: Sequence[Callable[[], object]]) -> list[Exception]:
    """Run each job in its own thread, all released together by a barrier; the exceptions they raised."""
    errors: list[Exception] = []
    start = threading.Barrier(len(jobs))

    def run_one(job: Callable[[], object]) -> None:
        try:
            start.wait()
            job()
        except Exception as error:  # noqa: BLE001 - collected and asserted on
            errors.append(error)

    threads = [threading.Thread(target=run_one, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# --------------------------------------------------------------------------------------------- measuring


def correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> float:
    """Pearson correlation of the flattened tensors, in float64; `eps` is added to the denominator."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + eps))


def layer_output(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of `module` (a copy) when `model` runs on `x` without gradients; the hook is removed after."""
    out = {}
    handle = module.register_forward_hook(lambda _m, _i, o: out.__setitem__("a", o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out["a"]


def write_box_folder(root: Path, labels: Sequence[str], per_class: int = 3, size: int = 64,
                     suffix: str = ".jpg") -> Path:
    """Class folders of grey images (seeded noise), each with a bright 16-pixel square and its YOLO box file beside
    it, named 11, 12, ... in the first class, 21, 22, ... in the second; JPEGs at quality 95 or PNGs by `suffix`."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c, cls in enumerate(labels):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = (torch.rand(size, size, generator=gen) * 60).to(torch.uint8)
            r, col = (int(v) for v in torch.randint(4, size - 20, (2,), generator=gen))
            img[r:r + 16, col:col + 16] = 220
            name = f"{10 * c + i + 1}"
            Image.fromarray(img.numpy()).save(root / cls / f"{name}{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
            (root / cls / f"{name}.txt").write_text(
                f"{c} {(col + 8) / size:.4f} {(r + 8) / size:.4f} {16 / size:.4f} {16 / size:.4f}\n")
    return root
