"""Vision transformers through the front ends, loaded as a user would (`timm:<arch>` with a local weights file, a
HuggingFace save_pretrained folder): `medlens batch` and `medlens evaluate` on the command line, a worker recipe
pickled as the processes and Ray executors ship it, and the app's explain path (catalogue, map store, panels) without
a browser. Each map equals `medlens.explain` on the same prepared input; a CAM, a gradient and attention_rollout.
"""
from __future__ import annotations

import csv
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import medlens
from medlens.app.catalogue import ModelCatalogue
from medlens.app.inputs import SAMPLES, load_sample
from medlens.app.maps import MapStore
from medlens.app.session import Current
from medlens.app.views import ViewSettings
from medlens.evaluation.localisation import energy_in_box
from medlens.evaluation_run.dataset import FolderDataset
from medlens.pipeline import ExplainRequest, WorkerRecipe, explain_prepared, plan_for, read_input

from batch_helpers import close_maps, manifest, maps_of, phantom_folder, run_cli
from helpers import write_box_folder

METHODS = ["gradcam", "saliency", "attention_rollout"]
LABELS = ["glioma", "meningioma"]  # the class folders of write_folder
ARCH = "timm:test_vit"  # timm's own small test ViT (6 blocks of 64)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """timm's test ViT at 48 x 48 (3 x 3 patches of 16), one input channel, two classes, seeded, as a state dict."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    module = timm.create_model(ARCH[5:], pretrained=False, num_classes=2, img_size=48, in_chans=1).eval()
    with torch.no_grad():  # timm initialises the head small: maps well above zero
        module.head.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("timm") / "vit.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HuggingFace ViT (2 blocks of 32, 32 x 32, one channel) saved with its labels and image processor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                    num_attention_heads=2, intermediate_size=64, num_channels=1, num_labels=2,
                                    id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    folder = tmp_path_factory.mktemp("hf") / "hf-vit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.ViTForImageClassification(config).eval()
        with torch.no_grad():
            model.classifier.weight.normal_(0, 0.5)
        model.save_pretrained(folder)
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5], image_std=[0.25]
                                       ).save_pretrained(folder)
    return folder


def write_folder(root: Path, per_class: int = 2, size: int = 64) -> Path:
    """Class folders of the LABELS with a bright square and its YOLO box file beside each image."""
    return write_box_folder(root, LABELS, per_class, size, suffix=".png")


def _source(kind: str, request: pytest.FixtureRequest) -> tuple[str, dict]:
    """(what --model takes, the load options) for a timm name with weights or a HuggingFace folder."""
    if kind == "timm":
        return ARCH, {"weights": request.getfixturevalue("timm_weights")}
    return str(request.getfixturevalue("hf_folder")), {}


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_batch_explains_a_transformer_in_mini_batches_to_the_maps_of_explain(kind, tmp_path, request):
    source, options = _source(kind, request)
    inputs = phantom_folder(tmp_path, 3, size=48)
    weights = ["--weights", options["weights"]] if options else []
    assert run_cli("batch", inputs, "--model", source, *weights, "--methods", ",".join(METHODS), "--out",
                   tmp_path / "out", "--formats", "png,npz", "--batch-size", "2", "--labels", ",".join(LABELS),
                   "--threads", "1", "-q") == 0
    records = manifest(tmp_path / "out")
    assert [r["status"] for r in records] == ["done"] * 3
    model = medlens.load_model(source, labels=LABELS, **options)
    plan = plan_for(model, ExplainRequest.build(METHODS))
    for record in records:
        alone = explain_prepared(plan, read_input(plan, inputs / record["path"])).result
        saved = maps_of(tmp_path / "out", record)
        for method in METHODS:
            key = next(k for k in saved if k.startswith(method))
            expected = alone[method][0, 0].numpy()
            assert np.abs(expected).max() > 0, method
            assert close_maps(saved[key].reshape(expected.shape), expected), (kind, method)
        assert any(o.endswith(".png") and "attention_rollout" in o for o in record["outputs"])


def test_a_transformer_worker_recipe_pickles_and_loads_its_own_model(timm_weights, tmp_path):
    """What the processes and Ray executors ship: the source and options, never the module; the worker's model
    explains to the maps of the one loaded here."""
    request = ExplainRequest.build(METHODS, formats="npz")
    model = medlens.load_model(ARCH, weights=timm_weights)
    recipe = WorkerRecipe(ARCH, {"weights": timm_weights}, request, threads=1, model=model)
    shipped = pickle.loads(pickle.dumps(recipe))
    assert shipped.model is None
    image = phantom_folder(tmp_path, 1, size=48) / "case000.png"
    here, there = recipe.plan(), shipped.plan()
    ours = explain_prepared(here, read_input(here, image)).result
    theirs = explain_prepared(there, read_input(there, image)).result
    for method in METHODS:
        torch.testing.assert_close(theirs[method], ours[method], rtol=0, atol=0)


def test_evaluate_scores_a_timm_transformer_given_by_architecture_and_weights(timm_weights, tmp_path):
    data = write_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "eval"
    assert run_cli("evaluate", "--model", ARCH, "--weights", timm_weights, "--labels", ",".join(LABELS), "--data", data,
                   "--methods", ",".join(METHODS), "--metrics", "energy_in_box,deletion", "--out", out,
                   "--batch-size", "2") == 0
    with open(out / "metrics.csv", newline="") as fh:
        rows = {(r["method"], r["metric"], r["target"]): r for r in csv.DictReader(fh)}
    assert {m for m, _, _ in rows} >= set(METHODS)
    # the energy in the box by hand: each image explained for its true class, the box on the model's grid
    model = medlens.load_model(ARCH, weights=timm_weights, labels=LABELS)
    plan = plan_for(model, ExplainRequest.build(METHODS))
    samples = FolderDataset(data, lambda path: read_input(plan, path).tensor[0])
    for method in METHODS:
        energies = []
        for i in range(len(samples)):
            sample = samples[i]
            result = medlens.explain(model, sample.x[None], method, targets=[LABELS.index(sample.label)])
            energies.append(float(energy_in_box(result[method], sample.mask[None])[0, 0]))
        row = rows[(method, "energy_in_box", "all")]
        assert int(row["n"]) == 4 and float(row["value"]) == pytest.approx(np.mean(energies), rel=1e-4, abs=1e-6), method
        assert 0 <= float(rows[(method, "deletion", "all")]["value"]) <= 1


def test_the_app_offers_transformer_files_and_folders_and_draws_their_maps(timm_weights, hf_folder, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "vit.pt").write_bytes(timm_weights.read_bytes())
    (models / "vit.pt.json").write_text(json.dumps({"architecture": ARCH, "labels": LABELS}))
    (models / "hf-vit").symlink_to(hf_folder, target_is_directory=True)
    catalogue = ModelCatalogue(models)
    assert {"file:vit.pt", "hf:hf-vit", "brain-tumor-mri-vit"} <= set(catalogue.keys())
    entry = catalogue.get("file:vit.pt")
    assert entry.error is None and tuple(entry.model.input_spec.size) == (48, 48)  # timm's own input spec, as with --weights
    loaded = load_sample(SAMPLES[0])
    current = Current(catalogue, MapStore(), loaded, {"models": ["file:vit.pt", "hf:hf-vit"], "methods": METHODS,
                                                      "options": {}}, ViewSettings())
    current.compute_all()
    assert current.errors == {}
    assert sorted({(p.model, p.method) for p in current.panels}) == sorted(
        (m, method) for m in ("file:vit.pt", "hf:hf-vit") for method in METHODS)
    for panel in current.panels:
        prepared, _, _ = current.prepared(panel.model)
        expected = medlens.explain(catalogue.get(panel.model).model, prepared.tensor, panel.method,
                                   targets=[panel.target])[panel.method][0, 0].numpy()
        assert np.abs(expected).max() > 0
        assert close_maps(panel.raw, expected), (panel.model, panel.method)
        assert current.png(panel)[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_app_model_that_does_not_load_says_why(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "vit.pt").write_bytes(b"not weights")
    (models / "vit.pt.json").write_text(json.dumps({"architecture": ARCH}))
    catalogue = ModelCatalogue(models)
    current = Current(catalogue, MapStore(), load_sample(SAMPLES[0]),
                      {"models": ["file:vit.pt"], "methods": ["attention_rollout"], "options": {}}, ViewSettings())
    current.compute_all()
    assert "vit.pt" in current.errors["file:vit.pt"] and "nn.Module" not in current.errors["file:vit.pt"]
