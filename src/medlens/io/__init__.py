"""The file edge: reading scans and models, writing results; the only place numpy, Pillow, pydicom and nibabel are used.

Front ends import the readers from here (`from medlens.io import read_image, prepare, ...`), so the modules behind can move.
"""
from medlens.io.images import PreparedInput, ScanImage, load_input, model_dims, prepare, read_image, spec_for, take_slice
from medlens.io.models import load_model

__all__ = ["PreparedInput", "ScanImage", "load_input", "load_model", "model_dims", "prepare", "read_image", "spec_for",
           "take_slice"]
