"""The offline demo end to end: files written, scores sane, shortcut maps on the marker, CLI wiring, bad output folder."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import medlens
from medlens.cli.demo import demo_command, energy_inside, marker_zone, run_demo
from medlens.errors import OutputError


def test_energy_inside_against_hand_values():
    maps = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    masks = torch.tensor([[[True, True], [False, False]], [[True, False], [False, False]]])
    assert torch.allclose(energy_inside(maps, masks), torch.tensor([0.25, 0.0]))
    m = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    m[0, 0, 2, 3] = m[0, 0, 4, 5] = True
    zone = marker_zone(m, margin=1)
    assert zone.shape == (1, 16, 16) and int(zone.sum()) == 5 * 5 and bool(zone[0, 1:6, 2:7].all())


def test_demo_runs_end_to_end(tmp_path):
    out = run_demo(tmp_path / "demo", n_cases=2)
    assert out == tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    for name in ("summary.html", "summary.png", "lesion-case-01.png", "lesion-case-02.png", "shortcut-case-01.png"):
        assert (out / name).stat().st_size > 1000, name
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    registered = set(medlens.methods())
    assert {"gradcam", "gradcam++", "layercam", "scorecam"} <= set(summary["methods"]) <= registered
    lesion = summary["lesion"]
    assert not lesion["errors"], lesion["errors"]
    for name, e in lesion["energy_in_lesion"].items():
        assert all(0.0 <= v <= 1.0 for v in e["per_case"]), name
    # CAMs of the lesion model concentrate on the lesion far above a uniform map's share
    assert lesion["energy_in_lesion"]["gradcam"]["mean"] > 3 * lesion["mean_lesion_area_fraction"]
    sc = summary["shortcut"]
    assert sc["energy_on_marker"]["gradcam"]["mean"] > 4 * sc["marker_zone_area_fraction"]
    assert sc["energy_on_marker"]["gradcam"]["mean"] > sc["energy_in_lesion"]["gradcam"]["mean"]
    assert 0.0 <= sc["peak_on_marker"]["gradcam"] <= 1.0 and 0.0 <= lesion["peak_in_lesion"]["gradcam"] <= 1.0
    assert sc["decorrelated_marker"]["prediction_follows_marker"] > 0.9
    html = (out / "summary.html").read_text()
    assert "energy on marker" in html and "gradcam" in html and 'src="summary.png"' in html


def test_demo_cli_and_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        run_demo(blocker / "sub", n_cases=1)
    res = CliRunner().invoke(demo_command, ["--out", str(tmp_path / "cli"), "--cases", "1", "--methods", "gradcam,layercam"])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "cli") in res.output and "summary.html" in res.output
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["methods"] == ["gradcam", "layercam"]
