"""Inputs and model folders the app tests share: phantom PNG bytes, a DICOM, a NIfTI volume, and a --models folder
holding a TorchScript 2-D model, a 3-D one, a pickled module and a file that is not a model."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from medlens.app.inputs import SAMPLES, phantom_sample
from helpers import make_dicom


def phantom_png() -> bytes:
    return phantom_sample(SAMPLES[0])[1]


def dicom_bytes(tmp: Path, monochrome1: bool = False) -> bytes:
    arr = (np.asarray(Image.open(io.BytesIO(phantom_png())), dtype=np.float32) * 16).astype(np.uint16)
    attrs = {"PhotometricInterpretation": "MONOCHROME1"} if monochrome1 else {}
    path = make_dicom(tmp / ("mono1.dcm" if monochrome1 else "scan.dcm"), arr, PatientName="Doe^Jane",
                      PatientID="SECRET-123", WindowCenter=2000, WindowWidth=4000, **attrs)
    return path.read_bytes()


def nifti_bytes() -> bytes:
    return phantom_sample(SAMPLES[2])[1]


class Tiny3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


class Tiny2D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def models_folder(root: Path) -> Path:
    """tiny2d.pt (TorchScript), tiny3d.pt (TorchScript, 3-D), pickled.pth (a pickled module), broken.pt (not a model)."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Tiny2D().eval()), str(root / "tiny2d.pt"))
    torch.jit.save(torch.jit.script(Tiny3D().eval()), str(root / "tiny3d.pt"))
    torch.save(Tiny2D().eval(), root / "pickled.pth")
    (root / "broken.pt").write_bytes(b"this is not a model file")
    return root
