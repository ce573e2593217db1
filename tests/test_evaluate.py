"""`evaluate()` and `medlens evaluate` end to end on a tiny synthetic folder: files, columns, baselines, seeds."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import medlens
from medlens.errors import InputError
from types import SimpleNamespace

from medlens.evaluation import metrics as M
from medlens.evaluation_run import dataset as D
from medlens.evaluation_run import runner as RUN
from medlens.evaluation_run import tables as T
from medlens.io import prepare, read_image
from medlens.core.input_spec import InputSpec
from medlens.core.model_state import hook_count

from helpers import write_box_folder, make_tiny2d, make_tiny3d, shared_dataset

LABELS = ["glioma", "meningioma"]


def prepare_image(path, spec):
    """The reader and preparation `medlens explain` uses (the pipeline's read_input): (C, *s)."""
    return prepare(read_image(path), spec, dims=len(spec.size) if spec.size else 2).tensor[0]


def folder_dataset(root, spec):
    return D.FolderDataset(root, lambda path: prepare_image(path, spec))


R = SimpleNamespace(evaluate=RUN.evaluate, METRICS=M.METRICS, LOCALISATION=M.LOCALISATION, COLUMNS=T.COLUMNS,
                    completeness_options=M.completeness_options, box_mask=D.box_mask, prepare_image=prepare_image,
                    FolderDataset=folder_dataset)
SPEC = InputSpec(size=(32, 32), channels=1, scale="uint8", mean=(0.5,), std=(0.25,), labels=tuple(LABELS))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded, setting restored after


def write_folder(root: Path, per_class: int = 3, size: int = 64) -> Path:
    """Class folders of the LABELS with a bright square and its YOLO box file beside each image."""
    return write_box_folder(root, LABELS, per_class, size, suffix=".jpg")


def tiny_model() -> torch.nn.Module:
    model = make_tiny2d(0, in_channels=1, num_classes=2)
    model.labels, model.multi_label, model.input_spec = list(LABELS), False, SPEC
    return model


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_box_mask_by_hand(tmp_path):
    box = tmp_path / "1.txt"
    box.write_text("0 0.5 0.25 0.5 0.25\n")  # x 0.25..0.75, y 0.125..0.375 on an 8x8 grid
    m = R.box_mask(box, (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:3, 2:6] = True  # pixel centres (i + 0.5) / 8 inside the box
    assert torch.equal(m, expected)
    assert not R.box_mask(tmp_path / "missing.txt", (8, 8)).any()


def test_prepare_image_follows_the_input_spec(tmp_path):
    from PIL import Image

    Image.fromarray(torch.full((10, 20), 255, dtype=torch.uint8).numpy()).save(tmp_path / "a.png")
    x = R.prepare_image(tmp_path / "a.png", SPEC)
    assert x.shape == (1, 32, 32) and torch.allclose(x, torch.full_like(x, (1.0 - 0.5) / 0.25))
    x3 = R.prepare_image(tmp_path / "a.png", InputSpec(size=None, channels=3, scale="none"))
    assert x3.shape == (3, 10, 20) and float(x3.max()) == 255


def test_evaluate_writes_every_metric_with_baselines(tmp_path):
    data = write_folder(tmp_path / "data")
    model = tiny_model()
    fast = {"deletion": {"steps": 8}, "insertion": {"steps": 8}, "road_morf": {"fractions": (0.2, 0.6)},
            "road_lerf": {"fractions": (0.2, 0.6)}, "randomization": {"max_steps": 2}, "max_sensitivity": {"samples": 2}}
    rows = R.evaluate(model, data, "gradcam,layercam", None, seed=0, out=tmp_path / "out", batch_size=4, metric_options=fast)
    header, written = read_csv(tmp_path / "out" / "metrics.csv")
    assert header == ["method", "metric", "target", "n", "value", "ci_low", "ci_high"]
    assert len(written) == len(rows)
    overall = {(r["method"], r["metric"]): r for r in written if r["target"] == "all"}
    for method in ("gradcam", "layercam"):
        for metric in R.METRICS:
            r = overall[(method, metric)]
            assert int(r["n"]) == 6, (method, metric)
            v, lo, hi = float(r["value"]), float(r["ci_low"]), float(r["ci_high"])
            assert math.isfinite(v) and lo - 1e-9 <= v <= hi + 1e-9, (method, metric, r)
    for baseline in ("baseline:center", "baseline:prior"):
        metrics = {m for (meth, m) in overall if meth == baseline}
        assert metrics == set(R.LOCALISATION)
    # per-class rows: the true class is explained, as each folder name is one of the model's labels
    per_class = [r for r in written if r["method"] == "gradcam" and r["metric"] == "deletion" and r["target"] != "all"]
    assert sorted((r["target"], r["n"]) for r in per_class) == [("glioma", "3"), ("meningioma", "3")]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["targets"] == {"true class": 6, "predicted class": 0}
    assert run["metric_notes"]["deletion"]["baseline"] == "zero" and "blur" in run["metric_notes"]["insertion"]["baseline"]
    for name in ("metrics.md", "deletion_curves.png", "metric_bars.png", "randomization_curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| baseline:center |" in md and "pointing_game ↑" in md and "deletion ↓" in md
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_evaluate_is_deterministic_and_limit_picks_a_seeded_subset(tmp_path):
    data = write_folder(tmp_path / "data")
    model = tiny_model()
    kw = dict(metrics="road_morf,pointing_game,sparseness", limit=4, seed=3, metric_options={"road_morf": {"fractions": (0.5,)}})
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = R.evaluate(model, data, "gradcam", **kw)
    b = R.evaluate(model, data, "gradcam", **kw)
    assert a == b
    # the model comes back as it was: train mode, same weights and BN statistics, no hooks, no grads
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert hook_count(model) == 0 and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert {r["n"] for r in a if r["target"] == "all"} == {4}
    # localisation baselines: the centre map is evaluated on the same images
    assert any(r["method"] == "baseline:center" and r["metric"] == "pointing_game" for r in a)


def test_unknown_labels_fall_back_to_the_predicted_class(tmp_path):
    data = write_folder(tmp_path / "data", per_class=1)
    model = tiny_model()
    model.labels = ["a", "b"]
    rows = R.evaluate(model, data, "gradcam", "sparseness", out=tmp_path / "out")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["targets"] == {"true class": 0, "predicted class": 2}
    assert {r["target"] for r in rows} <= {"all", "a", "b"}


def test_in_memory_3d_samples():
    model = make_tiny3d(0, num_classes=3)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(2):
        mask = torch.zeros(8, 8, 8, dtype=torch.bool)
        mask[2:5, 2:5, 2:5] = True
        samples.append({"image": torch.randn(1, 8, 8, 8, generator=gen), "mask": mask, "label": i})
    rows = R.evaluate(model, samples, "gradcam", "deletion,energy_in_box,auprc,sparseness",
                      metric_options={"deletion": {"steps": 4}})
    got = {(r["method"], r["metric"]) for r in rows if r["target"] == "all"}
    assert ("gradcam", "deletion") in got and ("baseline:prior", "auprc") in got


def test_bad_requests_raise_user_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(InputError, match="unknown metric"):
        R.evaluate(model, write_folder(tmp_path / "d"), "gradcam", "deletion,accuracy")
    with pytest.raises(InputError, match="does not exist"):
        R.evaluate(model, tmp_path / "nowhere", "gradcam", "deletion")


def test_medlens_evaluate_command_end_to_end(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "data", per_class=2)
    model = tiny_model()
    path = tmp_path / "model.pt"
    torch.save(model, path)  # a pickled module: CAMs need forward hooks, which TorchScript modules refuse
    (tmp_path / "model.pt.json").write_text(json.dumps({**SPEC.to_dict(), "labels": LABELS}))

    def load_sidecar_model(source, **_):
        """Stand-in for medlens.load_model (owned elsewhere): the module file plus its sidecar InputSpec."""
        m = torch.load(str(source), weights_only=False).eval()
        spec = InputSpec.from_dict(json.loads(Path(str(source) + ".json").read_text()))
        m.input_spec, m.labels, m.multi_label = spec, list(spec.labels), spec.multi_label
        return m

    # The command must go through medlens.load_model; the test pins what it returns, so it checks the
    # command and not the loader (tested with the loader's own files).
    calls = []
    monkeypatch.setattr(medlens, "load_model", lambda source, **kw: calls.append(source) or load_sidecar_model(source))

    from medlens.cli.group import main

    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(path), "--data", str(data), "--methods", "gradcam",
                 "--metrics", "deletion,pointing_game,iou", "--out", str(out), "--limit", "3", "--seed", "1"])
    assert code == 0 and calls == [str(path)]
    header, rows = read_csv(out / "metrics.csv")
    assert header == list(R.COLUMNS)
    assert {(r["method"], r["metric"]) for r in rows if r["target"] == "all"} == {
        ("gradcam", "deletion"), ("gradcam", "pointing_game"), ("gradcam", "iou"),
        ("baseline:center", "pointing_game"), ("baseline:center", "iou"),
        ("baseline:prior", "pointing_game"), ("baseline:prior", "iou")}
    assert all(r["n"] == "3" for r in rows if r["target"] == "all")
    assert main(["evaluate", "--model", str(path), "--data", str(data), "--methods", "gradcam",
                 "--metrics", "nonsense", "--out", str(out)]) == 2


def test_folder_reader_on_the_shared_figshare_layout():
    root = shared_dataset("brain-tumor-figshare")
    data = R.FolderDataset(root, InputSpec(size=(64, 64), channels=1, scale="uint8"))
    classes = {cls for _, cls in data.items}
    assert classes == {"glioma", "meningioma", "pituitary"} and len(data) > 1000
    first = next(i for i, (_, cls) in enumerate(data.items) if cls == "pituitary")
    sample = data[first]
    assert sample.x.shape == (1, 64, 64) and 0 <= float(sample.x.min()) and float(sample.x.max()) <= 1
    _, xc, yc, w, h = (float(v) for v in data.items[first][0].with_suffix(".txt").read_text().split()[:5])
    rows, cols = torch.nonzero(sample.mask, as_tuple=True)
    assert sample.mask.any() and sample.label == "pituitary"
    assert abs((cols.float().mean() + 0.5) / 64 - xc) < 1.5 / 64 and abs((rows.float().mean() + 0.5) / 64 - yc) < 1.5 / 64
    assert abs(sample.mask.sum() / 64 ** 2 - w * h) < (w + h) * 2 / 64 + 2 / 64 ** 2


def test_include_restricts_the_folder_to_a_listed_split(tmp_path):
    data = write_folder(tmp_path / "data")
    listing = tmp_path / "test.txt"
    listing.write_text("glioma/2.jpg\nmeningioma/13.jpg\n")
    rows = R.evaluate(tiny_model(), data, "gradcam", "sparseness", include=listing)
    assert {(r["target"], r["n"]) for r in rows} == {("all", 2), ("glioma", 1), ("meningioma", 1)}
    with pytest.raises(InputError, match="not under"):
        R.evaluate(tiny_model(), data, "gradcam", "sparseness", include=["glioma/99.jpg"])


def test_completeness_checks_what_each_method_claims(tmp_path):
    # LRP claims conservation (sum = f(x)), integrated gradients f(x) - f(its baseline); a CAM claims nothing
    # and keeps the metric's default; a baseline given in the metric's options wins for every method
    assert R.completeness_options("lrp", {}) == {"baseline": None}
    assert R.completeness_options("integratedgradients", {"rtol": 0.1}) == {"rtol": 0.1, "baseline": "zero"}
    assert R.completeness_options("kernelshap", {}) == {"baseline": "mean"}
    assert R.completeness_options("gradcam", {}) == {}
    assert R.completeness_options("lrp", {"baseline": "blur"}) == {"baseline": "blur"}
    data = write_folder(tmp_path / "data", per_class=2)
    model = tiny_model()
    R.evaluate(model, data, "lrp,integratedgradients", "completeness", seed=0, out=tmp_path / "out")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["metric_notes"]["completeness"]["reference"] == {
        "lrp": "f(x) (conservation)", "integratedgradients": "f(x) - f(zero: the scan's black)"}  # the model normalises
    _, rows = read_csv(tmp_path / "out" / "metrics.csv")
    value = {r["method"]: float(r["value"]) for r in rows if r["target"] == "all"}
    assert value["integratedgradients"] < 0.05  # IG's completeness holds at its default 50 steps
    # LRP's value is 1 - the fraction of the logit that reached the input (its own provenance record)
    samples = R.FolderDataset(data, model.input_spec)
    x = torch.stack([samples[i].x for i in range(len(samples))])
    targets = [[LABELS.index(samples[i].label)] for i in range(len(samples))]
    r = medlens.explain(model, x, "lrp", targets=targets)
    fraction = torch.tensor(r.provenance["methods"]["lrp"]["conservation"]["fraction_reaching_input"]).flatten()
    assert value["lrp"] == pytest.approx(float((fraction - 1).abs().mean()), rel=1e-3, abs=1e-4)


def test_the_processes_executor_gives_the_rows_of_a_serial_run(tmp_path):
    """Workers load the model themselves and score whole batches; merged in batch order, every row (values,
    intervals, noise-seeded ROAD) equals the serial run's, and run.json says which executor ran. Completeness to
    float32's last bits only: it subtracts the explanation's logits from a baseline's score, and a worker (one torch
    thread, a fresh process) and the test process (its threads, the folded copy earlier metrics built) round
    those forwards differently by about 3e-8 of the value."""
    data = write_folder(tmp_path / "data", per_class=3)
    model = medlens.load_model("phantom-lesion")
    common = dict(methods="gradcam,saliency", metrics="deletion,road_morf,pointing_game,completeness", seed=3,
                  batch_size=2)
    serial = R.evaluate(model, data, **common)
    parallel = R.evaluate(model, data, **common, executor="processes", workers=2, model_source="phantom-lesion",
                          out=tmp_path / "out")
    key = lambda r: (r["method"], r["metric"], r["target"])  # noqa: E731
    serial, parallel = sorted(serial, key=key), sorted(parallel, key=key)
    assert [key(r) for r in serial] == [key(r) for r in parallel]
    for ours, theirs in zip(serial, parallel):
        if ours["metric"] == "completeness":
            assert ours.keys() == theirs.keys() and ours["n"] == theirs["n"]
            for field in ("value", "ci_low", "ci_high"):
                assert math.isclose(ours[field], theirs[field], rel_tol=1e-6), (ours, theirs)
        else:
            assert ours == theirs
    assert json.loads((tmp_path / "out" / "run.json").read_text())["executor"] == {"name": "processes", "workers": 2}


def test_a_parallel_run_needs_a_model_the_workers_can_load(tmp_path):
    data = write_folder(tmp_path / "data", per_class=1)
    with pytest.raises(InputError, match="model by name or file"):
        R.evaluate(tiny_model(), data, "gradcam", "sparseness", executor="processes")


def test_the_values_do_not_depend_on_the_batch_size(tmp_path):
    """The noise of max-sensitivity and ROAD comes from each image's (and job's) own generator, seeded alike: a
    batch of 1 and of 4 give each image the same perturbations (before, batch-seeded noise moved LRP's
    max-sensitivity by up to 17 % between --batch-size 1 and 8)."""
    data = write_folder(tmp_path / "data", per_class=2)
    model = medlens.load_model("phantom-lesion")
    common = dict(methods="gradcam,lrp", metrics="road_morf,max_sensitivity,deletion", seed=3,
                  metric_options={"road_morf": {"fractions": (0.3, 0.6)}, "max_sensitivity": {"samples": 3}})
    key = lambda r: (r["method"], r["metric"], r["target"])  # noqa: E731
    one = sorted(R.evaluate(model, data, **common, batch_size=1), key=key)
    four = sorted(R.evaluate(model, data, **common, batch_size=4), key=key)
    assert [key(r) for r in one] == [key(r) for r in four]
    for a, b in zip(one, four):
        for field in ("value", "ci_low", "ci_high"):
            assert math.isclose(a[field], b[field], rel_tol=1e-4, abs_tol=1e-6), (a, b)


def test_noise_drawing_metrics_score_an_image_alike_in_any_batch():
    from medlens.evaluation import faithfulness as F
    from medlens.evaluation import trust as TR

    model = make_tiny2d(seed=1)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0], [1], [0]])
    maps = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = TR.max_sensitivity(model, x, targets, "saliency", samples=3, seed=4)
    road = F.road(model, x, maps, targets, fractions=(0.25, 0.5), noise=0.05, seed=4).values
    for i in range(3):
        alone = TR.max_sensitivity(model, x[i:i + 1], targets[i:i + 1], "saliency", samples=3, seed=4)
        assert torch.allclose(alone, batch[i:i + 1], rtol=1e-5, atol=1e-7)
        road_alone = F.road(model, x[i:i + 1], maps[i:i + 1], targets[i:i + 1], fractions=(0.25, 0.5), noise=0.05,
                            seed=4).values
        assert torch.allclose(road_alone, road[i:i + 1], rtol=1e-5, atol=1e-7)


def test_a_refused_evaluation_leaves_no_folder_and_a_new_one_no_stale_plots(tmp_path, monkeypatch):
    from medlens.cli.group import main

    data = write_folder(tmp_path / "data", per_class=1)
    base = ["evaluate", "--model", "phantom-lesion", "--data", str(data)]
    for bad in (["--methods", "nosuch"], ["--methods", "gradcam", "--batch-size", "0"],
                ["--methods", "gradcam", "--workers", "0"]):
        fresh = tmp_path / "fresh"
        assert main(base + bad + ["--metrics", "sparseness", "--out", str(fresh / "a" / "b")]) == 2
        assert not fresh.exists()
    out = tmp_path / "out"
    assert main(base + ["--methods", "gradcam", "--metrics", "deletion,sparseness", "--out", str(out)]) == 0
    assert (out / "deletion_curves.png").is_file()
    assert main(base + ["--methods", "gradcam", "--metrics", "sparseness", "--out", str(out)]) == 0
    plots = json.loads((out / "run.json").read_text())["plots"]
    assert not (out / "deletion_curves.png").exists() and all((out / p).is_file() for p in plots)
