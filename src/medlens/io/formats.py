"""Output formats: one writer function per format name, in one table (`FORMATS`) that the CLI, the batch runner
and the app read. A new format is a writer `(ImageResult, folder) -> [paths]` and one line in the table.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medlens.errors import OutputError
from medlens.io.files import atomic_write, safe_name
from medlens.io.png_encode import deflate_rows, encode_png, png_from_parts
from medlens.io.render import color_scale, overlay_cell, overlay_picture, panel_picture, shown
from medlens.io.scan_view import ScanView, scan_view


@dataclass
class ImageResult:
    """One image's share of an `ExplanationResult`, in the form every format writer takes."""

    result: Any  # the ExplanationResult
    index: int  # which image of its batch
    raw: dict[str, np.ndarray]  # method -> (T, *spatial) float32 raw maps
    display: np.ndarray  # grayscale (*spatial) in [0, 1]
    titles: list[str]  # per target: "name (p=0.93)", for region targets "name (score=41.2)"
    file_parts: list[str]  # per target: a unique, file-name-safe name
    region: Optional[np.ndarray] = None  # boolean (*spatial) region, outlined on overlays
    input_file: Optional[Path] = None
    scan: Any = None  # the ScanImage read from input_file, when known (affines, DICOM references)
    provenance: dict[str, Any] = field(default_factory=dict)  # what the writers add to provenance.json
    displays: dict[str, str] = field(default_factory=dict)  # method -> how pictures draw it (positive, signed, magnitude)
    model_source: Optional[dict[str, Any]] = None  # where the model came from (bundled name, file), when known
    view: Optional[ScanView] = None  # where pictures are drawn: the scan's own plane when the preparation inverts
    segmentation_logits: Any = None  # a segmentation model's per-pixel logits (K, *spatial) on the model's grid, or None

    @classmethod
    def build(cls, result: Any, index: int, display: Optional[np.ndarray], region: Optional[np.ndarray],
              input_file: Any, scan: Any, signed: bool = False,
              scan_region: Any = None) -> "ImageResult":
        """One image of `result`; pictures draw each method as its registry entry says (`signed`: the raw signed maps),
        on the scan's own plane when the preparation can be inverted (`scan_region`: the region on that plane)."""
        raw = {m: result[m][index].detach().float().cpu().numpy() for m in result}
        spatial = next(iter(raw.values())).shape[1:] if raw else ()
        image = np.zeros(spatial, dtype=np.float32) if display is None else np.asarray(display, dtype=np.float32)
        if region is not None:
            region = np.asarray(region, dtype=bool)
            if spatial and tuple(region.shape) != tuple(spatial):
                raise OutputError(f"the region has shape {region.shape} but the maps are {tuple(spatial)}.")
        probs = result.probabilities[index].detach().float().cpu()
        targets = result.targets[index].tolist()
        names = result.target_names()[index]
        displays = {m: "signed" if signed else _registry_display(m) for m in raw}
        titles = [f"{n} (p={float(probs[t]):.2f})" for n, t in zip(names, targets)]
        if _region_targets(result):  # a region or box score is a sum, not a probability
            titles = [f"{n} (score={float(result.logits[index, t]):.3g})" for n, t in zip(names, targets)]
        return cls(result, index, raw, image, titles, target_file_names(result, index), region,
                   Path(input_file) if input_file is not None else None, scan, displays=displays,
                   view=scan_view(scan, spatial, image, region, scan_region))

    @functools.cached_property
    def scales(self) -> dict[str, tuple[str, float, float]]:
        """method -> the colour scale shared by its targets (of what is drawn), set when a picture is first drawn,
        and recorded in provenance ("rendering"); outputs without pictures (npz, NIfTI) neither make nor record it."""
        scales = {m: color_scale(shown(raw, self.displays[m])) for m, raw in self.raw.items()}
        self.provenance["rendering"] = {
            "colour_maps": {m: {"cmap": s[0], "vmin": s[1], "vmax": s[2], "display": self.displays[m]}
                            for m, s in scales.items()},
            "note": "one colour scale per method shared by its targets, up to the 99.5th percentile of |map| for maps of "
                    "1024 values or more (higher values saturate); each method drawn as defined (display: its positive "
                    "part, |map|, or signed; --signed draws every map signed); maps.npz holds the raw, unnormalised values",
            "grid": self.view.note if self.view is not None else "the model's grid",
        }
        return scales


def _region_targets(result: Any) -> bool:
    """Whether the result explains region targets (its provenance says so), without copying its provenance."""
    has = getattr(result, "has_provenance", None)
    return bool(has("region_targets")) if has is not None else "region_targets" in result.provenance


def _registry_display(method: str) -> str:
    """How the method registry says `method` is drawn ("signed" for a name it does not know)."""
    from medlens.core.registry import all_specs

    spec = all_specs().get(method)
    return spec.display if spec is not None else "signed"


def target_file_names(result: Any, image_index: int = 0) -> list[str]:
    """Safe, unique file-name parts for the targets of one image ("Effusion", "class_2", ...)."""
    names = result.target_names()[image_index]
    out: list[str] = []
    for t, name in zip(result.targets[image_index].tolist(), names):
        base = safe_name(name) if result.labels else f"class_{t}"
        candidate, n = base, 2
        while candidate.casefold() in {o.casefold() for o in out}:
            candidate, n = f"{base}_{n}", n + 1
        out.append(candidate)
    return out


def overlay_name(method: str, file_part: str) -> str:
    """The overlay file of one method and target: `<method>_<target>.png`."""
    return f"{safe_name(method)}_{file_part}.png"


def write_png(job: ImageResult, folder: Path) -> list[Path]:
    """An overlay PNG per method and target (raw-value colour bar, region outlined) and `panel.png` with them all."""
    written: list[Path] = []
    view = job.view or ScanView(tuple(job.display.shape), job.display, job.region, False, "")
    drawn = {m: view.maps(maps) for m, maps in job.raw.items()}  # on the scan's plane where the preparation inverts
    cells: dict[str, list[np.ndarray]] = {}  # each map blended once, for its overlay and for the panel
    pictures = []  # each overlay's picture and deflated rows: a panel of one target per method is them stacked
    for m, maps in drawn.items():
        for j, part in enumerate(job.file_parts):
            rgb, lines, scale, label = overlay_cell(view.display, maps[j], title=f"{m}: {job.titles[j]}",
                                                    scale=job.scales[m], region=view.region,
                                                    display=job.displays.get(m, "signed"))
            cells.setdefault(m, []).append(rgb)
            picture = overlay_picture(rgb, lines, scale, label)
            pictures.append((picture, deflate_rows(picture)))
            written.append(atomic_write(folder / overlay_name(m, part), png_from_parts([pictures[-1][1]])))
    if job.raw:
        written.append(atomic_write(folder / "panel.png", _panel_png(job, view, drawn, cells, pictures)))
    return written


def _panel_png(job: ImageResult, view: ScanView, drawn: dict[str, np.ndarray], cells: dict[str, list[np.ndarray]],
               pictures: list) -> bytes:
    """`panel.png`: with one target per method on a plane, the methods' overlays one under the other (what
    `panel_picture` draws then, `tests/test_png_parts.py`), written from their deflated rows; else drawn as a grid."""
    if len(job.file_parts) == 1 and all(maps.ndim == 3 for maps in drawn.values()) and \
            len({picture.shape[1:] for picture, _ in pictures}) == 1:
        return png_from_parts([part for _, part in pictures])
    return encode_png(panel_picture(view.display, drawn, job.titles, scales=job.scales, region=view.region,
                                    displays=job.displays, drawn=cells))


def write_npz(job: ImageResult, folder: Path) -> list[Path]:
    """`maps.npz`: per method the (1, T, *spatial) raw maps, plus targets, logits, probabilities (not for region
    targets, whose logits are the region scores), labels (and region)."""
    result, i = job.result, job.index
    arrays: dict[str, np.ndarray] = {m: maps[None] for m, maps in job.raw.items()}
    arrays["targets"] = result.targets[i : i + 1].cpu().numpy()
    arrays["logits"] = result.logits[i : i + 1].detach().float().cpu().numpy()
    if not _region_targets(result):  # region scores are sums of logits: a softmax of them means nothing
        arrays["probabilities"] = result.probabilities[i : i + 1].detach().float().cpu().numpy()
    if result.labels:
        arrays["labels"] = np.array(result.labels, dtype=str)
    if job.region is not None:
        arrays["region"] = job.region

    def save(fh: Any) -> None:
        np.savez(fh, **arrays)  # uncompressed: float maps barely compress, and writing stays fast

    return [atomic_write(folder / "maps.npz", save)]


FormatWriter = Callable[[ImageResult, Path], list[Path]]


# The DICOM and NIfTI writers are imported on first use: pydicom and nibabel take over a second to import, which
# every start of `medlens batch` writing PNG or NPZ paid.
def write_dicom(job: ImageResult, folder: Path) -> list[Path]:
    """`medlens.io.format_dicom.write_dicom` (Parametric Map, Secondary Capture) and, for a segmentation model, the
    predicted mask as a DICOM Segmentation (`medlens.io.format_dicom_seg`), imported on first use."""
    from medlens.io.format_dicom import write_dicom as write
    from medlens.io.format_dicom_seg import write_segmentation

    return write(job, folder) + write_segmentation(job, folder)


def write_nifti(*args: Any, **kwargs: Any) -> Any:
    """`medlens.io.format_nifti.write_nifti`, imported on first use."""
    from medlens.io.format_nifti import write_nifti as write

    return write(*args, **kwargs)


FORMATS: dict[str, FormatWriter] = {
    "png": write_png,
    "npz": write_npz,
    "nifti": write_nifti,  # maps in the input's world space (io/format_nifti.py)
    "dicom": write_dicom,  # Parametric Map + Secondary Capture in the source's study (io/format_dicom.py), SEG (_seg)
}
DEFAULT_FORMATS: tuple[str, ...] = ("png", "npz")


def check_formats(formats: Sequence[str]) -> list[str]:
    """The format names, checked against `FORMATS` before any work (`provenance.json` is always written)."""
    names = [str(f).strip().lower() for f in ([formats] if isinstance(formats, str) else formats)]
    names = [n for n in names if n and n != "json"]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise OutputError(f"unknown output format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)} "
                          f"(provenance.json is always written).")
    return list(dict.fromkeys(names))
