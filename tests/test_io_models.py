"""Loading models: TorchScript, pickled modules, architecture + weights, sidecar JSON, xrv and bundled names, errors."""
from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import medlens
from helpers import make_tiny2d, torchvision_model
from medlens.errors import ModelError
from medlens.models.state_dicts import read_state_dict
import medlens.models.loading
from medlens.models.loading import load_model
from medlens.core.input_spec import InputSpec


def _tiny(seed: int = 0, num_classes: int = 3) -> nn.Module:
    return make_tiny2d(seed, num_classes=num_classes)


def _x(seed: int = 1, shape=(2, 1, 24, 24)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def torchscript_file(tmp_path):
    model = _tiny()
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(path))
    return path, model


def test_torchscript_round_trip_with_sidecar_labels(torchscript_file):
    path, original = torchscript_file
    path.with_name(path.name + ".json").write_text(json.dumps({"labels": ["glioma", "meningioma", "none"], "size": [32, 32], "multi_label": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = medlens.load_model(path)
    x = _x()
    torch.testing.assert_close(model(x), original(x))
    assert model.labels == ["glioma", "meningioma", "none"] and model.multi_label is True
    assert model.input_spec.size == (32, 32) and model.input_spec.channels == 1
    assert model.medlens_source["kind"] == "torchscript" and len(model.medlens_source["sha256"]) == 64
    assert not model.training


def test_sidecar_model_json_and_options_override(tmp_path):
    original = _tiny()
    path = tmp_path / "net.pth"
    torch.save(original, path)
    (tmp_path / "net.json").write_text(json.dumps({"labels": ["a", "b", "c"], "scale": "uint8"}))
    model = load_model(path, allow_pickle=True)
    assert model.labels == ["a", "b", "c"] and model.input_spec.scale == "uint8"
    model = load_model(path, labels="x,y,z", input_size=16, allow_pickle=True)
    assert model.labels == ["x", "y", "z"] and model.input_spec.size == (16, 16)
    assert any("overrides" in n for n in model.medlens_source["notes"])


def test_pickled_module_refused_by_default_and_loaded_when_allowed(tmp_path):
    original = _tiny(seed=3)
    path = tmp_path / "pickled.pt"
    torch.save(original, path)
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "pickled.pt" in message and "runs whatever code" in message and "allow_pickle=True" in message
    assert "--allow-pickle" in message and "TorchScript" in message and ".pt2" in message and ".safetensors" in message
    assert "\n" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit opt-in is not warned about again: it is noted in provenance
        model = load_model(path, allow_pickle=True)
    assert any("ran code" in n for n in model.medlens_source["notes"]) and model.medlens_source["kind"] == "pickled module"
    x = _x()
    torch.testing.assert_close(model(x), original(x))
    assert model.labels == ["class 0", "class 1", "class 2"] and model.multi_label is False
    assert model.medlens_source["from"]["labels"] == "default"
    with pytest.raises(ModelError, match="allow_pickle"):
        load_model(path, allow_pickle=False)


def test_torchvision_architecture_with_weights(tmp_path):
    original = torchvision_model("resnet18", num_classes=4, seed=2)
    original.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # a 1-channel radiograph model
    torch.nn.init.normal_(original.conv1.weight, generator=torch.Generator().manual_seed(0))
    weights = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}}, weights)  # a DataParallel checkpoint
    model = load_model("torchvision:resnet18", weights=weights, labels=["a", "b", "c", "d"], input_size=32)
    x = _x(shape=(1, 1, 32, 32))
    torch.testing.assert_close(model(x), original.eval()(x))
    assert model.input_spec.channels == 1 and model.labels == ["a", "b", "c", "d"]
    with pytest.raises(ModelError, match=r"resnet18\.pth.*do not match the architecture torchvision:resnet34"):
        load_model("torchvision:resnet34", weights=weights)
    with pytest.raises(ModelError, match="do not match"):
        load_model("torchvision:resnet18", weights=weights, num_classes=7)
    with pytest.raises(ModelError, match="resnet18"):
        load_model("torchvision:resnet81", weights=weights)
    with pytest.raises(ModelError, match="never downloads"):
        load_model("torchvision:resnet18")


def test_timm_architecture_needs_timm(tmp_path):
    pytest.importorskip("torch")
    try:
        import timm  # noqa: F401
    except ImportError:
        weights = tmp_path / "w.pth"
        torch.save(_tiny().state_dict(), weights)
        with pytest.raises(ModelError, match="pip install timm"):
            load_model("timm:resnet18", weights=weights)
    else:  # pragma: no cover - timm is not part of the test environment
        pytest.skip("timm is installed here")


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("notes.pt", b"this is a text file, not a model", "not a model file"),
        ("weights.pt", "state_dict", "holds weights .* but no architecture"),
        ("tensor.pt", "tensor", "holds a Tensor, not a model"),
        ("truncated.pt", "truncated", "not a model file"),
    ],
)
def test_files_that_are_not_models(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content == "state_dict":
        torch.save(_tiny().state_dict(), path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "truncated":
        torch.save(_tiny(), tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=pattern) as info:
        load_model(path, allow_pickle=True)
    assert name in str(info.value)


def test_unknown_name_and_label_count_mismatch(tmp_path):
    with pytest.raises(ModelError, match="neither a bundled model name nor an existing file"):
        load_model("no-such-model")
    with pytest.raises(ModelError, match="2 labels were given .* 3 outputs"):
        load_model(_tiny(), labels=["a", "b"])


def test_model_that_is_not_a_classifier(tmp_path):
    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    from medlens.core.model_description import describe

    assert describe(load_model(Segmenter())).task == "segmentation"  # per-pixel logits: a segmentation model

    class Flat(nn.Module):  # (B, K, W) for a 2-D input: neither classes nor classes per pixel
        def forward(self, x):
            return x[:, :, 0]

    with pytest.raises(ModelError, match="not logits of shape"):
        load_model(Flat(), input_size=8, channels=1)


def test_model_own_spec_is_kept_and_3d_inferred(tiny3d):
    m = _tiny()
    m.input_spec = InputSpec(size=(20, 20), channels=1, labels=("p", "q", "r"), multi_label=True)
    model = load_model(m)
    assert model.labels == ["p", "q", "r"] and model.multi_label and model.input_spec.size == (20, 20)
    model3d = load_model(tiny3d, input_size=(8, 16, 16))
    assert model3d.input_spec.size == (8, 16, 16)
    assert medlens.load_input.__module__ == "medlens"


def _fake_xrv(monkeypatch, tmp_path):
    """A stand-in for torchxrayvision with its structure: model_urls, a module-level download() that its
    weight lookup calls when the cache file is missing, and DenseNet(weights=name)."""
    downloads = []
    cache = tmp_path / "models_data"

    def download(url, filename):
        downloads.append(url)

    class FakeDenseNet(nn.Module):
        def __init__(self, weights=None):
            super().__init__()
            url = models_mod.model_urls[weights]["weights_url"]
            local = cache / url.rsplit("/", 1)[-1]
            if not local.is_file():
                print("Downloading weights...")
                models_mod.download(url, str(local))
            self.features = nn.Conv2d(1, 4, 3)
            self.classifier = nn.Linear(4, 3)
            self.targets = self.pathologies = ["Atelectasis", "", "Effusion"]
            self.register_buffer("op_threshs", torch.tensor([0.1, 0.2, 0.3]))

        def forward(self, x):
            out = self.classifier(self.features(x).mean(dim=(2, 3)))
            return torch.sigmoid(out) if self.op_threshs is not None else out

    models_mod = types.SimpleNamespace(
        model_urls={"densenet121-res224-all": {"weights_url": "https://example.invalid/v1/all-weights.pt"}},
        DenseNet=FakeDenseNet,
        ResNet=FakeDenseNet,
        download=download,
    )
    fake = types.ModuleType("torchxrayvision")
    fake.models = models_mod
    monkeypatch.setitem(sys.modules, "torchxrayvision", fake)
    return cache, downloads, models_mod


def test_xrv_without_package_names_the_cache_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # make the import fail even if installed
    with pytest.raises(ModelError) as info:
        load_model("xrv:densenet121-res224-all")
    message = str(info.value)
    assert "pip install torchxrayvision" in message
    assert ".torchxrayvision/models_data/nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121" in message
    assert "never downloads" in message


def test_xrv_never_downloads_and_loads_from_cache(monkeypatch, tmp_path, capsys):
    cache, downloads, models_mod = _fake_xrv(monkeypatch, tmp_path)
    with pytest.raises(ModelError, match=r"not in TorchXRayVision's local cache: .*models_data/all-weights\.pt"):
        load_model("xrv:densenet121-res224-all")
    assert downloads == [] and models_mod.download.__name__ == "download"  # never called, and restored
    assert "Downloading" not in capsys.readouterr().out
    with pytest.raises(ModelError, match="unknown TorchXRayVision weights"):
        load_model("xrv:densenet121-res224-alll")
    cache.mkdir()
    (cache / "all-weights.pt").write_bytes(b"x")
    model = load_model("xrv:densenet121-res224-all")
    assert model.op_threshs is None  # logits, not calibrated probabilities
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(model(x), model.classifier(model.features(x).mean(dim=(2, 3))))
    assert model.multi_label and model.labels == ["Atelectasis", "unused 1", "Effusion"]
    spec = model.input_spec
    assert spec.size == (224, 224) and spec.scale == "uint8"
    # 8-bit pixel 0 -> -1024 and 255 -> +1024, TorchXRayVision's input range
    lo = (0.0 - spec.mean[0]) / spec.std[0]
    hi = (1.0 - spec.mean[0]) / spec.std[0]
    assert (lo, hi) == pytest.approx((-1024.0, 1024.0))


def test_the_first_input_a_model_sees_is_scaled_like_a_real_one(monkeypatch, tmp_path):
    """TorchXRayVision warns when its input is not in [-1024, 1024]; medlens's probe pass must not feed it zeros."""
    cache, _, models_mod = _fake_xrv(monkeypatch, tmp_path)
    cache.mkdir()
    (cache / "all-weights.pt").write_bytes(b"x")
    seen = []
    forward = models_mod.DenseNet.forward
    monkeypatch.setattr(models_mod.DenseNet, "forward", lambda self, x: seen.append(x.detach().clone()) or forward(self, x))
    model = load_model("xrv:densenet121-res224-all")
    first = seen[0]
    assert first.shape == (1, 1, 224, 224) and bool((first != 0).any())
    assert float(first.min()) == pytest.approx(-1024.0) and float(first.max()) == pytest.approx(1024.0)
    assert model.input_spec.value_range == pytest.approx((-1024.0, 1024.0))


def test_bundled_model_through_zoo(monkeypatch):
    def load_bundled(name):
        m = _tiny()
        m.labels = ["a", "b", "c"]
        m.input_spec = InputSpec(size=(24, 24), labels=("a", "b", "c"))
        return m

    # the zoo's list and loader, which the "bundled" model source asks, replaced by these stand-ins
    monkeypatch.setattr(medlens.models.zoo, "bundled_models", lambda: {"tiny-test": {"labels": ["a", "b", "c"]}})
    monkeypatch.setattr(medlens.models.zoo, "load_bundled", load_bundled)
    model = load_model("tiny-test")
    assert model.labels == ["a", "b", "c"] and model.medlens_source["kind"] == "bundled"
    with pytest.raises(ModelError, match="Bundled models: tiny-test"):
        load_model("tiny-tset")


def test_a_one_output_model_is_read_as_one_findings_logit():
    one = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(2, 1)).eval()
    model = medlens.load_model(one)
    assert model.multi_label is True
    assert any("one output" in n for n in model.medlens_source["notes"])
    # a softmax over one output would say p = 1 for every image; the sigmoid does not
    result = medlens.explain(model, torch.randn(1, 1, 16, 16), "gradcam")
    torch.testing.assert_close(result.probabilities, torch.sigmoid(result.logits))
    assert medlens.load_model(one, multi_label=False).multi_label is False


class Marker:
    """A class a weights-only load must refuse; unpickling it would record that code from the file ran."""

    ran: list = []

    def __init__(self):
        self.payload = "code from the file ran"

    def __setstate__(self, state):
        Marker.ran.append(state)


def test_state_dicts_are_read_without_pickle(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": _tiny().state_dict(), "extra": Marker()}, path)
    with pytest.raises(ModelError, match=r"cannot read the weights file .*checkpoint\.pt"):
        read_state_dict(path)
    with pytest.raises(ModelError, match="cannot read the weights file"):
        load_model("torchvision:resnet18", weights=path)
    assert Marker.ran == []


def test_safetensors_weights_with_an_architecture_name_or_a_sidecar(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    original = torchvision_model("resnet18", num_classes=2, seed=4).eval()
    path = tmp_path / "net.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    x = _x(shape=(1, 3, 32, 32))
    model = load_model("torchvision:resnet18", weights=path, input_size=32)
    torch.testing.assert_close(model(x), original(x))
    with pytest.raises(ModelError, match="holds weights .safetensors. but no architecture"):
        load_model(path)
    (tmp_path / "net.safetensors.json").write_text(json.dumps({"architecture": "torchvision:resnet18", "labels": ["no", "yes"],
                                                               "size": [32, 32]}))
    model = load_model(path)
    torch.testing.assert_close(model(x), original(x))
    assert model.labels == ["no", "yes"] and model.medlens_source["kind"] == "architecture+weights"
    assert not any("not used" in n for n in model.medlens_source["notes"])  # "architecture" is read, not ignored
    (tmp_path / "net.safetensors.json").write_text(json.dumps({"architecture": "SmallResNet"}))
    with pytest.raises(ModelError, match="must be .torchvision:<name>"):
        load_model(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny CNN saved as a torch.export program with a dynamic batch, and the module it came from."""
    original = _tiny(seed=6).eval()
    program = torch.export.export(original, (torch.randn(2, 1, 24, 24),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = tmp_path_factory.mktemp("export") / "tiny.pt2"
    torch.export.save(program, str(path))
    return path, original


def test_torch_export_program_runs_hook_and_guided_methods_as_the_module_it_came_from(exported):
    path, original = exported
    model = load_model(path)
    assert model.medlens_source["kind"] == "torch.export"
    assert model.input_spec.size == (24, 24) and model.input_spec.channels == 1  # from the exported input
    x = _x(shape=(1, 1, 24, 24))
    torch.testing.assert_close(model(x), original(x))
    methods = ["gradcam", "layercam", "saliency", "integratedgradients", "occlusion", "guidedbackprop"]
    got = medlens.explain(model, x, methods=methods, targets=[0, 2])
    want = medlens.explain(original, x, methods=methods, targets=[0, 2])
    # the unflattened program keeps the module tree, so layer hooks see the same activations; its ReLUs are graph
    # operations whose backward nodes the per-call guided hooks reach like an eager module's
    for m in methods:
        torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=1e-5)
    leaf = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(original(leaf)[0, 0], leaf)
    assert not torch.allclose(got["guidedbackprop"][0, 0], plain[0].sum(0))  # guided, not silently the plain gradient


def test_torch_export_program_with_pickled_objects_is_refused(exported, tmp_path):
    import zipfile

    path, _ = exported
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                buffer = __import__("io").BytesIO()
                torch.save(((Marker(),), {}), buffer)
                data = buffer.getvalue()
            dst.writestr(info, data)
    with pytest.raises(ModelError, match=r"hostile\.pt2: the exported program holds pickled Python objects"):
        load_model(hostile)
    assert Marker.ran == []
