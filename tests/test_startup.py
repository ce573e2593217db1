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

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torchvision", "matplotlib", "pydicom", "nibabel", "highdicom", "pandas", "skimage")
# What torch itself imports lazily on the way to the first map: sympy (through torch.fx's symbolic shapes) comes
# with the first backward given `grad_outputs`, about a second on its own; a one-target run needs none of it.
FIRST_RESULT_HEAVY = HEAVY + ("sympy", "torch.fx.experimental.symbolic_shapes", "torch._dynamo", "tqdm.auto")
# The commands `medlens batch` does not use, and what they bring (training, evaluation, the app, reports).
OTHER_COMMANDS = ("medlens.cli.demo", "medlens.cli.evaluate", "medlens.cli.train", "medlens.cli.app", "medlens.cli.serve",
                  "medlens.cli.report", "medlens.training", "medlens.evaluation_run")

# One subprocess for both checks (a fresh interpreter costs seconds on a loaded machine): the modules after the
# CLI and a bundled model load, then after `medlens batch` on one small image has written its first result.
_PROBE = """
import sys, json
import numpy as np
from PIL import Image
import medlens.cli.group
import medlens
medlens.load_model('brain-tumor-mri')
after_load = sorted(sys.modules)
work = sys.argv[1]
Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(work + '/one.png')
code = medlens.cli.group.main(['batch', work + '/one.png', '--model', 'brain-tumor-mri', '--methods', 'gradcam',
                               '--out', work + '/out', '--threads', '1'])
print(json.dumps({'after_load': after_load, 'after_batch': sorted(sys.modules), 'code': code}))
"""


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("startup")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(work)], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, out.stderr
    assert list((work / "out" / "maps").glob("*/gradcam_*.png")), "the batch wrote no overlay"
    return result


def _heavy(modules: list[str], names: tuple[str, ...]) -> list[str]:
    loaded = set(modules)
    return sorted(n for n in names if n in loaded)


def test_cli_and_bundled_model_load_without_heavy_imports(imported):
    assert not _heavy(imported["after_load"], HEAVY), f"imported at start-up: {_heavy(imported['after_load'], HEAVY)}"


def test_batch_first_result_without_sympy_or_matplotlib(imported):
    found = _heavy(imported["after_batch"], FIRST_RESULT_HEAVY + OTHER_COMMANDS)
    assert not found, f"imported on the way to the first result of `medlens batch`: {found}"


def test_default_colour_tables_are_matplotlibs():
    """The copied tables of the default colour maps are matplotlib's own, value for value (the PNGs stay the same)."""
    import numpy as np
    from matplotlib import colormaps

    from medlens.io.colour_tables import colour_table
    from medlens.io.render import DIVERGING_CMAP, SEQUENTIAL_CMAP

    for name in (SEQUENTIAL_CMAP, DIVERGING_CMAP):
        reference = (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)
        assert np.array_equal(colour_table(name), reference), name
    assert colour_table("viridis") is None  # the others still come from matplotlib


def test_lazy_commands_are_named_as_their_modules_export_them():
    import importlib

    from medlens.cli.group import LAZY_COMMANDS, cli

    for module in set(LAZY_COMMANDS.values()):  # each module exports exactly the commands named for it
        named = sorted(name for name, m in LAZY_COMMANDS.items() if m == module)
        assert sorted(c.name for c in importlib.import_module(module).COMMANDS) == named, module
    assert set(LAZY_COMMANDS) <= set(cli.commands)  # a full listing (help, the docs tools) imports them all


# `medlens batch --executor processes`: the forkserver (which imports torch and loads the model for the workers) is
# started before the driver imports torch, so that the two imports run at once (docs/batch.md, "Start-up").
_FORKSTART_PROBE = """
import json, os, sys
import multiprocessing.forkserver as forkserver

starts = []
_ensure_running = forkserver.ensure_running

def ensure_running():
    starts.append("torch" in sys.modules)
    return _ensure_running()

forkserver.ensure_running = ensure_running
if __name__ == "__main__":
    import numpy as np
    from PIL import Image
    import medlens
    lazy = "torch" not in sys.modules and medlens.__version__ and medlens.MedlensError and "torch" not in sys.modules
    import medlens.cli.group
    lazy = lazy and "torch" not in sys.modules
    work = sys.argv[1]
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(work + "/one.png")
    code = medlens.cli.group.main(["batch", work + "/one.png", "--model", "brain-tumor-mri", "--methods", "gradcam",
                                   "--out", work + "/out", "--executor", "processes", "--workers", "1", "-q"])
    print(json.dumps({"code": code, "torch_at_starts": starts, "lazy": bool(lazy)}))
"""


def test_processes_batch_starts_its_forkserver_before_the_driver_imports_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", _FORKSTART_PROBE, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, out.stderr
    assert result["lazy"], "`import medlens` or `import medlens.cli.group` imported torch"
    assert result["torch_at_starts"][:1] == [False], f"the forkserver was started after torch: {result}"
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done"], records


def test_import_medlens_imports_torch_only_for_a_name_that_needs_it():
    probe = ("import sys, medlens; from medlens import MedlensError, load_model, load_input, __version__; "
             "before = 'torch' in sys.modules; names = set(dir(medlens)); "
             "from medlens import explain, ExplanationResult, BoxTarget, SegmentationTarget, SimilarityTarget; "
             "import medlens.core.explain as e; "
             "print(before, 'torch' in sys.modules, set(medlens.__all__) <= names, explain is e.explain, "
             "'gradcam' in medlens.methods(), medlens.method_info('gradcam')['needs_gradients'])")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    assert out.stdout.split() == ["False", "True", "True", "True", "True", "True"], out.stdout + out.stderr
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        import medlens

        medlens.no_such_name  # noqa: B018


def test_a_usage_error_stops_the_forkserver_started_for_it(tmp_path):
    """A misspelt method is found after the forkserver was started (the check imports torch): it is stopped at once,
    not left importing torch; a forkserver that was already running (an earlier run in this process) is kept."""
    import multiprocessing.forkserver as forkserver

    from medlens.cli.group import main

    image = tmp_path / "one.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(image)
    running = forkserver._forkserver._forkserver_pid
    code = main(["batch", str(image), "--model", "brain-tumor-mri", "--methods", "no-such-method", "--out",
                 str(tmp_path / "out"), "--executor", "processes", "-q"])
    assert code == 2
    assert forkserver._forkserver._forkserver_pid == running  # None again, or the earlier one, still running
    if running is not None:
        os.kill(running, 0)
