"""The one model description: what `describe` gives for each model source (bundled name, architecture + state dict,
TorchScript, a user's own module), that the table of sources is the one way in, and that no module outside
`medlens.models` (and the accessor's own module) reads a model's description attributes itself."""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import medlens
from medlens.core.input_spec import InputSpec
from medlens.core.model_description import ModelDescription, describe
from medlens.errors import ModelError
from medlens.models import loading
from medlens.models.source import LoadedModel, ModelSource

SRC = Path(__file__).resolve().parents[1] / "src" / "medlens"
DESCRIPTION_ATTRIBUTES = {"input_spec", "labels", "multi_label", "medlens_source", "medlens_description"}
ALLOWED = {SRC / "core" / "model_description.py"}  # the accessor; medlens/models/ builds the description


def _net(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes)).eval()


def _getattr_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, attribute) of every getattr/hasattr/setattr call whose attribute is a description attribute."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in DESCRIPTION_ATTRIBUTES):
            found.append((node.lineno, node.args[1].value))
    return found


def test_no_module_outside_models_reads_the_description_attributes_by_getattr():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path in ALLOWED or (SRC / "models") in path.parents:
            continue
        for line, name in _getattr_reads(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(SRC.parent)}:{line} getattr(..., {name!r})")
    assert not offenders, "read the model's description with describe(model) instead:\n" + "\n".join(offenders)


def test_the_scan_sees_a_getattr_read():
    """The scan can fail: it finds the pattern the readers used before `describe` existed."""
    assert _getattr_reads(ast.parse('labels = getattr(model, "labels", None)')) == [(1, "labels")]


def test_a_bundled_model_is_described_from_its_zoo_entry():
    model = medlens.load_model("phantom-lesion")
    d = describe(model)
    assert isinstance(d, ModelDescription) and d.kind == "bundled" and d.source == "phantom-lesion"
    assert d.labels == ("normal", "lesion") and d.multi_label is False and d.task == "classification"
    assert d.input_spec.size == (64, 64) and d.input_spec.labels == d.labels
    assert len(d.sha256) == 64 and d.origin["labels"] == "model"
    assert model.labels == ["normal", "lesion"] and model.medlens_source == d.provenance()  # what users read agrees


def test_architecture_and_state_dict_with_a_sidecar(tmp_path):
    import torchvision

    weights = tmp_path / "squeeze.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=2).state_dict(), weights)
    (tmp_path / "squeeze.pth.json").write_text(json.dumps({"labels": ["benign", "malignant"], "modality": "CT"}))
    model = medlens.load_model("torchvision:squeezenet1_1", weights=weights, input_size=64)
    d = describe(model)
    assert d.kind == "architecture+weights" and d.source == f"torchvision:squeezenet1_1 + {weights}"
    assert d.labels == ("benign", "malignant") and d.origin["labels"] == "sidecar squeeze.pth.json"
    assert d.input_spec.size == (64, 64) and d.origin["size"] == "option" and d.input_spec.channels == 3
    assert d.input_spec.modality == "CT" and d.sidecar == str(tmp_path / "squeeze.pth.json")
    assert any("num_classes=2 read from the weights" in n for n in d.notes)


def test_torchscript_described_from_options_and_defaults(tmp_path):
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_net(num_classes=2)), str(path))
        model = medlens.load_model(path, labels="no finding,finding")
    d = describe(model)
    assert d.kind == "torchscript" and d.source == str(path) and len(d.sha256) == 64
    assert d.labels == ("no finding", "finding") and d.origin["labels"] == "option"
    assert d.multi_label is False and d.origin["multi_label"] == "default"
    assert d.input_spec.channels == 1 and d.origin["channels"] == "first convolution" and d.input_spec.size is None


def test_a_plain_user_module_is_described_from_what_it_carries():
    net = _net()
    net.labels = ["a", "b", "c"]
    d = describe(net)  # not loaded by medlens: no probe pass, nothing stored on the module
    assert d.labels == ("a", "b", "c") and d.multi_label is False and d.input_spec is None
    assert d.kind == "module" and d.source == "Sequential" and "medlens_description" not in net.__dict__
    net.multi_label = True
    assert describe(net).multi_label is True  # read at every call
    result = medlens.explain(net, torch.randn(1, 1, 8, 8), "saliency", targets=["b"])
    assert result.labels == ["a", "b", "c"] and result.targets.tolist() == [[1]]
    loaded = medlens.load_model(net)  # through load_model: probed and stored, the module's own labels kept
    assert describe(loaded).kind == "module" and describe(loaded).origin["labels"] == "model"
    assert describe(_net()).labels == () and describe(None) == ModelDescription()


def test_what_a_user_sets_after_loading_wins():
    model = medlens.load_model(_net(num_classes=2), labels="x,y")
    model.labels = ["left", "right"]
    model.input_spec = InputSpec(size=(16, 16), labels=("left", "right"))
    d = describe(model)
    assert d.labels == ("left", "right") and d.input_spec.size == (16, 16) and d.kind == "module"


def test_a_new_source_is_one_table_entry(monkeypatch):
    def load(source, options):
        return LoadedModel(_net(num_classes=2), ModelDescription(source=source, kind="toy"))

    entry = ModelSource("toy", lambda s: isinstance(s, str) and s.startswith("toy:"), load)
    monkeypatch.setattr(loading, "SOURCES", (entry,) + loading.SOURCES)
    model = medlens.load_model("toy:anything", labels=["p", "q"])
    d = describe(model)
    assert d.kind == "toy" and d.labels == ("p", "q") and not model.training
    assert loading.source_for("toy:x") is entry and loading.source_for("phantom-lesion").name == "bundled"
    with pytest.raises(ModelError, match="weights= is only used with an architecture name"):
        medlens.load_model("toy:anything", weights="w.pt")


def test_every_source_is_named_once_and_a_path_is_asked_last():
    names = [s.name for s in loading.SOURCES]
    assert len(names) == len(set(names)) and names[-1] == "file"
    assert [s.name for s in loading.SOURCES if s.takes_weights] == ["architecture", "monai"]
    with pytest.raises(ModelError, match="must be a name, a path or an nn.Module, not int"):
        medlens.load_model(3)
