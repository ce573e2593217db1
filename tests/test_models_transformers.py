"""Vision transformers through `load_model`: a local HuggingFace folder (save_pretrained output) and a timm ViT / DeiT
named with a local weights file. Each loads offline, carries the labels and input its files say, and explains to
exactly the maps of the same module called directly.
"""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

import medlens
from medlens.errors import ModelError

METHODS = ["gradcam", "saliency", "occlusion"]
LABELS = {0: "pituitary", 1: "meningioma", 2: "glioma"}


def _hf_folder(tmp_path, channels: int = 1):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                    num_attention_heads=2, intermediate_size=64, num_channels=channels, num_labels=3,
                                    id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.ViTForImageClassification(config).eval()
        with torch.no_grad():  # a random head (HF initialises it small): maps well above zero
            model.classifier.weight.normal_(0, 0.5)
        folder = tmp_path / "hf-vit"
        model.save_pretrained(folder)
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * channels,
                                       image_std=[0.25] * channels).save_pretrained(folder)
    return model, folder


def _same_maps(loaded, module, x):
    # the same input spec on both: occlusion's "zero" baseline is the scan's black, which the spec defines
    module.input_spec = loaded.input_spec
    for method in METHODS:
        ours = medlens.explain(loaded, x, method, targets=[0, 2])
        direct = medlens.explain(module, x, method, targets=[0, 2])
        assert ours[method].abs().amax() > 0, method
        torch.testing.assert_close(ours[method], direct[method], rtol=0, atol=0, msg=method)


def test_a_huggingface_folder_loads_with_its_labels_and_input_and_explains_as_the_module(tmp_path):
    module, folder = _hf_folder(tmp_path)
    loaded = medlens.load_model(folder)
    assert loaded.labels == ["pituitary", "meningioma", "glioma"]
    spec = loaded.input_spec
    assert (spec.size, spec.channels, spec.mean, spec.std, spec.scale) == ((32, 32), 1, (0.5,), (0.25,), "uint8")
    assert medlens.load_model(f"hf:{folder}").labels == loaded.labels
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, module(x).logits, rtol=0, atol=0)
    _same_maps(loaded, module, x)


def test_only_local_huggingface_folders_load(tmp_path):
    with pytest.raises(ModelError, match="only local HuggingFace folders load.*never downloads"):
        medlens.load_model("hf:google/vit-base-patch16-224")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no .safetensors weights"):
        medlens.load_model(tmp_path)


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r'pip install "medlens\[transformers\]"'):
        medlens.load_model(tmp_path)


@pytest.mark.parametrize("arch, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_a_timm_transformer_with_local_weights_loads_with_its_size_and_normalisation(tmp_path, arch, prefix):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    module = timm.create_model(arch, pretrained=False, num_classes=3, img_size=48, in_chans=1).eval()
    assert module.num_prefix_tokens == prefix
    weights = tmp_path / "weights.pt"
    torch.save(module.state_dict(), weights)
    loaded = medlens.load_model(f"timm:{arch}", weights=weights)
    spec = loaded.input_spec
    assert (spec.size, spec.channels, spec.scale) == ((48, 48), 1, "uint8")  # 3 x 3 patches of 16, read from the weights
    cfg = module.pretrained_cfg
    assert spec.mean == pytest.approx((sum(cfg["mean"]) / 3,)) and spec.std == pytest.approx((sum(cfg["std"]) / 3,))
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    _same_maps(loaded, module, x)


def test_a_huggingface_folder_loads_with_the_network_cut_off(tmp_path, monkeypatch):
    # the folder's own files only: with every socket connection refused, the same model loads, to the last bit
    import socket

    module, folder = _hf_folder(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("medlens tried to reach the network while loading a local folder")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    loaded = medlens.load_model(folder)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, module(x).logits, rtol=0, atol=0)


def test_sharded_weights_load_and_weights_of_another_model_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    module, folder = _hf_folder(tmp_path)
    sharded = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(medlens.load_model(sharded)(x).logits, module(x).logits, rtol=0, atol=0)
    # a config beside weights of another model: transformers would fill the rest at random (and only log it);
    # medlens refuses, naming what does not fit
    config = json.loads((folder / "config.json").read_text())
    for changed, message in (({"num_hidden_layers": 3}, r"lack 16 tensor\(s\).*layers\.2\."),
                             ({"num_hidden_layers": 1}, r"hold 16 tensor\(s\) the config's model does not have.*layers\.1\."),
                             ({"num_labels": 4, "id2label": None, "label2id": None}, "classifier")):
        (folder / "config.json").write_text(json.dumps({k: v for k, v in {**config, **changed}.items() if v is not None}))
        with pytest.raises(ModelError, match=message):
            medlens.load_model(folder)
