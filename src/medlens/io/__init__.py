"""The file edge: reading scans and writing results (model files are medlens.models'); the only place numpy, Pillow,
pydicom and nibabel are used.

Front ends import the readers from here (`from medlens.io import read_image, prepare, ...`), so the modules behind can move.
"""
from medlens.io.limits import SizeLimits, current_limits, set_limits
from medlens.io.preparation import PreparedInput, load_input, model_dims, prepare, spec_for
from medlens.io.readers import read_image, take_slice
from medlens.io.scan import ScanImage

__all__ = ["PreparedInput", "ScanImage", "SizeLimits", "current_limits", "load_input", "model_dims", "prepare",
           "read_image", "set_limits", "spec_for", "take_slice"]
