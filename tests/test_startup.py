"""Start-up: the CLI imports only what every command needs (issue 28, "start fast").

torchvision (which pulls in torch._dynamo and sympy), matplotlib, pydicom and nibabel each cost a second or more to
import; they are imported on first use, by the model, plot, DICOM or NIfTI code that needs them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torchvision", "matplotlib", "pydicom", "nibabel", "highdicom", "pandas", "skimage")


def _imported_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cli_and_bundled_model_load_without_heavy_imports():
    loaded = _imported_after("import medlens.cli.group\nimport medlens\nmedlens.load_model('brain-tumor-mri')")
    assert not loaded & set(HEAVY), f"imported at start-up: {sorted(loaded & set(HEAVY))}"
