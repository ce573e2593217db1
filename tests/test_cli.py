"""The command line end to end: methods, models, explain on a tiny model file; every bad input exits 2 cleanly."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medlens
from helpers import TinyCNN2d, make_dicom, make_nifti, make_tiny2d, make_tiny3d, run

LABELS = ["normal", "effusion", "mass"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny2d(0)
    torch.save(model, root / "tiny.pt")
    (root / "tiny.pt.json").write_text(json.dumps({"labels": LABELS, "size": [32, 32]}))
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (40, 36)).astype(np.uint8)).save(root / "chest.png")
    make_dicom(root / "ct.dcm", rng.randint(0, 2000, (30, 30)).astype(np.uint16), RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    corrupt = root / "corrupt.dcm"
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00broken" * 10)
    (root / "report.txt").write_text("not an image")
    Image.fromarray(np.zeros((4, 16385), dtype=np.uint8)).save(root / "huge.png")
    nan = np.ones((16, 16), dtype=np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan, mode="F").save(root / "nan.tif")
    (root / "not_a_model.pt").write_bytes(b"just some bytes")
    (root / "blocker").write_text("a file where a folder should be")
    make_dicom(root / "badslope.dcm", rng.randint(0, 2000, (30, 30)).astype(np.uint16), RescaleSlope="7.25")
    (root / "badslope.dcm").write_bytes((root / "badslope.dcm").read_bytes().replace(b"7.25", b"x1y2"))
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval(), root / "nopad.pt")
    Image.fromarray(np.full((2, 2), 9, dtype=np.uint8)).save(root / "speck.png")
    return root


def test_methods_table_lists_the_registry(capsys):
    code, out, err = run(capsys, "methods")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[:7] == ["name", "family", "gradients", "layer", "3-D", "stochastic", "cost"]
    listed = {line.split()[0] for line in out.splitlines()[2:] if line.strip()}
    assert listed == set(medlens.methods())


def test_models_explains_sources(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "xrv:" in out and ".torchxrayvision/models_data" in out and "torchvision:ARCH" in out


def test_explain_two_images_end_to_end(capsys, files, tmp_path):
    out_dir = tmp_path / "results"
    code, out, err = run(capsys, "explain", files / "chest.png", files / "ct.dcm", "--model", files / "tiny.pt", "--allow-pickle",
                         "--methods", "gradcam,cam", "--targets", "0,mass", "--out", out_dir, "--seed", "3")
    assert code == 0, err
    assert "Traceback" not in err and "ran code" in err  # the pickle note, as one line
    assert "2/2" in err  # the progress bar over several images
    assert "medlens: note: not marked multi-label" in err  # how the model's outputs are read, on the console too
    for stem in ("chest", "ct"):
        folder = out_dir / stem
        expected = {f"{m}_{t}.png" for m in ("gradcam", "cam") for t in ("normal", "mass")} | {"panel.png", "maps.npz", "provenance.json"}
        assert {p.name for p in folder.iterdir()} == expected
        prov = json.loads((folder / "provenance.json").read_text())
        assert prov["target_names"] == [["normal", "mass"]] and prov["seed"] == 3
        assert prov["input_file"]["path"].endswith(f"{stem}.png" if stem == "chest" else "ct.dcm")
        assert prov["model_source"]["from"]["labels"].startswith("sidecar")
        with np.load(folder / "maps.npz") as npz:
            assert npz["gradcam"].shape == (1, 2, 32, 32)
            np.testing.assert_array_equal(npz["targets"], [[0, 2]])
    ct_notes = json.loads((out_dir / "ct" / "provenance.json").read_text())["loading_notes"]
    assert any("window center 40" in n for n in ct_notes) and any("resized" in n for n in ct_notes)
    # the CLI's raw maps are exactly what the Python API gives on the same file
    model = medlens.load_model(files / "tiny.pt", allow_pickle=True)
    x = medlens.load_input(files / "chest.png", model)
    api = medlens.explain(model, x, methods=["gradcam", "cam"], targets=[0, "mass"])
    with np.load(out_dir / "chest" / "maps.npz") as npz:
        for m in ("gradcam", "cam"):
            np.testing.assert_allclose(npz[m], api[m].numpy(), rtol=1e-5, atol=1e-7)


def test_explain_volume_with_3d_model(capsys, tmp_path):
    torch.save(make_tiny3d(0), tmp_path / "tiny3d.pt")
    make_nifti(tmp_path / "brain.nii.gz", np.random.RandomState(1).rand(16, 16, 8).astype(np.float32))
    code, out, err = run(capsys, "explain", tmp_path / "brain.nii.gz", "--model", tmp_path / "tiny3d.pt", "--allow-pickle",
                         "--input-size", "8,16,16", "--out", tmp_path / "o")
    assert code == 0, err
    with np.load(tmp_path / "o" / "brain" / "maps.npz") as npz:
        assert npz["gradcam"].shape == (1, 1, 8, 16, 16)


def test_2d_model_on_volume_uses_chosen_slice(capsys, files, tmp_path):
    make_nifti(tmp_path / "vol.nii", np.random.RandomState(2).rand(20, 20, 6).astype(np.float32))
    code, _, err = run(capsys, "explain", tmp_path / "vol.nii", "--model", files / "tiny.pt", "--allow-pickle", "--slice", "4", "--out", tmp_path / "o")
    assert code == 0, err
    notes = json.loads((tmp_path / "o" / "vol" / "provenance.json").read_text())["loading_notes"]
    assert "slice 4 of 6" in notes


BAD_CASES = {
    "missing file": (["missing.png"], [], "missing.png: no such file"),
    "corrupt DICOM": (["corrupt.dcm"], [], "corrupt.dcm: not a valid DICOM"),
    "unsupported format": (["report.txt"], [], "unsupported file type '.txt'"),
    "too large": (["huge.png"], [], "16384"),
    "NaN pixels": (["nan.tif"], [], "NaN or infinite"),
    "not a model": (["chest.png"], ["--model", "{root}/not_a_model.pt"], "not_a_model.pt is not a model file"),
    "target out of range": (["chest.png"], ["--targets", "7"], "target index 7 is out of range"),
    "unknown class": (["chest.png"], ["--targets", "pneumonia"], "unknown class name 'pneumonia'"),
    "unwritable output": (["chest.png"], ["--out", "{root}/blocker/out"], "cannot be created"),
    "unknown method": (["chest.png"], ["--methods", "gradcma"], "unknown method 'gradcma'"),
    "bad option": (["chest.png"], ["--option", "nonsense=1"], "nonsense"),
    "unreadable DICOM header value": (["badslope.dcm"], [], "badslope.dcm: a DICOM header value could not be read"),
    "input size not a number": (["chest.png"], ["--input-size", "abc"], "input size 'abc' must be"),
    "pickled model without --allow-pickle": (["chest.png"], ["--model", "{root}/tiny.pt"],
                                             "loading it runs whatever code the file holds"),
    "image the model cannot take": (["speck.png"], ["--model", "{root}/nopad.pt", "--allow-pickle", "--methods", "saliency"],
                                    "forward pass failed on the input of shape (1, 1, 2, 2)"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_2_with_a_message(capsys, files, tmp_path, case):
    images, extra, expected = BAD_CASES[case]
    extra = [e.format(root=files) for e in extra]
    args = ["explain", *[files / i for i in images]]
    if "--model" not in extra:
        args += ["--model", files / "tiny.pt", "--allow-pickle"]
    if "--out" not in extra:
        args += ["--out", tmp_path / "out"]
    code, out, err = run(capsys, *args, *extra)
    assert code == 2
    assert "Traceback" not in err + out
    assert err.startswith("medlens: error:") or "\nmedlens: error:" in err
    assert expected in err
    out_dir = tmp_path / "out"
    if out_dir.exists():  # nothing half-written, nothing at all for a single failing image
        assert [p for p in out_dir.rglob("*") if p.is_file()] == []
    assert (files / "blocker").read_text() == "a file where a folder should be"


def test_one_bad_image_among_several_keeps_the_good_ones(capsys, files, tmp_path):
    code, _, err = run(capsys, "explain", files / "chest.png", files / "corrupt.dcm", "--model", files / "tiny.pt", "--allow-pickle",
                       "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err
    assert "1 of 2 image(s) could not be explained" in err and "corrupt.dcm" in err
    assert (tmp_path / "o" / "chest" / "provenance.json").is_file()
    assert not (tmp_path / "o" / "corrupt").exists()


def test_usage_errors_exit_2_without_traceback(capsys, files, tmp_path):
    code, out, err = run(capsys, "explain", files / "chest.png", "--out", tmp_path / "o")
    assert code == 2 and "--model" in err and "Traceback" not in err


def test_torchscript_model_with_layer_method_is_explained_clearly(capsys, files, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TinyCNN2d()), str(tmp_path / "ts.pt"))
    code, _, err = run(capsys, "explain", files / "chest.png", "--model", tmp_path / "ts.pt", "--out", tmp_path / "o")
    assert code == 2 and "TorchScript" in err and "Traceback" not in err


def test_models_lists_bundled_models_from_the_zoo(capsys, monkeypatch):
    from medlens.core.input_spec import InputSpec
    from medlens.models import zoo

    spec = InputSpec(size=(128, 128), channels=1, labels=("glioma", "meningioma", "no tumor", "pituitary"))
    listed = {"brain-tumor-mri": {"labels": list(spec.labels), "input_spec": spec,
                                  "description": "ResNet-18 on brain MRI", "test_accuracy": 0.912}}
    monkeypatch.setattr(zoo, "bundled_models", lambda: listed)  # the list `medlens models` reads, replaced by this stand-in
    monkeypatch.setattr(zoo, "load_bundled", lambda name: None)
    code, out, _ = run(capsys, "models")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("brain-tumor-mri"))
    assert "128 x 128" in row and "0.912" in row and "glioma, meningioma, no tumor, pituitary" in row and "single" in row


def test_all_targets(capsys, files, tmp_path):
    code, out, err = run(capsys, "explain", files / "chest.png", "--model", files / "tiny.pt", "--allow-pickle", "--targets", "all",
                         "--methods", "cam", "--out", tmp_path / "o")
    assert code == 0, err
    assert "wrote results for 1 image(s)" in out
    assert sorted(p.name for p in (tmp_path / "o" / "chest").glob("cam_*.png")) == [f"cam_{l}.png" for l in sorted(LABELS)]


def test_dicom_series_folder_end_to_end(capsys, files, tmp_path):
    from pydicom.uid import generate_uid

    series, folder = generate_uid(), tmp_path / "series1"
    folder.mkdir()
    for n, z in enumerate([2.0, 0.0, 1.0]):
        make_dicom(folder / f"s{n}.dcm", np.random.RandomState(n).randint(0, 500, (20, 20)).astype(np.uint16),
                   SeriesInstanceUID=series, ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[0, 0, z])
    code, _, err = run(capsys, "explain", folder, "--model", files / "tiny.pt", "--allow-pickle", "--out", tmp_path / "o")
    assert code == 0, err
    prov = json.loads((tmp_path / "o" / "series1" / "provenance.json").read_text())
    assert len(prov["input_file"]["sha256"]) == 64
    assert any("3 slices sorted by slice position" in n for n in prov["loading_notes"])
    assert any("middle slice 1" in n for n in prov["loading_notes"])


def test_an_image_the_model_fails_on_is_skipped_and_the_rest_written(capsys, files, tmp_path):
    code, _, err = run(capsys, "explain", files / "chest.png", files / "speck.png", files / "badslope.dcm",
                       "--model", files / "nopad.pt", "--allow-pickle", "--methods", "saliency", "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err
    assert "2 of 3 image(s) could not be explained" in err
    assert f"skipped {files / 'speck.png'}: the model's forward pass failed" in err and "badslope.dcm" in err
    assert (tmp_path / "o" / "chest" / "provenance.json").is_file()
    assert not (tmp_path / "o" / "speck").exists() or not any((tmp_path / "o" / "speck").iterdir())


def test_a_second_run_into_the_same_folder_replaces_the_first(capsys, files, tmp_path):
    out = tmp_path / "o"
    code, _, err = run(capsys, "explain", files / "chest.png", "--model", files / "tiny.pt", "--allow-pickle", "--methods",
                       "gradcam,layercam", "--targets", "all", "--out", out)
    assert code == 0, err
    code, _, err = run(capsys, "explain", files / "chest.png", "--model", files / "tiny.pt", "--allow-pickle", "--methods", "gradcam",
                       "--targets", "1", "--out", out)
    assert code == 0, err
    folder = out / "chest"
    listed = json.loads((folder / "provenance.json").read_text())["files"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(listed)  # no layercam_*, no other targets left
    assert "gradcam_effusion.png" in listed and not any(n.startswith("layercam") for n in listed)


def test_a_failed_write_leaves_the_folder_as_it_was(files, tmp_path, monkeypatch):
    from medlens.errors import OutputError
    from medlens.io import output

    model = torch.load(files / "tiny.pt", weights_only=False)
    result = medlens.explain(model, torch.randn(1, 1, 32, 32), ["gradcam", "saliency"], targets=[0, 1])
    folder = tmp_path / "o"
    output.write_explanation(result, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.np, "savez", disk_full)  # the overlays and the panel are written by then
    result2 = medlens.explain(model, torch.randn(1, 1, 32, 32), ["layercam"], targets=[2])
    with pytest.raises(OutputError):
        output.write_explanation(result2, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing new, nothing lost, no staging


def test_long_class_names_give_short_unique_file_names(files, tmp_path):
    from medlens.io.files import safe_name

    a, b = safe_name("x" * 300 + "a"), safe_name("x" * 300 + "b")
    assert len(a) <= 80 and len(b) <= 80 and a != b
    assert safe_name("Pleural Effusion") == "Pleural_Effusion"


def test_labels_in_a_sidecar_may_be_one_comma_separated_string(files, tmp_path):
    torch.save(torch.load(files / "tiny.pt", weights_only=False), tmp_path / "m.pt")
    (tmp_path / "m.pt.json").write_text(json.dumps({"labels": "a, b,c"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert medlens.load_model(tmp_path / "m.pt", allow_pickle=True).labels == ["a", "b", "c"]
    (tmp_path / "m.pt.json").write_text(json.dumps({"std": [0]}))
    with pytest.raises(medlens.MedlensError, match="positive standard deviations"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            medlens.load_model(tmp_path / "m.pt", allow_pickle=True)


def test_class_names_that_differ_only_in_case():
    from medlens.errors import TargetError
    from medlens.core.targets import _index

    labels = ["a", "A", "b"]
    assert _index("A", labels, 3) == 1 and _index("a", labels, 3) == 0 and _index("B", labels, 3) == 2
    with pytest.raises(TargetError, match="matches 'Mass', 'MASS' when case is ignored"):
        _index("mass", ["Mass", "MASS", "Nodule"], 3)


def test_weights_with_a_model_that_has_its_own_are_refused(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(medlens.MedlensError, match="comes with its own weights"):
        medlens.load_model("xrv:densenet121-res224-all", weights=tmp_path / "w.pt")


def test_evaluate_checks_the_output_folder_first(capsys, files, tmp_path):
    code, out, err = run(capsys, "evaluate", "--model", files / "tiny.pt", "--allow-pickle", "--data", tmp_path, "--methods", "gradcam",
                         "--metrics", "iou", "--out", files / "blocker" / "sub")
    assert code == 2 and "Traceback" not in err and "--out" in err


def test_demo_refuses_an_unknown_method(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--methods", "gradcamm,layercam", "--out", tmp_path / "d")
    assert code == 2 and "unknown method 'gradcamm'" in err


def test_a_run_that_writes_nothing_leaves_no_new_folder(capsys, files, tmp_path):
    code, _, err = run(capsys, "explain", files / "chest.png", "--model", files / "tiny.pt", "--allow-pickle", "--targets", "7",
                       "--out", tmp_path / "new" / "out")
    assert code == 2 and not (tmp_path / "new" / "out").exists()


def test_a_move_that_fails_puts_the_earlier_set_back(files, tmp_path, monkeypatch):
    from medlens.errors import OutputError
    from medlens.io import output

    model = torch.load(files / "tiny.pt", weights_only=False)
    first = medlens.explain(model, torch.randn(1, 1, 32, 32), ["gradcam", "saliency"], targets=[0])
    folder = tmp_path / "o"
    output.write_explanation(first, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_replace = output.os.replace
    moves = []

    def replace(src, dst):  # the third file moved in from staging is held open elsewhere
        if Path(src).parent.name.startswith(".medlens-staging") and Path(dst).parent == folder:
            moves.append(dst)
            if len(moves) == 3:
                raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    second = medlens.explain(model, torch.randn(1, 1, 32, 32), ["gradcam", "saliency"], targets=[1])
    with pytest.raises(OutputError, match="keeps what it had"):
        output.write_explanation(second, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_stale_files_are_matched_without_case(files, tmp_path, monkeypatch):
    from medlens.io import output

    model = torch.load(files / "tiny.pt", weights_only=False)
    result = medlens.explain(model, torch.randn(1, 1, 32, 32), "gradcam", targets=[0])
    folder = tmp_path / "o"
    written = output.write_explanation(result, folder)
    overlay = next(p.name for p in written if p.name.startswith("gradcam_"))
    prov = json.loads((folder / "provenance.json").read_text())
    prov["files"].append(overlay.upper())  # as if an earlier run had written the same name in other case
    (folder / "provenance.json").write_text(json.dumps(prov))
    monkeypatch.setattr(Path, "is_file", lambda self: True)  # a case-insensitive file system would say so
    unlinked = []
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: unlinked.append(self.name))
    output.write_explanation(result, folder)
    assert overlay.upper() not in unlinked


def test_an_error_that_would_fail_every_image_ends_the_run_at_once(capsys, files, tmp_path):
    code, _, err = run(capsys, "explain", files / "chest.png", files / "ct.dcm", "--model", files / "tiny.pt", "--allow-pickle",
                       "--methods", "lime", "--option", "kernel_width=-1", "--out", tmp_path / "o")
    assert code == 2 and "Traceback" not in err
    assert "kernel_width must be" in err and "could not be explained" not in err


def test_models_fits_a_100_column_terminal(capsys):
    for args in (("models",), ("models", "--long"), ("models", "brain-tumor-mri")):
        code, out, _ = run(capsys, *args)
        assert code == 0
        too_wide = [line for line in out.splitlines() if len(line) > 100 and not line.startswith("|")]  # card tables stay whole
        assert not too_wide, (args, too_wide)
    code, out, _ = run(capsys, "models", "--long")
    assert "10 x 10 last stage" in " ".join(out.split())  # the whole description, wrapped
    code, out, _ = run(capsys, "models", "brain-tumor-mri")
    assert out.startswith("# Model card: `brain-tumor-mri`") and "Not a medical device" in out


def test_models_with_an_unknown_name_exits_2(capsys):
    code, _, err = run(capsys, "models", "no-such-model")
    assert code == 2 and "brain-tumor-mri" in err and "Traceback" not in err


def test_signed_draws_the_raw_signed_map(capsys, files, tmp_path):
    """By default Grad-CAM's picture is its positive part (as defined); --signed draws the raw signed map. The raw
    maps in maps.npz are the same either way."""
    scales, raws = {}, {}
    for flag in ([], ["--signed"]):
        out = tmp_path / ("signed" if flag else "default")
        code, _, err = run(capsys, "explain", files / "chest.png", "--model", files / "tiny.pt", "--allow-pickle",
                           "--methods", "gradcam,integratedgradients", "--out", out, *flag)
        assert code == 0, err
        prov = json.loads((out / "chest" / "provenance.json").read_text())
        scales[bool(flag)] = {m: s["display"] for m, s in prov["rendering"]["colour_maps"].items()}
        with np.load(out / "chest" / "maps.npz") as npz:
            raws[bool(flag)] = npz["gradcam"].copy()
    assert scales[False] == {"gradcam": "positive", "integratedgradients": "signed"}
    assert scales[True] == {"gradcam": "signed", "integratedgradients": "signed"}
    np.testing.assert_array_equal(raws[False], raws[True])
