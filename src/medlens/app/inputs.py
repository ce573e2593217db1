"""The app's inputs: uploads (read through `medlens.io` from a private temporary folder that is removed at once),
region files, DICOM window presets, slices of a volume on three axes, phantom samples and figshare slices.

Nothing here keeps an upload on disk: bytes stay in the session's memory, and each read writes them to a fresh
0700 temporary folder that is deleted before the function returns. Messages name the upload, not the temp path.
"""
from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from medlens.data.phantom import phantom_2d, phantom_3d
from medlens.errors import InputError, MedlensError
from medlens.io import PreparedInput, ScanImage, prepare, read_image, spec_for
from medlens.io.limits import size_text
from medlens.io.readers import take_slice
from medlens.io.regions import Region, read_region, region_mask
from medlens.io.scan import one_line

MAX_UPLOAD_MB = 64  # the page's own limit (also Streamlit's server.maxUploadSize when started by `medlens app`)
UPLOAD_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "bmp", "dcm", "dicom", "nii", "gz"]
REGION_TYPES = ["txt", "png", "jpg", "jpeg", "tif", "tiff", "nii", "gz"]
# DICOM window presets: True = the file's own VOI LUT or window, False = modality values, else (center, width)
WINDOW_PRESETS: dict[str, Any] = {"from the file": True, "brain (40/80)": (40.0, 80.0),
                                  "soft tissue (40/400)": (40.0, 400.0), "lung (-600/1500)": (-600.0, 1500.0),
                                  "bone (400/1800)": (400.0, 1800.0), "modality values (no window)": False}
AXES = ("axial", "coronal", "sagittal")  # volume axes (D, H, W) = (z, y, x) after medlens's RAS reorientation
SAMPLES = ("phantom: lesion", "phantom: no lesion", "phantom: 3-D volume with lesion")


@dataclass
class LoadedInput:
    """An input as the page holds it: the scan as read, where it came from, and its region (when given)."""

    name: str
    digest: str  # sha256 of the bytes (or the sample's recipe): part of every cache key
    scan: ScanImage
    region: Optional[Region] = None
    region_id: str = ""  # which region (its digest): part of the key of a prepared input, not of a map
    notes: list[str] = field(default_factory=list)

    @property
    def is_volume(self) -> bool:
        return self.scan.is_volume

    @property
    def is_dicom(self) -> bool:
        return self.scan.kind.startswith("dicom")


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _suffix(name: str) -> str:
    lowered = name.lower()
    return ".nii.gz" if lowered.endswith(".nii.gz") else Path(lowered).suffix


def _clean(message: str, temp: str, name: str) -> str:
    return message.replace(temp + "/", "").replace(temp, name)


def _read_private(name: str, data: bytes, reader: Any, limit_mb: float = MAX_UPLOAD_MB) -> Any:
    """`reader(path)` on the bytes written to a private temporary file, which is removed before returning."""
    if len(data) == 0:
        raise InputError(f"{name}: the file is empty; upload the image again.")
    if len(data) > limit_mb * 1024 * 1024:
        raise InputError(f"{name}: the file is {size_text(len(data))}, above the app's upload limit of {limit_mb:g} MB; "
                         f"crop or downsample it, or run `medlens explain` on it from the command line.")
    safe = Path(name).name.replace("/", "_") or "upload"
    with tempfile.TemporaryDirectory(prefix="medlens-app-") as temp:  # created 0700 by tempfile
        path = Path(temp) / safe
        path.write_bytes(data)
        try:
            return reader(path)
        except MedlensError as exc:
            raise type(exc)(_clean(str(exc), temp, safe)) from None
        except Exception as exc:  # noqa: BLE001 - an upload is outside input: whatever a library raises is a message
            raise InputError(f"{safe}: the file could not be read ({_clean(one_line(exc), temp, safe)}); check that it "
                             f"is a PNG, JPEG, TIFF, DICOM or NIfTI file and upload it again.") from None


def read_upload(name: str, data: bytes, *, window: Any = True, limit_mb: float = MAX_UPLOAD_MB) -> LoadedInput:
    """An uploaded scan read with medlens's readers (size limits, corrupt files, DICOM windows, NIfTI orientation)."""
    scan = _read_private(name, data, lambda p: read_image(p, window=window), limit_mb)
    scan.source = Path(Path(name).name)
    return LoadedInput(Path(name).name, digest_of(data + repr(window).encode()), scan)


def read_region_upload(name: str, data: bytes) -> Region:
    """An uploaded region: YOLO box text, a PNG/JPEG/TIFF mask or a NIfTI mask."""
    region = _read_private(name, data, read_region, 16)
    return Region(Path(Path(name).name), region.boxes, region.mask)


def slice_scan(scan: ScanImage, axis: str, index: Optional[int]) -> ScanImage:
    """One plane of a volume as a 2-D scan: axial (the file's own slices), coronal or sagittal (superior at top)."""
    if not scan.is_volume:
        return scan
    if axis == "axial":
        return take_slice(scan, index)
    ax = AXES.index(axis)
    n = scan.pixels.shape[ax]
    k = n // 2 if index is None else index
    if not 0 <= k < n:
        raise InputError(f"{scan.source}: {axis} slice {k} does not exist; the volume has {n} (0..{n - 1}).")
    plane = np.flipud(np.take(scan.pixels, k, axis=ax))  # slice 0 of the volume is the most inferior
    spacing = tuple(s for i, s in enumerate(scan.spacing) if i != ax) if scan.spacing else None
    return ScanImage(np.ascontiguousarray(plane), scan.source, scan.kind, scan.notes + [f"{axis} slice {k} of {n}"],
                     spacing, "gray", scan.nominal_range)


def axis_length(scan: ScanImage, axis: str) -> int:
    return int(scan.pixels.shape[AXES.index(axis)]) if scan.is_volume else 1


def prepare_input(model: Any, dims: int, loaded: LoadedInput, axis: str = "axial",
                  index: Optional[int] = None) -> tuple[PreparedInput, Optional[np.ndarray]]:
    """The input prepared for one model (a 2-D model gets the chosen slice of a volume) and the region on its grid."""
    scan = loaded.scan
    if dims == 2 and scan.is_volume:
        scan = slice_scan(scan, axis, index)
    prepared = prepare(scan, spec_for(model), dims=dims)
    region = None
    if loaded.region is not None:
        grid = tuple(prepared.tensor.shape[2:])
        if loaded.scan.is_volume and dims == 2 and axis != "axial":
            prepared.notes.append("the region is only drawn on axial slices")
        else:
            depth = loaded.scan.pixels.shape[0] if loaded.scan.is_volume else None
            k = (index if index is not None else depth // 2) if (depth and dims == 2) else None
            try:
                region = region_mask(loaded.region, loaded.scan.spatial_shape, grid, slice_index=k).cpu().numpy()
            except InputError as exc:  # e.g. a mask that does not reach this slice: said, and the maps still shown
                prepared.notes.append(f"the region is not drawn: {exc}")
    return prepared, region


def default_slice(loaded: LoadedInput, axis: str) -> int:
    """The slice a volume opens on: the one with the most region when a 3-D mask is given, else the middle."""
    n = axis_length(loaded.scan, axis)
    mask = loaded.region.mask if loaded.region is not None else None
    if mask is not None and mask.ndim == 3 and mask.shape == loaded.scan.pixels.shape and mask.any():
        ax = AXES.index(axis)
        area = mask.sum(axis=tuple(i for i in range(3) if i != ax))
        k = int(area.argmax())
        return k
    return n // 2


def _png_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(values, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def phantom_sample(which: str, seed: int = 3) -> tuple[str, bytes, Region]:
    """A phantom scan made on the fly (file name, file bytes) and its exact lesion mask as the region."""
    if which == SAMPLES[2]:
        import nibabel as nib  # heavy, only for the volume sample

        case = phantom_3d(1, size=48, seed=seed, positive_rate=1.0)
        volume = case.images[0, 0].numpy()  # (D, H, W) = (z, y, x); NIfTI stores (x, y, z)
        image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)[:, ::-1, :]), np.eye(4))
        data = image.to_bytes()
        mask = case.lesion_masks[0, 0].numpy()
        return "phantom-volume.nii", data, Region(Path("phantom lesion mask"), None, mask)
    lesion = which == SAMPLES[0]
    case = phantom_2d(1, size=128, seed=seed, positive_rate=1.0 if lesion else 0.0)
    data = _png_bytes(case.images[0, 0].numpy())
    name = "phantom-lesion.png" if lesion else "phantom-normal.png"
    return name, data, Region(Path("phantom lesion mask"), None, case.lesion_masks[0, 0].numpy())


def figshare_samples(data_dir: Optional[str], per_class: int = 2) -> dict[str, Path]:
    """A few figshare slices (label -> path), when `--data` points at the figshare folder; {} otherwise."""
    if not data_dir:
        return {}
    root = Path(data_dir)
    found: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        images = sorted(folder.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))[:per_class]
        for path in images:
            found[f"figshare: {folder.name}/{path.name}"] = path
    return found


def read_server_file(path: Path) -> LoadedInput:
    """A figshare slice (a server-side file the person starting the app pointed at), with its box file as region."""
    scan = read_image(path)
    box = path.with_suffix(".txt")
    region = read_region(box) if box.is_file() else None
    return LoadedInput(f"{path.parent.name}/{path.name}", digest_of(path.read_bytes()), scan, region,
                       digest_of(box.read_bytes()) if region is not None else "")


def load_sample(which: str, seed: int = 3) -> LoadedInput:
    name, data, region = phantom_sample(which, seed)
    loaded = read_upload(name, data)
    loaded.region, loaded.region_id = region, f"sample:{which}:{seed}"
    return loaded
