"""The `dicom` format's DICOM Segmentation for segmentation models: the model's predicted mask of each explained class,
on the source's own grid, as one Segmentation object (highdicom) in the source's study, beside the Parametric Maps.

The mask is taken back through the inverse of the preparation: the model's per-pixel logits resized over the same extent
to the source's rows x columns (and slices, for a 3-D model), bilinear (trilinear) with align_corners=False as
`scan_view` takes maps back, then the argmax (logit > 0 for independent classes). An empty predicted mask gives no
object, and provenance (and the batch manifest's notes) says so: an empty Segmentation would be passed off as a result.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medlens.io import dicom_identity as ident
from medlens.io.format_dicom import SKIPPABLE, _highdicom, _laterality, _save
from medlens.version import __version__

SERIES_NUMBER_SEG = 9103
SEG_FILE = "predicted_mask_seg.dcm"
NOT_DICOM = "the input is not DICOM, so there is no study to file DICOM results in"
#: Type 2 attributes of the patient and study that highdicom reads from the source; absent ones are written empty
#: (present and unknown, as the standard allows), never invented.
TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                     "ReferringPhysicianName", "StudyID", "AccessionNumber")
LESION_WORDS = {"lesion": Code("52988006", "SCT", "Lesion"), "tumor": Code("108369006", "SCT", "Neoplasm"),
                "tumour": Code("108369006", "SCT", "Neoplasm"), "mass": Code("4147007", "SCT", "Mass")}


def masks_on_grid(logits: torch.Tensor, classes: Sequence[int], grid: Sequence[int], multi_label: bool) -> np.ndarray:
    """The predicted masks of `classes` on `grid`: (len(classes), *grid) bool.

    Args:
        logits: the model's per-pixel logits (K, *spatial) on its own grid.
        classes: class indices, one mask each.
        grid: the source's grid (rows, columns), or (slices, rows, columns) for a volume.
        multi_label: independent classes (a pixel is in class k where its logit is > 0); else the argmax is k.

    Returns:
        Boolean masks; the logits are resized over the same extent first (bilinear or trilinear, align_corners=False:
        the inverse of the preparation's resize).
    """
    values = logits.detach().float().cpu()[None]
    grid = tuple(int(g) for g in grid)
    if tuple(values.shape[2:]) != grid:
        values = F.interpolate(values, size=grid, mode="bilinear" if len(grid) == 2 else "trilinear",
                               align_corners=False)
    values = values[0]
    if multi_label or values.shape[0] == 1:
        return np.stack([(values[k] > 0).numpy() for k in classes])
    best = values.argmax(dim=0)
    return np.stack([(best == k).numpy() for k in classes])


def _source_grid(sources: Sequence[Dataset], spatial: tuple[int, ...]) -> tuple[Optional[tuple[int, ...]], str]:
    """The source's own grid for a mask of this many axes, or None with the reason no Segmentation can lie on it."""
    first = sources[0]
    frames = sum(int(s.get("NumberOfFrames", 1) or 1) for s in sources)
    plane = (int(first.Rows), int(first.Columns))
    if len(spatial) == 2:
        if frames != 1:
            return None, (f"the mask is of one 2-D slice of a source with {frames} frames; a Segmentation of one slice "
                          f"of a multi-slice source is not written (maps.npz keeps the mask on the model's grid)")
        return plane, ""
    return (frames, *plane), ""


def _filled(source: Dataset) -> Dataset:
    """A copy of the source header with the Type 2 patient and study attributes it lacks present and empty."""
    out = copy.deepcopy(source)
    for key in TYPE2_FROM_SOURCE:
        if key not in out:
            setattr(out, key, "")
    return out


def _description(hd: Any, number: int, label: str, model: str, weights: str) -> Any:
    """A segment of the class `label`: SNOMED "Lesion" (or neoplasm, mass) for such labels, else a local code
    (scheme 99MEDLENS) with the label as its meaning; the algorithm is medlens with the model's name."""
    key = label.strip().lower()
    kind = LESION_WORDS.get(key)
    if kind is not None:
        category = codes.SCT.MorphologicallyAbnormalStructure
    else:
        category = Code("91723000", "SCT", "Anatomical Structure")
        kind = Code(("".join(c for c in key.upper() if c.isalnum()) or f"CLASS{number}")[:16], "99MEDLENS", label[:64])
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medlens {model}"[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__,
        source="medlens", parameters={"model_sha256": weights[:64]} if weights else None)
    return hd.seg.SegmentDescription(number, label[:64], category, kind, "AUTOMATIC", algorithm)


def _classes(provenance: dict[str, Any]) -> list[tuple[int, str]]:
    """The explained classes (index, label), each once, in the targets' order (the label from the target's name,
    "lesion@predicted" -> "lesion")."""
    seen: dict[int, str] = {}
    for record in (provenance.get("region_targets") or {}).get("targets") or []:
        k = int(record["class"])
        seen.setdefault(k, str(record.get("name") or f"class {k}").split("@", 1)[0] or f"class {k}")
    return list(seen.items())


def write_segmentation(job: Any, folder: Path) -> list[Path]:
    """`predicted_mask_seg.dcm`: the model's predicted mask of each explained class as one DICOM Segmentation on the
    source's grid, for a DICOM input of a segmentation model. Nothing (with the reason in provenance under
    `dicom_segmentation`) for a non-DICOM input, a source without a frame of reference, or an empty predicted mask.

    Args:
        job: the `ImageResult` (its `segmentation_logits` are the model's per-pixel logits on its grid).
        folder: where to write.

    Returns:
        The path written, or none.
    """
    logits = getattr(job, "segmentation_logits", None)
    if logits is None:  # not a segmentation model's result
        return []
    record: dict[str, Any] = {"written": False, "skipped": []}
    job.provenance["dicom_segmentation"] = record
    headers = getattr(job.scan, "dicom_headers", None)
    if not headers:
        record["reason"] = NOT_DICOM
        return []
    sources = list(headers)
    provenance = job.result.provenance
    classes = _classes(provenance)
    grid, why = _source_grid(sources, tuple(logits.shape[1:]))
    if grid is not None and "FrameOfReferenceUID" not in sources[0]:
        grid, why = None, ("the source has no FrameOfReferenceUID (no patient geometry), which a Segmentation needs "
                           "to lie on it")
    if grid is None or not classes:
        record["skipped"].append(f"{SEG_FILE}: {why or 'no segmentation target'}")
        return []
    masks = masks_on_grid(logits, [k for k, _ in classes], grid, bool(job.result.multi_label))
    kept = [(i, k, label) for i, (k, label) in enumerate(classes) if masks[i].any()]
    empty = [label for i, (k, label) in enumerate(classes) if not masks[i].any()]
    if empty:
        record["empty_segments"] = empty
    if not kept:
        record["skipped"].append(f"{SEG_FILE}: the model predicted no pixel of {', '.join(repr(e) for e in empty)} on "
                                 f"this input, so there is no mask to file (an empty Segmentation would be no result)")
        return []
    try:
        path, segments = _write(job, folder, sources, masks, kept)
    except SKIPPABLE as exc:
        record["skipped"].append(f"{SEG_FILE}: {type(exc).__name__}: {exc}")
        return []
    record.update({"written": True, "file": path.name, "segments": segments, "grid": (
        f"the source's own grid ({' x '.join(map(str, grid))}): the model's per-pixel logits resized over the same "
        f"extent (bilinear/trilinear, align_corners=False: the inverse of the preparation's resize), then the "
        f"{'logit > 0' if job.result.multi_label else 'argmax'}; maps.npz's region is the mask on the model's grid")})
    return [path]


def _carry_over(seg: Dataset, source: Dataset, description: str) -> None:
    """Body part and a known laterality (R, L) from the source, and the series' description. Unlike the Parametric
    Map, an unknown laterality is left absent: dciodvfy counts an empty one an error on a Segmentation."""
    laterality = _laterality(source)
    if laterality in ("R", "L"):
        seg.Laterality = laterality
    elif "Laterality" in seg:
        del seg.Laterality
    if source.get("BodyPartExamined"):
        seg.BodyPartExamined = source.BodyPartExamined
    seg.SeriesDescription = description


def _write(job: Any, folder: Path, sources: list[Dataset], masks: np.ndarray,
           kept: list[tuple[int, int, str]]) -> tuple[Path, list[dict[str, Any]]]:
    hd = _highdicom()
    provenance = job.result.provenance
    model = ident.model_name(getattr(job, "model_source", None), provenance)
    weights = str((provenance.get("model") or {}).get("sha256") or "")
    digest = hashlib.sha256(json.dumps({"model": weights, "kind": "seg", "classes": [k for _, k, _ in kept],
                                        "medlens": "predicted-mask"}, sort_keys=True).encode()).hexdigest()
    pixels = np.stack([masks[i] for i, _, _ in kept], axis=-1).astype(np.uint8)  # (*grid, S)
    if pixels.ndim == 3:  # one plane: one frame
        pixels = pixels[None]
    descriptions = [_description(hd, n, label, model, weights) for n, (_, _, label) in enumerate(kept, start=1)]
    labels = ", ".join(label for _, _, label in kept)
    seg = hd.seg.Segmentation(
        [_filled(s) for s in sources], pixels, hd.seg.SegmentationTypeValues.BINARY, descriptions,
        ident.series_uid(sources, digest, "seg"), SERIES_NUMBER_SEG, ident.instance_uid(sources, digest, "seg", 0),
        ident.instance_number(sources, 0), manufacturer="medlens", manufacturer_model_name="medlens",
        software_versions=__version__, device_serial_number="none", content_label="PREDICTED_MASK",
        content_description=f"{model} predicted mask: {labels}"[:64])
    _carry_over(seg, sources[0], f"medlens predicted mask, {labels}, {model}"[:64])
    segments = [{"number": n, "label": label, "class": k, "pixels_on_source_grid": int(masks[i].sum())}
                for n, (i, k, label) in enumerate(kept, start=1)]
    return _save(folder, SEG_FILE, seg), segments
