"""pydicom's own test corpus (with pydicom-data when installed): every file pydicom decodes is read by medlens, or
refused for a reason a person can act on; every other file ends in a one-line medlens error, never a crash."""
from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import pytest

from medlens.errors import MedlensError
from medlens.io import read_image

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import ImplicitVRLittleEndian  # noqa: E402


def _corpus() -> list[Path]:
    import pydicom.data

    return sorted({Path(p) for p in pydicom.data.get_testdata_files()})


def pydicom_decodes(path: Path) -> bool:
    """Whether pydicom itself (force=True, implicit VR little endian assumed without a transfer syntax, as viewers do)
    returns pixels for the file, with the decoders installed here."""
    if not path.is_file():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), force=True)
            if "TransferSyntaxUID" not in ds.file_meta:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            return ds.pixel_array.size > 0
    except Exception:  # noqa: BLE001 - anything pydicom cannot decode is outside the claim
        return False


def walk_corpus() -> tuple[collections.Counter, list[tuple[Path, bool, str, str]]]:
    """(counts by (pydicom decodes, outcome), rows (path, decodes, outcome, message)); outcome read/refused/crash."""
    counts: collections.Counter = collections.Counter()
    rows = []
    for path in _corpus():
        decodes = pydicom_decodes(path)
        try:
            scan = read_image(path)
            outcome, message = "read", f"{scan.layout} {scan.pixels.shape}"
            assert np.isfinite(scan.pixels).all()
        except MedlensError as exc:
            outcome, message = "refused", str(exc)
        except Exception as exc:  # noqa: BLE001 - counted, and the test fails on it
            outcome, message = "crash", f"{type(exc).__name__}: {exc}"
        counts[(decodes, outcome)] += 1
        rows.append((path, decodes, outcome, message))
    return counts, rows


@pytest.fixture(scope="module")
def corpus():
    files = _corpus()
    if len(files) < 50:
        pytest.skip("pydicom's test corpus is not installed (pip install pydicom-data for the full set)")
    return walk_corpus()


def test_no_file_of_the_corpus_crashes_and_every_refusal_is_one_line(corpus):
    counts, rows = corpus
    crashes = [(p.name, m) for p, _, o, m in rows if o == "crash"]
    assert crashes == []
    multi_line = [(p.name, m) for p, _, o, m in rows if o == "refused" and "\n" in m]
    assert multi_line == []
    assert all(str(p) in m or p.name in m for p, _, o, m in rows if o == "refused")  # the message names the file


def test_every_file_pydicom_decodes_is_read_or_needs_a_frame(corpus):
    counts, rows = corpus
    decodable = [(p, o, m) for p, d, o, m in rows if d]
    assert len(decodable) >= 100
    refused = [(p, m) for p, o, m in decodable if o != "read"]
    # the only refusal of a decodable file: a multi-frame colour file, which needs --frame; and with it, it is read
    assert all("multi-frame colour" in m and "--frame" in m for _, m in refused), refused
    for path, _ in refused:
        scan = read_image(path, frame=0)
        assert scan.layout == "color" and scan.pixels.ndim == 3


def _named(name: str) -> Path:
    found = [p for p in _corpus() if p.name == name]  # from the installed corpus: a name pattern would try downloads
    if not found:
        pytest.skip(f"{name} is not in this pydicom's corpus (pip install pydicom-data)")
    return found[0]


def test_preambleless_jpeg_lossless_and_monochrome1_files_are_read():
    preambleless = read_image(_named("OT-PAL-8-face.dcm"))  # no DICM preamble, palette colour
    assert preambleless.layout == "color" and any("ACR-NEMA" in n for n in preambleless.notes)
    path = _named("JPEG-LL.dcm")  # JPEG Lossless, process 14: needs a decoder plugin
    lossless = read_image(path, window=False)
    ds = pydicom.dcmread(str(path))
    reference = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    np.testing.assert_array_equal(lossless.pixels, reference)
    mono1 = read_image(_named("RG1_UNCR.dcm"))  # a MONOCHROME1 CR: inverted so that bright means dense
    raw = pydicom.dcmread(str(_named("RG1_UNCR.dcm"))).pixel_array.astype(np.float64)
    assert any("MONOCHROME1" in n for n in mono1.notes)
    brightest_raw = np.unravel_index(np.argmax(raw), raw.shape)
    assert mono1.pixels[brightest_raw] == mono1.pixels.min()  # the largest stored value is the darkest pixel
