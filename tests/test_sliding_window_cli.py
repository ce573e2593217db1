"""`medlens explain --window` and a model file's declared patch size: a volume larger than the window explained at
its own size, window by window; the maps equal `explain(sliding_window=...)` on the same prepared input; methods that
cannot run by window are refused (exit 2, no traceback); `--window none` explains the whole volume at once."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import medlens
from medlens.cli.group import main


class Seg3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.head = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c1(x))) + torch.cat([0 * x, 4 * x - 2], dim=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    nibabel = pytest.importorskip("nibabel")
    root = tmp_path_factory.mktemp("window-cli")
    torch.manual_seed(0)
    model = torch.jit.trace(Seg3d().eval(), torch.zeros(1, 1, 8, 8, 8))
    model.save(str(root / "seg.pt"))
    (root / "seg.pt.json").write_text(json.dumps({"labels": ["background", "lesion"], "patch_size": [16, 16, 16]}))
    volume = np.random.default_rng(1).random((36, 32, 20)).astype(np.float32) * 0.3
    volume[10:24, 8:20, 4:14] += 0.7  # a bright block: the lesion the model predicts
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(root / "vol.nii.gz"))
    return root


def _explain(capsys, root, *args):
    code = main(["explain", str(root / "vol.nii.gz"), "--model", str(root / "seg.pt"), "--targets", "lesion",
                 "--out", str(root / "out"), "--formats", "npz", *map(str, args)])
    return code, capsys.readouterr().err


def test_declared_patch_size_runs_by_window(capsys, files):
    code, err = _explain(capsys, files, "--methods", "saliency,integratedgradients")
    assert code == 0, err
    provenance = json.loads((files / "out" / "vol" / "provenance.json").read_text())
    assert provenance["sliding_window"]["size"] == [16, 16, 16]
    maps = np.load(files / "out" / "vol" / "maps.npz")
    model = medlens.load_model(str(files / "seg.pt"))
    x = medlens.load_input(files / "vol.nii.gz", model)
    assert tuple(x.shape[2:]) == tuple(provenance["input"]["shape"][2:])  # kept at its own size, not resized
    ref = medlens.explain(model, x, "saliency", targets=[medlens.SegmentationTarget("lesion", "predicted")],
                          sliding_window=(16, 16, 16))
    key = next(k for k in maps.files if k.startswith("saliency"))
    assert np.allclose(maps[key].reshape(ref["saliency"].shape), ref["saliency"].numpy(), atol=1e-6)
    gap = provenance["methods"]["integratedgradients"]["completeness"]["relative_gap"][0][0]
    assert gap < 0.01


def test_window_option_and_refusals(capsys, files):
    code, err = _explain(capsys, files, "--methods", "occlusion")
    assert code == 2 and "occlusion" in err and "--window" in err and "Traceback" not in err
    code, err = _explain(capsys, files, "--methods", "saliency", "--window", "16,16")
    assert code == 2 and "one size per axis" in err
    code, err = _explain(capsys, files, "--methods", "saliency", "--window", "none")
    assert code == 0, err
    assert "sliding_window" not in json.loads((files / "out" / "vol" / "provenance.json").read_text())
    code, err = _explain(capsys, files, "--methods", "saliency", "--window", "24,24,24",
                         "--option", "sliding_window_blend=gaussian")
    assert code == 0, err
    record = json.loads((files / "out" / "vol" / "provenance.json").read_text())["sliding_window"]
    assert record["size"] == [24, 24, 24] and record["blend"] == "gaussian"
