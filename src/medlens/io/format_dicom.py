"""The `dicom` output format, for DICOM inputs: per method and target a Parametric Map of the raw map (on the source's
own grid, with its CID 217 concept) and a Secondary Capture of the overlay (drawn like the PNG overlays, on the scan's
own plane at the source's resolution), made with highdicom, in the source's study.

Nothing about the patient is invented: patient and study attributes are copied from the source by highdicom. UIDs
come from `dicom_identity` (same settings, same UIDs). An object that cannot be made is skipped with the reason in
provenance; the input's other results are still written.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medlens.core.registry import get_spec
from medlens.errors import OutputError
from medlens.io import dicom_identity as ident
from medlens.io.dicom_geometry import LPS_TO_RAS
from medlens.io.files import atomic_write, safe_name
from medlens.io.render import render_overlay
from medlens.io.scan import resampled_affine
from medlens.io.scan_view import ScanView
from medlens.version import __version__

HIGHDICOM_HINT = 'the dicom output format needs highdicom: pip install highdicom'
SERIES_NUMBER_PM, SERIES_NUMBER_SC = 9101, 9102
SKIPPABLE = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, np.linalg.LinAlgError)


def _highdicom() -> Any:
    try:
        import highdicom  # optional: only the dicom format needs it (and it pulls in its own dependencies)
    except ImportError:
        raise OutputError(HIGHDICOM_HINT) from None
    return highdicom


def visual_explanation_concept(method: str) -> Any:
    """The method's concept from DICOM CID 217 "Visual Explanation": 130403 Gradient-weighted class activation for
    gradient-weighted CAMs, 130402 Class activation for the other CAMs, 130404 Saliency for every other method."""
    try:
        spec = get_spec(method)
    except Exception:  # noqa: BLE001 - a method outside the registry is described by the general concept
        return codes.DCM.Saliency
    if spec.family == "cam":
        return codes.DCM.GradientWeightedClassActivation if spec.needs_gradients else codes.DCM.ClassActivation
    return codes.DCM.Saliency


def _letters(direction: np.ndarray) -> str:
    """A patient-orientation value (e.g. "L", "PH") for an LPS direction: the axes it runs along, largest first."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(direction))
    return "".join(names[a][0 if direction[a] > 0 else 1] for a in order if abs(direction[a]) > 1e-3)[:3]


def _geometry(affine: Optional[np.ndarray], grid: tuple[int, ...]) -> Optional[dict[str, Any]]:
    """Pixel spacing, orientation and one position per slice (LPS) of a grid with this RAS affine."""
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


def _source_grid(job: Any, sources: list[Dataset], grid: tuple[int, ...]) -> tuple[tuple[int, ...], Optional[np.ndarray]]:
    """The source's own grid for a map of this grid (rows x columns, with the scan's slices for a volume) and its
    affine; no affine when the scan has no patient geometry."""
    scan: Any = job.scan
    first = sources[0]
    plane = (int(first.Rows), int(first.Columns))
    shape = tuple(getattr(scan, "spatial_shape", grid))
    target = plane if len(grid) == 2 else (int(shape[0]), *plane)
    affine = getattr(scan, "affine", None)
    if affine is None or len(shape) != len(grid):
        return target, None
    return target, resampled_affine(affine, shape, target)


def _on_grid(values: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """A map resampled over the same extent to the source's grid (bilinear, trilinear for volumes)."""
    if tuple(values.shape) == tuple(target):
        return np.ascontiguousarray(values, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    mode = "bilinear" if len(target) == 2 else "trilinear"
    out = F.interpolate(t, size=target, mode=mode, align_corners=False)
    return out[0, 0].numpy().astype(np.float32)


def _overlay_rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)


def _save(folder: Path, name: str, dataset: Dataset) -> Path:
    return atomic_write(folder / name, lambda fh: pydicom.dcmwrite(fh, dataset, enforce_file_format=True))


# Body parts the standard counts as unpaired (General Series Laterality must then be absent); the list dciodvfy uses.
UNPAIRED_BODY_PARTS = frozenset(
    "ABDOMEN ABDOMENPELVIS AORTA BACK BLADDER BRAIN CEREBELLUM CERVIX CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS "
    "COCCYX COLON CORONARYARTERY CSPINE CTSPINE DUODENUM ESOPHAGUS FACE GALLBLADDER HEAD HEADNECK HEART ILEUM ILIUM JAW "
    "JEJUNUM LARYNX LIVER LSPINE LSSPINE MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE "
    "PANCREAS PELVIS PENIS PHARYNX PROSTATE RECTUM SCALP SKULL SPINE SPLEEN SSPINE STERNUM STOMACH THYMUS THYROID TONGUE "
    "TRACHEA TSPINE TLSPINE UTERUS URETER URETHRA VAGINA VULVA".split())


def _laterality(source: Dataset) -> Optional[str]:
    """General Series Laterality (Type 2C): None (absent) for an unpaired body part; else R or L from the source's
    Laterality, ImageLaterality or FrameLaterality, or empty (unknown) when none says."""
    body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    if body_part in UNPAIRED_BODY_PARTS:
        return None
    for key in ("Laterality", "ImageLaterality", "FrameLaterality"):
        value = str(source.get(key, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return ""


def _carry_over(result: Dataset, source: Dataset, description: str) -> Dataset:
    """Laterality and body part from the source, and the series' description."""
    laterality = _laterality(source)
    if laterality is None:
        if "Laterality" in result:
            del result.Laterality
    else:
        result.Laterality = laterality
    if source.get("BodyPartExamined"):
        result.BodyPartExamined = source.BodyPartExamined
    result.SeriesDescription = description
    return result


def write_dicom(job: Any, folder: Path) -> list[Path]:
    """`<method>_<target>_pm.dcm` (Parametric Map, float, on the source's grid) and `<method>_<target>_sc.dcm`
    (Secondary Capture of the overlay, 2-D maps) for a DICOM input; for other inputs nothing, said in provenance."""
    headers = getattr(job.scan, "dicom_headers", None)
    if not headers:
        job.provenance["dicom"] = {"written": False, "reason": "the input is not DICOM, so there is no study to file "
                                                                "DICOM results in"}
        return []
    hd = _highdicom()
    sources = list(headers)
    first = sources[0]
    provenance = job.result.provenance
    model = ident.model_name(getattr(job, "model_source", None), provenance)
    targets = job.result.targets[job.index].tolist()
    target = ident.target_text(provenance, [_title_name(t) for t in job.titles])
    written: list[Path] = []
    skipped: list[str] = []
    geometry = None
    view = _picture_view(job)
    for method, maps in job.raw.items():
        digest = ident.settings_digest(provenance, method)
        grid = tuple(maps.shape[1:])
        source_grid, affine = _source_grid(job, sources, grid)
        geometry = _geometry(affine, source_grid)
        for j, part in enumerate(job.file_parts):
            name = f"{safe_name(method)}_{part}"
            number = ident.instance_number(sources, j)
            if "FrameOfReferenceUID" not in first or geometry is None:
                skipped.append(f"{name}_pm.dcm: the source has no FrameOfReferenceUID or no patient position, "
                               f"orientation and pixel spacing, which a Parametric Map needs to lie on it")
            else:
                try:
                    pm = _parametric_map(hd, sources, _on_grid(maps[j], source_grid), geometry, method, job.titles[j],
                                         (ident.series_uid(sources, digest, "pm"),
                                          ident.instance_uid(sources, digest, "pm", targets[j]), number))
                    _carry_over(pm, first, ident.series_description(model, method, "pm", target))
                    written.append(_save(folder, f"{name}_pm.dcm", pm))
                except SKIPPABLE as exc:
                    skipped.append(f"{name}_pm.dcm: {type(exc).__name__}: {exc}")
            if len(grid) != 2:
                skipped.append(f"{name}_sc.dcm: a Secondary Capture shows one 2-D picture; this map is a volume")
                continue
            try:
                png = render_overlay(view.display, view.maps(maps[j]), title=f"{method}: {job.titles[j]}",
                                     scale=job.scales[method], region=view.region,
                                     display=job.displays.get(method, "signed"))
                sc = _secondary_capture(hd, first, _overlay_rgb(png), _patient_orientation(first, geometry), method,
                                        part, (ident.series_uid(sources, digest, "sc"),
                                               ident.instance_uid(sources, digest, "sc", targets[j]), number))
                _carry_over(sc, first, ident.series_description(model, method, "sc", target))
                written.append(_save(folder, f"{name}_sc.dcm", sc))
            except SKIPPABLE as exc:
                skipped.append(f"{name}_sc.dcm: {type(exc).__name__}: {exc}")
    job.provenance["dicom"] = {
        "written": bool(written), "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "source_instances": [str(s.get("SOPInstanceUID", "")) for s in sources],
        "parametric_map_grid": "the source's own grid (the map resampled bilinearly over the same extent); "
                               "maps.npz holds the map at the model's grid" if geometry is not None else None,
        "uids_from": "source instance(s), model weights digest, method with its options (and layer for CAMs), target",
        "written_files": [p.name for p in written], "skipped": skipped,
        "parametric_map": _summary(written, skipped, "_pm.dcm"), "secondary_capture": _summary(written, skipped, "_sc.dcm"),
        "secondary_capture_grid": view.note or "the model's grid"}
    return written


def _picture_view(job: Any) -> ScanView:
    """Where the Secondary Capture is drawn: the PNG overlays' view, the scan's own plane at the source's resolution
    when the preparation inverts (the map taken back through its resize), else the model's grid."""
    return job.view or ScanView(tuple(job.display.shape), job.display, job.region, False, "")


def _summary(written: list[Path], skipped: list[str], suffix: str) -> str:
    if any(p.name.endswith(suffix) for p in written):
        return "written"
    reasons = sorted({s.split(": ", 1)[1] for s in skipped if s.split(": ", 1)[0].endswith(suffix)})
    return "not written: " + ("; ".join(reasons) if reasons else "no map")


def _parametric_map(hd: Any, sources: list[Dataset], values: np.ndarray, geometry: dict[str, Any], method: str,
                    title: str, uids: tuple[str, str, int]) -> Dataset:
    peak = float(np.abs(values).max()) or 1.0
    concept = visual_explanation_concept(method)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=safe_name(method)[:16], lut_explanation=f"medlens {method} map (raw, signed)"[:64],
        unit=codes.UCUM.NoUnits, value_range=(float(values.min()), float(values.max())), slope=1.0, intercept=0.0,
        quantity_definition=concept)
    series, instance, number = uids
    return hd.pm.ParametricMap(
        sources, values, series, SERIES_NUMBER_PM, instance, number,
        manufacturer="medlens", manufacturer_model_name="medlens", software_versions=__version__,
        device_serial_number="none", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.0, window_width=2.0 * peak,
                                                         voi_lut_function="LINEAR_EXACT")],
        content_description=f"{method}: {title}"[:64], content_label="RELEVANCE",
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=geometry["spacing"], slice_thickness=geometry["thickness"]),
        plane_orientation=hd.PlaneOrientationSequence(coordinate_system="PATIENT", image_orientation=geometry["orientation"]),
        plane_positions=[hd.PlanePositionSequence(coordinate_system="PATIENT", image_position=[float(v) for v in p])
                         for p in geometry["positions"]])


def _patient_orientation(source: Dataset, geometry: Optional[dict[str, Any]]) -> tuple[str, str]:
    """The directions of the rows and columns, from the geometry or the source's PatientOrientation; empty values
    (unknown, allowed by the standard) when neither says, rather than a guessed orientation."""
    if geometry is not None:
        return geometry["patient_orientation"]
    try:
        given = tuple(str(v) for v in (source.get("PatientOrientation") or ()))
    except Exception:  # noqa: BLE001 - a damaged value: unknown
        return ("", "")
    return (given[0], given[1]) if len(given) >= 2 and given[0] and given[1] else ("", "")


def _secondary_capture(hd: Any, source: Dataset, rgb: np.ndarray, orientation: tuple[str, str], method: str,
                       part: str, uids: tuple[str, str, int]) -> Dataset:
    series, instance, number = uids
    # highdicom checks single letters only; the oblique value ("PL") and the unknown one ("") are set afterwards
    capture = hd.sc.SCImage.from_ref_dataset(
        source, rgb, "RGB", 8, "PATIENT", series, SERIES_NUMBER_SC, instance, number, "medlens",
        patient_orientation=("L", "F"))
    capture.PatientOrientation = list(orientation) if all(orientation) else ""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    capture.DerivationDescription = f"medlens {__version__} {method} overlay for {part}"[:1024]
    capture.ImageType = ["DERIVED", "SECONDARY"]
    return capture


def _title_name(title: str) -> str:
    """The target name of an overlay title: "Effusion (p=0.93)" and "lesion (score=41.2)" give "Effusion", "lesion"."""
    for suffix in (" (p=", " (score="):
        if title.endswith(")") and suffix in title:
            return title.rsplit(suffix, 1)[0]
    return title
