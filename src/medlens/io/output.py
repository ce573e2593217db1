"""Writing results: overlay and panel PNGs, raw maps as `.npz`, and `provenance.json`, every file atomically.

Maps are normalised here and only here, for drawing: one colour scale per method shared by all targets of
an image (so an absent finding does not look as hot as a confident one); the `.npz` keeps the raw values.
Images are composed with numpy and Pillow; matplotlib supplies only its colour maps (no figures, no backend).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from medlens.errors import OutputError
from medlens.io.digests import file_sha256

PathLike = Union[str, os.PathLike]

SEQUENTIAL_CMAP = "inferno"  # perceptual colour map for non-negative maps
DIVERGING_CMAP = "RdBu_r"  # diverging colour map centred at 0 for signed maps
OVERLAY_ALPHA = 0.75  # the opacity of the strongest map value


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


def safe_name(text: str) -> str:
    """A file-name-safe version of a class or method name ("Pleural Effusion" -> "Pleural_Effusion")."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._")
    if len(cleaned) > MAX_NAME_PART:  # file systems cap names at 255 bytes; keep it readable and unique
        cleaned = cleaned[: MAX_NAME_PART - 9] + "-" + hashlib.sha256(str(text).encode()).hexdigest()[:8]
    return cleaned or "unnamed"


MAX_NAME_PART = 80  # characters of a class or method name in a file name


# --------------------------------------------------------------------------------------------- drawing
# Overlays and panels are composed directly with numpy and Pillow (matplotlib only supplies the colour
# maps): a 6-method x 14-finding chest X-ray renders in about a second instead of the better part of a
# minute with one matplotlib figure per overlay.

MIN_TILE_SIDE = 224  # small inputs are enlarged (nearest neighbour, whole factors) to at least this size
MIN_PANEL_TILE_SIDE = 224  # the same for each cell of a panel


@functools.lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _font(size: int = 13) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


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


def blend(image: np.ndarray, amap: np.ndarray, scale: tuple[str, float, float], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGB (H, W, 3): the grayscale `image` in [0, 1] with `amap` coloured by `scale` on top.

    The colour's opacity grows with the map's magnitude (alpha * sqrt(|value| / scale)), so the anatomy stays
    readable where the map is near zero and strong evidence is drawn almost opaque.
    """
    cmap, vmin, vmax = scale
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip(np.nan_to_num((amap - vmin) / span), 0.0, 1.0)
    colour = _lut(cmap)[(t * 255.0 + 0.5).astype(np.int64)]
    magnitude = np.abs(2.0 * t - 1.0) if vmin < 0 < vmax else t
    weight = (alpha * np.sqrt(magnitude))[..., None]
    gray = np.clip(image, 0.0, 1.0)[..., None] * 255.0
    return np.clip((1.0 - weight) * gray + weight * colour + 0.5, 0, 255).astype(np.uint8)


def _enlarge(rgb: np.ndarray, min_side: int = MIN_TILE_SIDE) -> np.ndarray:
    factor = max(1, int(np.ceil(min_side / max(rgb.shape[:2]))))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else rgb


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _wrap(lines: Sequence[str], width: int) -> list[str]:
    """`lines` broken at spaces so that each fits in `width` pixels (a word longer than that stays whole)."""
    font = _font()
    out: list[str] = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > width - 8:
                out.append(current)
                current = word
            else:
                current = candidate
        out.append(current)
    return out


def _tile(rgb: np.ndarray, lines: Sequence[str], min_side: int = MIN_TILE_SIDE, n_lines: int = 0) -> Any:
    """A PIL image: the enlarged overlay under a header with `lines` of text (wrapped to the tile's width;
    padded to `n_lines` so the tiles of a panel row line up)."""
    from PIL import Image, ImageDraw

    body = Image.fromarray(_enlarge(rgb, min_side))
    font = _font()
    lines = _wrap(lines, body.width)
    lines = lines + [""] * max(0, n_lines - len(lines))
    header = 6 + 17 * len(lines)
    tile = Image.new("RGB", (body.width, body.height + header), "white")
    draw = ImageDraw.Draw(tile)
    for n, line in enumerate(lines):
        draw.text((4, 3 + 17 * n), line, fill="black", font=font)
    tile.paste(body, (0, header))
    return tile


def _colour_bar(width: int, scale: tuple[str, float, float]) -> Any:
    """A PIL strip: the colour map from vmin to vmax with the raw values at its ends (and 0 when signed)."""
    from PIL import Image, ImageDraw

    cmap, vmin, vmax = scale
    font = _font(12)
    margin = 8
    bar_w = max(16, width - 2 * margin)
    ramp = _lut(cmap)[np.linspace(0, 255, bar_w).astype(np.int64)].astype(np.uint8)
    strip = Image.new("RGB", (width, 34), "white")
    strip.paste(Image.fromarray(np.repeat(ramp[None], 12, axis=0)), (margin, 2))
    draw = ImageDraw.Draw(strip)
    draw.text((margin, 16), _fmt(vmin), fill="black", font=font)
    right = _fmt(vmax)
    draw.text((margin + bar_w - int(draw.textlength(right, font=font)), 16), right, fill="black", font=font)
    if vmin < 0 < vmax:
        draw.text((margin + bar_w // 2 - 3, 16), "0", fill="black", font=font)
    return strip


def _stack(parts: Sequence[Any]) -> Any:
    from PIL import Image

    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _png(img: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_overlay(image: np.ndarray, amap: np.ndarray, *, title: str = "", scale: Optional[tuple[str, float, float]] = None) -> bytes:
    """PNG bytes: the grayscale `image` (values in [0, 1]) with `amap` on top, a title and a colour bar of raw values.

    For a volume (D, H, W) the slice with the largest map mass is drawn and named in the title.
    """
    image = _display_ready(image, amap.shape)
    scale = scale or color_scale(amap)
    img2d, map2d, k = _plane(image, amap)
    lines = [title] if title else []
    if k is not None:
        lines.append(f"slice {k} of {amap.shape[0]} (largest map mass)")
    tile = _tile(blend(img2d, map2d, scale), lines)
    return _png(_stack([tile, _colour_bar(tile.width, scale)]))


def render_panel(image: np.ndarray, maps: Mapping[str, np.ndarray], titles: Sequence[str], *,
                 scales: Optional[Mapping[str, tuple[str, float, float]]] = None) -> bytes:
    """PNG bytes: a grid of methods (rows) x targets (columns), `maps[method]` being (T, *spatial); each row has
    one colour scale (shared by its targets) shown under it."""
    from PIL import Image

    rows = []
    for name, per_target in maps.items():
        scale = (scales or {}).get(name) or color_scale(per_target)
        cells = []
        for col in range(len(per_target)):
            amap = per_target[col]
            img2d, map2d, k = _plane(_display_ready(image, amap.shape), amap)
            lines = [f"{name}: {titles[col]}"] + ([f"slice {k} (largest map mass)"] if k is not None else [])
            rgb = blend(img2d, map2d, scale)
            cells.append((rgb, lines, len(_wrap(lines, _enlarge(rgb, MIN_PANEL_TILE_SIDE).shape[1]))))
        n_lines = max(c[2] for c in cells)
        tiles = [_tile(rgb, lines, MIN_PANEL_TILE_SIDE, n_lines) for rgb, lines, _ in cells]
        width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
        row = Image.new("RGB", (width, max(t.height for t in tiles)), "white")
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width + 4
        rows.append(_stack([row, _colour_bar(tiles[0].width, scale)]))
    if not rows:
        return _png(Image.new("RGB", (1, 1), "white"))
    return _png(_stack(rows))


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
    `provenance.json` last. The set is written as one: every file is first written to a staging folder, then the
    files are moved in (those they replace set aside until all are in, and put back on an error), so on an error
    the folder keeps what it had; a crash during the moves (renames only) can still leave a mix. Files of an
    earlier run in the folder that this run does not write are removed. Returns the paths written.

    `display` is the grayscale image (values in [0, 1]) at the maps' spatial size; without it the maps are
    drawn on a blank background.
    """
    folder = ensure_writable(out_dir)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".medlens-staging-"))
    try:
        staged = _write_staged(result, staging, image_index, display, input_file, loading_notes, model_source,
                               extra_provenance)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    earlier = _files_of_earlier_run(folder)
    previous = staging / ".previous"  # files this run replaces wait here until every new file is in place
    written: list[Path] = []
    set_aside: list[Path] = []
    try:
        previous.mkdir()
        for path in staged:
            target = folder / path.name
            if target.exists():
                os.replace(target, previous / path.name)
                set_aside.append(target)
            os.replace(path, target)
            written.append(target)
    except OSError as exc:  # e.g. a file held open by a viewer (Windows): put the earlier set back
        for target in written:
            with contextlib.suppress(OSError):
                target.unlink()
        for target in set_aside:
            with contextlib.suppress(OSError):
                os.replace(previous / target.name, target)
        raise OutputError(f"cannot write the results into {folder} ({exc.strerror or exc}); the folder keeps what it "
                          f"had. Close any program that holds its files open, or choose another folder with --out.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Files of the earlier run that this one did not write. Compared without case: on a case-insensitive file
    # system "gradcam_Mass.png" and "gradcam_mass.png" are one file, which this run has just written.
    kept = {p.name.casefold() for p in written}
    for name in earlier:
        stale = folder / name
        if name.casefold() not in kept and stale.is_file() and stale.parent == folder:
            stale.unlink()
    return written


def _files_of_earlier_run(folder: Path) -> set[str]:
    """The files an earlier write_explanation put in `folder`, as its provenance.json lists them."""
    try:
        files = json.loads((folder / "provenance.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str) and f == Path(f).name}


def _write_staged(result: Any, folder: Path, image_index: int, display: Optional[np.ndarray],
                  input_file: Optional[PathLike], loading_notes: Sequence[str],
                  model_source: Optional[Mapping[str, Any]], extra_provenance: Optional[Mapping[str, Any]]) -> list[Path]:
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
        np.savez(fh, **arrays)  # uncompressed: float maps barely compress, and writing stays fast

    written.append(atomic_write(folder / "maps.npz", save_npz))

    from medlens.version import __version__

    provenance = result.provenance
    provenance["medlens_version"] = __version__
    provenance["image_index"] = i
    if input_file is not None:
        path = Path(input_file)
        if path.is_dir():  # a DICOM series folder: the digest of its files' names and digests, in order
            h = hashlib.sha256()
            for f in sorted(p for p in path.iterdir() if p.is_file()):
                h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
            digest: Optional[str] = h.hexdigest()
        else:
            digest = file_sha256(path) if path.is_file() else None
        provenance["input_file"] = {"path": str(path.resolve()), "sha256": digest}
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
