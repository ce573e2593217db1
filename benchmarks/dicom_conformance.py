"""The dciodvfy table of docs/dicom.md: `medlens batch --formats dicom` (phantom-lesion, Grad-CAM and saliency) on
pydicom's CT, MR, enhanced MR, enhanced CT, oblique MR, NM and CR test files; every result validated by dicom3tools'
`dciodvfy`, its errors counted and its warnings listed (and whether the source itself carries them).

    python benchmarks/dicom_conformance.py [OUT_FOLDER]
"""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from medlens.cli.group import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import with_functional_groups  # noqa: E402  (the same enhanced MR the conformance test builds)

FILES = {"CT": "CT_small.dcm", "MR": "MR_small.dcm", "Enhanced MR (no functional groups)": "emri_small.dcm",
         "Enhanced MR (with functional groups)": "emri_small.dcm", "Enhanced CT": "eCT_Supplemental.dcm",
         "Oblique MR": "MR2_UNCR.dcm", "NM (no position)": "JPEG2000_UNC.dcm", "CR (Pixel Spacing 0\\0)": "RG1_UNCR.dcm",
         "CR (Laterality R)": "RG3_UNCR.dcm"}


def _messages(path: Path, kind: str) -> list[str]:
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [re.sub(r"\s+", " ", line.split(" - ", 1)[-1]).strip()
            for line in (report.stdout + report.stderr).splitlines() if line.startswith(kind)]


def main_table(folder: Path) -> str:
    inputs = folder / "in"
    for n, (case, name) in enumerate(FILES.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = Path(get_testdata_file(name))
        (inputs / f"case{n}").mkdir(parents=True, exist_ok=True)
        if "with functional groups" in case:
            with_functional_groups(source, inputs / f"case{n}" / name)
        else:
            shutil.copy(source, inputs / f"case{n}" / name)
    out = folder / "out"
    main(["batch", str(inputs), "--out", str(out), "--model", "phantom-lesion", "--methods", "gradcam,saliency",
          "--formats", "png,npz,nifti,dicom", "-q", "--force"])
    rows = ["| source (pydicom test file) | results | dciodvfy errors | warnings (count: text) | from the source |",
            "|---|---|---|---|---|"]
    for n, (case, name) in enumerate(FILES.items()):
        results = sorted((out / "maps" / f"case{n}").rglob("*.dcm"))
        source_warnings = set(_messages(next((inputs / f"case{n}").iterdir()), "Warning"))
        errors = sum(len(_messages(p, "Error")) for p in results)
        counted = collections.Counter(w for p in results for w in _messages(p, "Warning"))
        listed = "; ".join(f"{c}: {w}" for w, c in sorted(counted.items())) or "none"
        own = "; ".join(sorted({w for w in counted if w in source_warnings})) or "-"
        kinds = collections.Counter("PM" if p.name.endswith("_pm.dcm") else "SC" for p in results)
        rows.append(f"| {case}: `{name}` | {kinds['PM']} PM, {kinds['SC']} SC | {errors} | {listed} | {own} |")
    return "\n".join(rows)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="medlens-dciodvfy-"))
    print(main_table(target))
