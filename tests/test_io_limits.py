"""Size limits: scans whose headers claim too much are refused before their pixels are decoded (decompression bombs
included), checked by the peak memory of a process that reads them; the limits are documented and settable."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.errors import InputError
from medlens.io import current_limits, read_image, set_limits
from medlens.io import limits
from helpers import make_dicom

HERE = Path(__file__).resolve().parent


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid-looking 8-bit gray PNG whose header claims width x height, with one compressed row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1), 9)  # one row; a decoder would allocate the whole image first
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small real JPEG with its SOF0 frame header patched to claim width x height."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def tiff_claiming(path: Path, width: int, height: int) -> Path:
    """An 8 x 8 uncompressed TIFF with its ImageWidth/ImageLength tags patched to claim width x height."""
    import tifffile

    tifffile.imwrite(str(path), np.zeros((8, 8), dtype=np.uint8))
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(str(path)) as tf:
        tags = tf.pages[0].tags
        offsets = {name: tags[name].valueoffset for name in ("ImageWidth", "ImageLength")}
        kinds = {name: tags[name].dtype for name in ("ImageWidth", "ImageLength")}
    for name, value in (("ImageWidth", width), ("ImageLength", height)):
        fmt = "<I" if int(kinds[name]) == 4 else "<H"
        data[offsets[name]: offsets[name] + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))
    return path


def dicom_claiming(path: Path, rows: int, columns: int, frames: int = 1) -> Path:
    """A DICOM whose header claims rows x columns x frames 16-bit pixels, holding 64 bytes of pixel data."""
    return make_dicom(path, np.zeros((4, 8), dtype=np.uint16), Rows=rows, Columns=columns, NumberOfFrames=frames)


def nifti_claiming(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI-1 file whose header claims `shape` (float32) but holds 64 voxels."""
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4))
    header = img.header.copy()
    header.set_data_shape(shape)
    data = header.binaryblock + b"\0" * (int(header["vox_offset"]) - 348) + np.zeros(64, dtype=np.float32).tobytes()
    path.write_bytes(data)
    return path


BOMBS = {
    # name: (maker, arguments, what the message must say)
    "png beyond Pillow's guard": (png_claiming, (60000, 60000), "MAX_IMAGE_PIXELS"),
    "png beyond medlens's pixel limit": (png_claiming, (12000, 12000), "HARD_PIXELS_2D"),
    "png with a side beyond the limit": (png_claiming, (20000, 64), "HARD_SIDE_2D"),
    "jpeg": (jpeg_claiming, (65000, 65000), "MAX_IMAGE_PIXELS"),
    "tiff": (tiff_claiming, (100000, 100000), "HARD_PIXELS_2D"),
    "dicom": (dicom_claiming, (60000, 60000), "HARD_PIXELS_2D"),
    "dicom frames": (dicom_claiming, (2048, 2048, 4000), "HARD_VOXELS_3D"),
    "nifti": (nifti_claiming, ((3000, 3000, 3000),), "HARD_VOXELS_3D"),
}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm", "nifti": ".nii"}


def make_bomb(folder: Path, name: str) -> Path:
    maker, args, _ = BOMBS[name]
    return maker(folder / (name.replace(" ", "_").replace("'", "") + SUFFIX[name.split()[0]]), *args)


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_claimed_size_above_the_limit_is_refused_from_the_header(tmp_path, name):
    path = make_bomb(tmp_path, name)
    assert path.stat().st_size < 20_000  # a small file that claims gigabytes
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert BOMBS[name][2] in message and path.name in message and "\n" not in message
    assert peak < 8 * 2**20  # numpy and Python allocations: nothing of the claimed size was allocated


def test_refusals_happen_before_allocation_by_the_peak_memory_of_a_process(tmp_path):
    """C libraries (Pillow, pydicom's decoders) allocate outside tracemalloc: a child process reads every bomb, and its
    peak resident memory (its own, from wait4) stays near what it had before reading."""
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    for name in BOMBS:
        make_bomb(bombs, name)
    script = (
        "import resource, sys, json; from pathlib import Path\n"
        "from medlens.io import read_image\nfrom medlens.errors import InputError\n"
        "start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nrefused = 0\n"
        "for p in sorted(Path(sys.argv[1]).iterdir()):\n"
        "    try:\n        read_image(p)\n    except InputError:\n        refused += 1\n"
        "print(json.dumps({'start_kib': start, 'refused': refused}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    with open(tmp_path / "stderr.txt", "wb") as errors:
        child = subprocess.Popen([sys.executable, "-c", script, str(bombs)], stdout=subprocess.PIPE, stderr=errors, env=env)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak resident memory, in KiB on Linux
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["refused"] == len(BOMBS)
    peak_kib = usage.ru_maxrss
    growth_mib = (peak_kib - report["start_kib"]) / 1024
    assert growth_mib < 150, f"the reader process grew by {growth_mib:.0f} MiB while refusing the bombs"


def test_limits_are_settable_by_function_and_environment(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "small.png")
    assert current_limits().hard_pixels_2d == limits.HARD_PIXELS_2D
    try:
        set_limits(hard_pixels_2d=50)
        with pytest.raises(InputError, match=r"small\.png.*100 pixels.*limit of 50 \(HARD_PIXELS_2D\).*MEDLENS_HARD_PIXELS_2D"):
            read_image(tmp_path / "small.png")
    finally:
        set_limits(hard_pixels_2d=None)
    assert read_image(tmp_path / "small.png").pixels.shape == (10, 10)
    monkeypatch.setenv("MEDLENS_HARD_BYTES", "50")
    with pytest.raises(InputError, match=r"small\.png: the file is \d+ bytes, above medlens's limit of 50 bytes \(HARD_BYTES\)"):
        read_image(tmp_path / "small.png")
    monkeypatch.setenv("MEDLENS_HARD_BYTES", "lots")
    with pytest.raises(InputError, match="MEDLENS_HARD_BYTES='lots' .* must be a positive whole number"):
        read_image(tmp_path / "small.png")
    with pytest.raises(InputError, match="unknown size limit"):
        set_limits(hard_pixel=5)
