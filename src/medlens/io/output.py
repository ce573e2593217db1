"""Writing results: overlay and panel PNGs, raw maps as `.npz`, and `provenance.json`, every file atomically.

Maps are normalised here and only here, for drawing: one colour scale per method shared by all targets of
an image (so an absent finding does not look as hot as a confident one); the `.npz` keeps the raw values.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import OutputError

PathLike = Union[str, os.PathLike]

SEQUENTIAL_CMAP = "inferno"  # perceptual colour map for non-negative maps
DIVERGING_CMAP = "RdBu_r"  # diverging colour map centred at 0 for signed maps
OVERLAY_ALPHA = 0.5


# --------------------------------------------------------------------------------------------- files


def ensure_writable(folder: PathLike) -> Path:
    """Create `folder` if needed and check a file can be written there; OutputError otherwise (before any work)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the output path {folder} exists and is not a folder; choose another folder with --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise OutputError(f"the output folder {folder} cannot be created ({exc.strerror or exc}); choose another folder with --out.") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".medlens-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"the output folder {folder} is not writable ({exc.strerror or exc}); choose another folder with --out.") from None
    return folder


def atomic_write(path: PathLike, data: Union[bytes, str, Callable[[Any], None]]) -> Path:
    """Write bytes, text, or what `data(fileobj)` writes, to a temp file beside `path`, then os.replace it.

    Either the whole new file is there afterwards, or (on any error) the old state: never half a file.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}); check the output folder.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray)):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path} ({exc.strerror or exc}); check the output folder and free space.") from None
        raise
    return path


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_name(text: str) -> str:
    """A file-name-safe version of a class or method name ("Pleural Effusion" -> "Pleural_Effusion")."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._")
    return cleaned or "unnamed"


# --------------------------------------------------------------------------------------------- drawing


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def color_scale(maps: np.ndarray) -> tuple[str, float, float]:
    """(colour map, vmin, vmax) for maps of one method: 'inferno' on [0, max] if none is negative,
    else 'RdBu_r' on [-a, a] with a the largest magnitude (so 0 is the neutral colour)."""
    finite = maps[np.isfinite(maps)]
    if finite.size == 0:
        return SEQUENTIAL_CMAP, 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if low >= 0:
        return SEQUENTIAL_CMAP, 0.0, high if high > 0 else 1.0
    a = max(abs(low), abs(high))
    return DIVERGING_CMAP, -a, a


def best_slice(volume_map: np.ndarray) -> int:
    """The axial slice (axis 0) of a (D, H, W) map with the largest mass (sum of absolute values)."""
    return int(np.abs(volume_map).reshape(volume_map.shape[0], -1).sum(axis=1).argmax())


def _plane(image: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray, Optional[int]]:
    if amap.ndim == 3:
        k = best_slice(amap)
        return image[k] if image.ndim == 3 else image, amap[k], k
    return image, amap, None


def _draw(ax: Any, image: np.ndarray, amap: np.ndarray, cmap: str, vmin: float, vmax: float, title: str) -> Any:
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    artist = ax.imshow(amap, cmap=cmap, vmin=vmin, vmax=vmax, alpha=OVERLAY_ALPHA, interpolation="bilinear")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return artist


def render_overlay(image: np.ndarray, amap: np.ndarray, *, title: str = "", scale: Optional[tuple[str, float, float]] = None) -> bytes:
    """PNG bytes: the grayscale `image` (values in [0, 1]) with `amap` on top and a colour bar of raw values.

    For a volume (D, H, W) the slice with the largest map mass is drawn and named in the title.
    """
    image = _display_ready(image, amap.shape)
    cmap, vmin, vmax = scale or color_scale(amap)
    img2d, map2d, k = _plane(image, amap)
    if k is not None:
        title = f"{title}\nslice {k} of {amap.shape[0]} (largest map mass)"
    fig = _figure(4.2, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    artist = _draw(ax, img2d, map2d, cmap, vmin, vmax, title)
    fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.04)
    return _png_bytes(fig)


def render_panel(image: np.ndarray, maps: Mapping[str, np.ndarray], titles: Sequence[str], *,
                 scales: Optional[Mapping[str, tuple[str, float, float]]] = None) -> bytes:
    """PNG bytes: a grid of methods (rows) x targets (columns); `maps[method]` is (T, *spatial)."""
    names = list(maps)
    n_targets = max(len(maps[n]) for n in names) if names else 1
    fig = _figure(3.0 * n_targets + 0.6, 3.0 * max(1, len(names)))
    for row, name in enumerate(names):
        per_target = maps[name]
        cmap, vmin, vmax = (scales or {}).get(name) or color_scale(per_target)
        artist = None
        for col in range(n_targets):
            ax = fig.add_subplot(len(names), n_targets, row * n_targets + col + 1)
            amap = per_target[col]
            img2d, map2d, k = _plane(_display_ready(image, amap.shape), amap)
            title = f"{name}: {titles[col]}"
            if k is not None:
                title += f"\nslice {k} (largest mass)"
            artist = _draw(ax, img2d, map2d, cmap, vmin, vmax, title)
        if artist is not None:
            fig.colorbar(artist, ax=fig.axes[-n_targets:], fraction=0.02, pad=0.02)
    return _png_bytes(fig)


def _display_ready(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The grayscale display image resized to the map's spatial shape (when the caller did not), in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and len(shape) == 2 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if tuple(image.shape) != tuple(shape):
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(image))[None, None]
        mode = "trilinear" if len(shape) == 3 else "bilinear"
        if t.dim() - 2 != len(shape):
            raise OutputError(f"the display image {image.shape} does not match the maps {tuple(shape)}.")
        image = F.interpolate(t, size=tuple(shape), mode=mode, align_corners=False)[0, 0].numpy()
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 1:
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return image


# --------------------------------------------------------------------------------------------- results


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else {"tensor": list(value.shape)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def target_file_names(result: Any, image_index: int = 0) -> list[str]:
    """Safe, unique file-name parts for the targets of one image ("Effusion", "class_2", ...)."""
    names = result.target_names()[image_index]
    out: list[str] = []
    for t, name in zip(result.targets[image_index].tolist(), names):
        base = safe_name(name) if result.labels else f"class_{t}"
        candidate, n = base, 2
        while candidate in out:
            candidate, n = f"{base}_{n}", n + 1
        out.append(candidate)
    return out


def write_explanation(
    result: Any,
    out_dir: PathLike,
    *,
    image_index: int = 0,
    display: Optional[np.ndarray] = None,
    input_file: Optional[PathLike] = None,
    loading_notes: Sequence[str] = (),
    model_source: Optional[Mapping[str, Any]] = None,
    extra_provenance: Optional[Mapping[str, Any]] = None,
) -> list[Path]:
    """Write one image's results into `out_dir`: `<method>_<target>.png` per method and target, `panel.png`,
    `maps.npz` (per method (1, T, *spatial) raw maps, plus `targets`, `logits`, `probabilities`, `labels`) and
    `provenance.json` last. Each file is written atomically. Returns the paths written.

    `display` is the grayscale image (values in [0, 1]) at the maps' spatial size; without it the maps are
    drawn on a blank background.
    """
    folder = ensure_writable(out_dir)
    methods = list(result)
    i = image_index
    raw = {m: result[m][i].detach().float().cpu().numpy() for m in methods}  # (T, *spatial)
    spatial = next(iter(raw.values())).shape[1:] if raw else ()
    image = np.zeros(spatial, dtype=np.float32) if display is None else np.asarray(display, dtype=np.float32)
    probs = result.probabilities[i].detach().float().cpu()
    targets = result.targets[i].tolist()
    names = result.target_names()[i]
    file_parts = target_file_names(result, i)
    titles = [f"{n} (p={float(probs[t]):.2f})" for n, t in zip(names, targets)]
    scales = {m: color_scale(raw[m]) for m in methods}
    written: list[Path] = []
    for m in methods:
        for j, part in enumerate(file_parts):
            png = render_overlay(image, raw[m][j], title=f"{m}: {titles[j]}", scale=scales[m])
            written.append(atomic_write(folder / f"{safe_name(m)}_{part}.png", png))
    if methods:
        written.append(atomic_write(folder / "panel.png", render_panel(image, raw, titles, scales=scales)))

    arrays: dict[str, np.ndarray] = {m: raw[m][None] for m in methods}
    arrays["targets"] = result.targets[i : i + 1].cpu().numpy()
    arrays["logits"] = result.logits[i : i + 1].detach().float().cpu().numpy()
    arrays["probabilities"] = result.probabilities[i : i + 1].detach().float().cpu().numpy()
    if result.labels:
        arrays["labels"] = np.array(result.labels, dtype=str)

    def save_npz(fh: Any) -> None:
        np.savez_compressed(fh, **arrays)

    written.append(atomic_write(folder / "maps.npz", save_npz))

    from .. import __version__

    provenance = result.provenance
    provenance["medlens_version"] = __version__
    provenance["image_index"] = i
    if input_file is not None:
        path = Path(input_file)
        provenance["input_file"] = {"path": str(path.resolve()), "sha256": file_sha256(path) if path.is_file() else None}
    provenance["loading_notes"] = list(loading_notes)
    if model_source is not None:
        provenance["model_source"] = dict(model_source)
    provenance["rendering"] = {
        "colour_maps": {m: {"cmap": s[0], "vmin": s[1], "vmax": s[2]} for m, s in scales.items()},
        "note": "one colour scale per method shared by its targets; maps.npz holds the raw, unnormalised values",
    }
    if extra_provenance:
        provenance.update(dict(extra_provenance))
    provenance["files"] = [p.name for p in written] + ["provenance.json"]
    written.append(atomic_write(folder / "provenance.json", json.dumps(_jsonable(provenance), indent=2)))
    return written


__all__ = [
    "atomic_write",
    "best_slice",
    "color_scale",
    "ensure_writable",
    "file_sha256",
    "render_overlay",
    "render_panel",
    "safe_name",
    "target_file_names",
    "write_explanation",
]
