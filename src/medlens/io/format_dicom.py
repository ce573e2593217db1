"""The `dicom` output format, for DICOM inputs: per method and target a Secondary Capture of the overlay and a
Parametric Map of the raw map, made with highdicom, in the source's study and referencing the source instance(s).

Nothing about the patient is invented: patient and study attributes are copied from the source by highdicom; the
map's geometry is the source's, carried over to the map's grid. UIDs are derived from the source instance, the
method and the target, so a rerun writes the same instances again rather than new ones.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medlens.errors import OutputError
from medlens.io.dicom import LPS_TO_RAS
from medlens.io.files import atomic_write, safe_name
from medlens.io.format_nifti import map_affine
from medlens.io.render import render_overlay
from medlens.version import __version__

HIGHDICOM_HINT = 'the dicom output format needs highdicom: pip install highdicom'
SERIES_NUMBER_PM, SERIES_NUMBER_SC = 9101, 9102


def _highdicom() -> Any:
    try:
        import highdicom  # optional: only the dicom format needs it (and it pulls in its own dependencies)
    except ImportError:
        raise OutputError(HIGHDICOM_HINT) from None
    return highdicom


def _uid(source: Dataset, *parts: str) -> str:
    return generate_uid(entropy_srcs=[str(source.get("SOPInstanceUID", "")), "medlens", *parts])


def _letters(direction: np.ndarray) -> str:
    """A patient-orientation value (e.g. "L", "PH") for an LPS direction: the axes it runs along, largest first."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(direction))
    return "".join(names[a][0 if direction[a] > 0 else 1] for a in order if abs(direction[a]) > 1e-3)[:3]


def _geometry(affine: Optional[np.ndarray], grid: tuple[int, ...]) -> Optional[dict[str, Any]]:
    """Pixel spacing, orientation and one position per map slice (LPS) from the map's RAS affine."""
    if affine is None:
        return None
    lps = LPS_TO_RAS @ affine  # the same flip both ways
    row_axis, column_axis = (0, 1) if len(grid) == 2 else (1, 2)  # index axes of (row, column)
    down, across = lps[:3, row_axis], lps[:3, column_axis]
    row_spacing, column_spacing = float(np.linalg.norm(down)), float(np.linalg.norm(across))
    through = lps[:3, 2] if len(grid) == 2 else lps[:3, 0]
    depth = 1 if len(grid) == 2 else grid[0]
    positions = [(lps @ np.array([0, 0, 0, 1.0]) if len(grid) == 2 else lps @ np.array([k, 0, 0, 1.0]))[:3]
                 for k in range(depth)]
    return {"spacing": [row_spacing, column_spacing], "thickness": float(np.linalg.norm(through)) or 1.0,
            "orientation": [*(across / column_spacing), *(down / row_spacing)], "positions": positions,
            "patient_orientation": (_letters(across), _letters(down))}


def _overlay_rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)


def _save(folder: Path, name: str, dataset: Dataset) -> Path:
    return atomic_write(folder / name, lambda fh: pydicom.dcmwrite(fh, dataset, enforce_file_format=True))


def write_dicom(job: Any, folder: Path) -> list[Path]:
    """`<method>_<target>_pm.dcm` (Parametric Map, float) and `<method>_<target>_sc.dcm` (Secondary Capture of the
    overlay, 2-D maps) for a DICOM input; for other inputs nothing, said in provenance."""
    headers = getattr(job.scan, "dicom_headers", None)
    if not headers:
        job.provenance["dicom"] = {"written": False, "reason": "the input is not DICOM, so there is no study to file "
                                                                "DICOM results in"}
        return []
    hd = _highdicom()
    sources = list(headers)
    first = sources[0]
    written: list[Path] = []
    how, geometry, orientation = "", None, None
    for method, maps in job.raw.items():
        grid = tuple(maps.shape[1:])
        affine, how = map_affine(job, grid)
        geometry = _geometry(affine if "input's affine" in how else None, grid)
        orientation = _patient_orientation(first, geometry)
        for j, part in enumerate(job.file_parts):
            values = np.ascontiguousarray(maps[j], dtype=np.float32)
            name = f"{safe_name(method)}_{part}"
            if "FrameOfReferenceUID" in first:  # the Parametric Map IOD needs the source's frame of reference
                written.append(_save(folder, f"{name}_pm.dcm",
                                     _parametric_map(hd, sources, values, geometry, method, job.titles[j], first)))
            if len(grid) == 2 and orientation is not None:
                png = render_overlay(job.display, maps[j], title=f"{method}: {job.titles[j]}", scale=job.scales[method],
                                     region=job.region, display=job.displays.get(method, "signed"))
                written.append(_save(folder, f"{name}_sc.dcm",
                                     _secondary_capture(hd, first, _overlay_rgb(png), orientation, method, part)))
    job.provenance["dicom"] = {
        "written": bool(written), "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "source_instances": [str(s.get("SOPInstanceUID", "")) for s in sources],
        "geometry_from": how if geometry is not None else "the source images (same grid)",
        "parametric_map": "written" if any(p.name.endswith("_pm.dcm") for p in written) else
        "not written: the source has no FrameOfReferenceUID (e.g. a radiograph), which a Parametric Map needs",
        "secondary_capture": "written" if any(p.name.endswith("_sc.dcm") for p in written) else
        "not written: a volume, or a source with neither a patient position nor a PatientOrientation"}
    return written


def _parametric_map(hd: Any, sources: list[Dataset], values: np.ndarray, geometry: Optional[dict[str, Any]],
                    method: str, title: str, first: Dataset) -> Dataset:
    peak = float(np.abs(values).max()) or 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=safe_name(method)[:16], lut_explanation=f"medlens {method} map (raw, signed)"[:64],
        unit=codes.UCUM.NoUnits, value_range=(float(values.min()), float(values.max())), slope=1.0, intercept=0.0)
    extra: dict[str, Any] = {}
    if geometry is not None:
        extra = {"pixel_measures": hd.PixelMeasuresSequence(pixel_spacing=geometry["spacing"],
                                                             slice_thickness=geometry["thickness"]),
                 "plane_orientation": hd.PlaneOrientationSequence(coordinate_system="PATIENT",
                                                                  image_orientation=geometry["orientation"]),
                 "plane_positions": [hd.PlanePositionSequence(coordinate_system="PATIENT",
                                                              image_position=[float(v) for v in p])
                                     for p in geometry["positions"]]}
    return hd.pm.ParametricMap(
        sources, values, _uid(first, "pm-series"), SERIES_NUMBER_PM, _uid(first, "pm", method, title), 1,
        manufacturer="medlens", manufacturer_model_name="medlens", software_versions=__version__,
        device_serial_number="none", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.0, window_width=2.0 * peak)],
        content_description=f"{method}: {title}"[:64], content_label="RELEVANCE", **extra)


def _patient_orientation(source: Dataset, geometry: Optional[dict[str, Any]]) -> Optional[tuple[str, str]]:
    """What a Secondary Capture needs: the directions of the rows and columns, from the geometry or the source's
    PatientOrientation; None when neither says (no Secondary Capture then, rather than a guessed orientation)."""
    if geometry is not None:
        return geometry["patient_orientation"]
    try:
        given = tuple(str(v) for v in (source.get("PatientOrientation") or ()))
    except Exception:  # noqa: BLE001 - a damaged value: unknown
        return None
    return (given[0], given[1]) if len(given) >= 2 and given[0] and given[1] else None


def _secondary_capture(hd: Any, source: Dataset, rgb: np.ndarray, orientation: tuple[str, str], method: str,
                       part: str) -> Dataset:
    capture = hd.sc.SCImage.from_ref_dataset(
        source, rgb, "RGB", 8, "PATIENT", _uid(source, "sc-series"), SERIES_NUMBER_SC,
        _uid(source, "sc", method, part), 1, "medlens", patient_orientation=orientation)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    capture.DerivationDescription = f"medlens {__version__} {method} overlay for {part}"[:1024]
    capture.ImageType = ["DERIVED", "SECONDARY"]
    return capture
