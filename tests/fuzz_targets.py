"""Fuzz targets for what medlens reads from outside: DICOM, PNG/JPEG/TIFF/BMP, NIfTI, YOLO box files, sidecar JSON and
`medlens explain` arguments, as hypothesis strategies and one `check_*` per format.

Each check feeds one generated input to medlens and accepts two endings only: a result, or a `MedlensError` whose message
is one non-empty line. Anything else (another exception, a hang past `TIME_LIMIT_S`, memory beyond the fuzzing limits)
fails. Shared by tests/test_fuzz_readers.py (short, derandomized, in the suite) and benchmarks/fuzz_readers.py (long).
"""
from __future__ import annotations

import collections
import contextlib
import gzip
import io
import json
import os
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from medlens.errors import MedlensError
from medlens.io import read_image, set_limits

TIME_LIMIT_S = 20  # one input taking longer than this counts as a hang
# Fuzzing runs under small limits, so a header that claims a lot is refused, never allocated.
FUZZ_LIMITS = {"hard_bytes": 256 * 2**20, "hard_pixels_2d": 2**24, "hard_voxels_3d": 2**24}
COUNTS: collections.Counter = collections.Counter()  # inputs tried and outcomes, per format


class Hang(Exception):
    """An input took longer than TIME_LIMIT_S."""


@contextlib.contextmanager
def bounded(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    """Small size limits and a wall-clock alarm around one input (main thread, Unix)."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    set_limits(**FUZZ_LIMITS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        set_limits(**{k: None for k in FUZZ_LIMITS})


def ends_well(fmt: str, call: Callable[[], Any]) -> str:
    """Run `call` under `bounded`; "result" or "refused" (a one-line MedlensError); anything else propagates."""
    COUNTS[(fmt, "tried")] += 1
    try:
        with bounded():
            value = call()
    except MedlensError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message, f"a refusal that is not one line: {message!r}"
        COUNTS[(fmt, "refused")] += 1
        return "refused"
    if hasattr(value, "pixels"):
        assert value.pixels.dtype == np.float32 and np.isfinite(value.pixels).all() and value.pixels.size > 0
    COUNTS[(fmt, "result")] += 1
    return "result"


# --------------------------------------------------------------------------------------------- byte mutations

EDIT = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.floats(0, 1), st.binary(min_size=1, max_size=8))


def mutate(data: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    """Apply byte edits (position as a fraction of the length) to `data`."""
    out = bytearray(data)
    for kind, where, chunk in edits:
        at = min(len(out), int(where * len(out)))
        if kind == "flip" and out:
            at = min(at, len(out) - 1)
            out[at] ^= chunk[0] or 0xFF
        elif kind == "set":
            out[at: at + len(chunk)] = chunk
        elif kind == "insert":
            out[at:at] = chunk * (1 + chunk[0] % 16)
        elif kind == "delete":
            del out[at: at + 1 + chunk[0] % 64]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


# --------------------------------------------------------------------------------------------- DICOM

DICOM_SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "SC_rgb.dcm",
               "emri_small.dcm", "rtplan.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_bigendian.dcm", "JPEG-lossy.dcm",
               "SC_jpeg_no_color_transform.dcm", "ExplVR_BigEndNoMeta.dcm", "liver_1frame.dcm", "SC_rgb_small_odd.dcm")
DICOM_ATTRIBUTES = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
                    "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration", "RescaleSlope",
                    "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTFunction", "PixelSpacing", "SliceThickness",
                    "Modality", "SOPClassUID", "TransferSyntaxUID")
ODD_VALUES = st.one_of(
    st.integers(-2**31, 2**32), st.sampled_from([0, 1, -1, 3, 8, 12, 16, 32, 64, 65535, 2**31 - 1, 10**9]),
    st.sampled_from(["", "abc", "1\\2", "nan", "inf", "-0", "1e308", "0.0", "MONOCHROME1", "PALETTE COLOR", "YBR_FULL",
                     "RGB", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.2", "1.2.3"]),
    st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True))


def dicom_seed_bytes() -> list[bytes]:
    """The seed files: small files of pydicom's corpus (local copies only), then files made here."""
    import pydicom.data

    seeds = []
    by_name = {Path(p).name: Path(p) for p in pydicom.data.get_testdata_files()}
    for name in DICOM_SEEDS:
        if name in by_name:
            seeds.append(by_name[name].read_bytes())
    seeds.extend(made_dicom_bytes())
    return seeds


def made_dicom_bytes() -> list[bytes]:
    """Generated seeds: 16-bit signed CT with a window, 12-bit MONOCHROME1, an 8-bit-valued multi-frame."""
    from helpers import make_dicom

    rng = np.random.RandomState(0)
    arrays = [
        (rng.randint(-1024, 2000, (12, 10)).astype(np.int16), {"RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}),
        (rng.randint(0, 4096, (9, 7)).astype(np.uint16), {"PhotometricInterpretation": "MONOCHROME1", "BitsStored": 12}),
        (rng.randint(0, 255, (3, 6, 5)).astype(np.uint16), {}),
    ]
    with tempfile.TemporaryDirectory() as folder:
        return [make_dicom(Path(folder) / f"{i}.dcm", arr, **attrs).read_bytes() for i, (arr, attrs) in enumerate(arrays)]


@st.composite
def dicom_inputs(draw: Any, seeds: list[bytes]) -> bytes:
    """A seed with header values set to odd ones, pixel data replaced, and/or bytes edited."""
    import pydicom

    data = draw(st.sampled_from(seeds))
    changes = draw(st.lists(st.tuples(st.sampled_from(DICOM_ATTRIBUTES), ODD_VALUES), max_size=3))
    new_pixels = draw(st.one_of(st.none(), st.binary(max_size=512)))
    if changes or new_pixels is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
                for name, value in changes:
                    target = ds.file_meta if name == "TransferSyntaxUID" else ds
                    setattr(target, name, value if not isinstance(value, float) else str(value))
                if new_pixels is not None and "PixelData" in ds:
                    ds.PixelData = new_pixels
                buffer = io.BytesIO()
                ds.save_as(buffer)
                data = buffer.getvalue()
        except Exception:  # noqa: BLE001 - pydicom would not write this value: keep the seed, edit its bytes below
            pass
    return mutate(data, draw(st.lists(EDIT, max_size=3)))


def check_dicom(data: bytes, folder: Path) -> str:
    path = folder / "fuzz.dcm"
    path.write_bytes(data)
    return ends_well("dicom", lambda: read_image(path))


# --------------------------------------------------------------------------------------------- raster

RASTER_MODES = {"PNG": ("L", "LA", "RGB", "RGBA", "P", "I;16", "1"), "JPEG": ("L", "RGB", "CMYK"),
                "TIFF": ("L", "RGB", "I;16", "F", "1", "CMYK", "RGBA"), "BMP": ("L", "RGB", "P", "1")}
RASTER_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}


@st.composite
def raster_inputs(draw: Any) -> tuple[str, bytes]:
    """(format, bytes): an 8/16-bit, float, palette or colour image of 1..40 pixels a side, then byte edits."""
    fmt = draw(st.sampled_from(sorted(RASTER_MODES)))
    mode = draw(st.sampled_from(RASTER_MODES[fmt]))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.RandomState(draw(st.integers(0, 2**16)))
    bands = len(Image.new(mode, (1, 1)).getbands())
    if mode == "I;16":
        img = Image.fromarray(rng.randint(0, 65536, (h, w)).astype(np.uint16))
    elif mode == "F":
        values = rng.randn(h, w).astype(np.float32) * draw(st.sampled_from([1.0, 1e30, 1e-30]))
        img = Image.fromarray(values)  # float32: mode F
    else:
        arr = rng.randint(0, 256, (h, w, bands) if bands > 1 else (h, w)).astype(np.uint8)
        img = Image.fromarray(arr[..., :4] if bands != 2 else arr).convert(mode)  # L, LA, RGB or RGBA by shape
    buffer = io.BytesIO()
    frames = draw(st.integers(1, 3)) if fmt == "TIFF" else 1
    if frames > 1:
        img.save(buffer, format=fmt, save_all=True, append_images=[img] * (frames - 1))
    else:
        img.save(buffer, format=fmt)
    return fmt, mutate(buffer.getvalue(), draw(st.lists(EDIT, max_size=3)))


def check_raster(item: tuple[str, bytes], folder: Path) -> str:
    fmt, data = item
    path = folder / ("fuzz" + RASTER_SUFFIX[fmt])
    path.write_bytes(data)
    return ends_well(fmt.lower(), lambda: read_image(path))


# --------------------------------------------------------------------------------------------- NIfTI

NIFTI_FIELDS = {
    "dim": st.lists(st.integers(-3, 40), min_size=8, max_size=8),
    "pixdim": st.lists(st.floats(-1e6, 1e6, allow_nan=True, allow_infinity=True, width=32), min_size=8, max_size=8),
    "scl_slope": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "scl_inter": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "datatype": st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999]),
    "bitpix": st.sampled_from([0, 1, 8, 16, 32, 64, 128, 255]),
    "vox_offset": st.floats(-10, 1e4, allow_nan=True, width=32),
    "qform_code": st.integers(-5, 5), "sform_code": st.integers(-5, 5),
    "srow_x": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4),
    "quatern_b": st.floats(allow_nan=True, allow_infinity=True, width=32),
}


@st.composite
def nifti_inputs(draw: Any) -> tuple[bool, bytes]:
    """(gzipped, bytes): a small 2-D to 4-D image of several dtypes, header fields set to odd values, data cut or edited."""
    import nibabel as nib

    shape = tuple(draw(st.lists(st.integers(1, 10), min_size=2, max_size=4)))
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.float64]))
    rng = np.random.RandomState(draw(st.integers(0, 2**16)))
    values = (rng.randn(*shape) * 100).astype(dtype)
    img = nib.Nifti1Image(values, np.eye(4))
    header = img.header
    for name, strategy in NIFTI_FIELDS.items():
        if draw(st.booleans()) and draw(st.booleans()):  # about a quarter of the fields each time
            try:
                header[name] = draw(strategy)
            except (ValueError, TypeError, OverflowError):
                pass
    offset = max(352, int(img.header["vox_offset"]) if np.isfinite(img.header["vox_offset"]) else 352)
    raw = header.binaryblock + b"\0" * (offset - 348) + values.tobytes()
    raw = mutate(raw, draw(st.lists(EDIT, max_size=2)))
    gzipped = draw(st.booleans())
    return gzipped, gzip.compress(raw, mtime=0) if gzipped else raw


def check_nifti(item: tuple[bool, bytes], folder: Path) -> str:
    gzipped, data = item
    path = folder / ("fuzz.nii.gz" if gzipped else "fuzz.nii")
    path.write_bytes(data)
    return ends_well("nifti", lambda: read_image(path))


# --------------------------------------------------------------------------------------------- YOLO boxes

NUMBER_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10, 10).map(str),
                        st.sampled_from(["nan", "inf", "-inf", "1e400", "0x1p3", "1_0", "", "½", "0.5,"]))
BOX_LINE = st.lists(st.one_of(NUMBER_TEXT, st.text(max_size=4)), min_size=0, max_size=7).map(" ".join)
BOX_FILE = st.one_of(st.lists(BOX_LINE, max_size=4).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
                     st.binary(max_size=64))


def check_boxes(data: bytes, folder: Path) -> str:
    """The two YOLO box readers: the evaluation runner's mask and the figshare dataset's parser."""
    from medlens.data.figshare import parse_box_file
    from medlens.evaluation_run.dataset import box_mask

    path = folder / "fuzz.txt"
    path.write_bytes(data)
    first = ends_well("yolo", lambda: box_mask(path, (16, 12)))
    second = ends_well("yolo", lambda: parse_box_file(path))
    return f"{first}/{second}"


# --------------------------------------------------------------------------------------------- sidecar JSON

SPEC_KEYS = ("labels", "size", "channels", "scale", "mean", "std", "multi_label", "resample", "modality", "notes", "extra",
             "architecture", "num_classes", "in_channels")
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False), st.text(max_size=10),
              st.sampled_from([0, 1, 3, -1, 224, 10**6, "224", "64,64", "a,b", "uint8", "area", "torchvision:resnet18"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
SIDECAR = st.one_of(
    st.dictionaries(st.sampled_from(SPEC_KEYS), JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40))


def check_sidecar(data: bytes, model_file: Path) -> str:
    from medlens.models.loading import load_model

    sidecar = model_file.with_name(model_file.name + ".json")
    sidecar.write_bytes(data)
    try:
        return ends_well("sidecar", lambda: load_model(model_file))
    finally:
        sidecar.unlink()


# --------------------------------------------------------------------------------------------- CLI arguments

METHOD_NAMES = ("gradcam", "layercam", "saliency", "cam", "inputxgradient", "lrp", "occlusion", "nonsense", "", "GRADCAM")
CLI_OPTIONS = {
    "--methods": st.lists(st.sampled_from(METHOD_NAMES), min_size=1, max_size=3).map(",".join),
    "--targets": st.one_of(st.sampled_from(["0", "1", "lesion", "normal", "all", "7", "-1", "", "0,0", "x"]), st.text(max_size=5)),
    "--layer": st.sampled_from(["features", "nope", "", "features.0", "fc"]),
    "--seed": st.sampled_from(["0", "-1", "x", "99999999999999999999"]),
    "--labels": st.sampled_from(["a,b", "a", "", ",", "a,b,c"]),
    "--input-size": st.sampled_from(["64", "0", "-5", "64,64", "abc", "8,8,8", "100000"]),
    "--channels": st.sampled_from(["1", "3", "0", "x"]),
    "--slice": st.sampled_from(["0", "-1", "99", "x"]),
    "--frame": st.sampled_from(["0", "1", "-1", "x"]),
    "--device": st.sampled_from(["cpu", "gpu9", "", "meta"]),
    "--option": st.sampled_from(["eigen_smooth=true", "n_steps=0", "window=-3", "bad", "=1", "stride=x"]),
    "--multi-label": st.none(), "--single-label": st.none(), "--allow-pickle": st.none(),
}


@st.composite
def cli_arguments(draw: Any) -> list[str]:
    """A list of `medlens explain` options drawn from the real ones with odd values, and now and then a stray token."""
    args: list[str] = []
    for option in draw(st.lists(st.sampled_from(sorted(CLI_OPTIONS)), max_size=4)):
        args.append(option)
        strategy = CLI_OPTIONS[option]
        value = draw(strategy)
        if value is not None:
            args.append(value)
    if draw(st.booleans()) and draw(st.booleans()):
        args.insert(draw(st.integers(0, len(args))), draw(st.sampled_from(["--", "-x", "--out", "explain", "\0"])))
    return args


def check_cli(args: list[str], image: Path, out: Path) -> str:
    """`medlens explain IMAGE --model phantom-lesion --out OUT ARGS...`: exit 0, or 2 with one `medlens: error:` line."""
    from medlens.cli.group import main

    COUNTS[("cli", "tried")] += 1
    stderr = io.StringIO()
    here = os.getcwd()
    os.chdir(out)  # a stray "--out" makes the next token the output folder: keep it inside the fuzzing folder
    try:
        with bounded(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["explain", str(image), "--model", "phantom-lesion", "--out", str(out / "out"), *args])
    finally:
        os.chdir(here)
    text = stderr.getvalue()
    assert "Traceback" not in text, text
    assert code in (0, 2), (code, text)
    COUNTS[("cli", "result" if code == 0 else "refused")] += 1
    return "result" if code == 0 else "refused"
