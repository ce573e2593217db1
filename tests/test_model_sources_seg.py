"""Segmentation and detection models as sources: MONAI networks by name with a local state dict and the constructor's
arguments in the sidecar ("monai:UNet", also as a sidecar "architecture"), nnU-Net-style exports (TorchScript and
torch.export .pt2 with per-voxel logits) through the "file" source, and torchvision segmentation and detection
architectures with a local weights file. Each loaded model gives the same output as the module it was saved from, is
described with its task, and nothing is downloaded (torch.hub's download function raises in these tests)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import medlens
from medlens.core.model_description import describe
from medlens.errors import ModelError


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


MONAI_NETS = {
    "UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2],
             "num_res_units": 1},
    "SegResNet": {"spatial_dims": 3, "init_filters": 8, "in_channels": 1, "out_channels": 2, "blocks_down": [1, 1],
                  "blocks_up": [1]},
    "SwinUNETR": {"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1],
                  "num_heads": [1, 1, 1, 1], "spatial_dims": 3},
}


@pytest.mark.parametrize("name", sorted(MONAI_NETS))
def test_monai_network_by_name(tmp_path, name):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = getattr(nets, name)(**MONAI_NETS[name]).eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    patch = [64, 64, 64] if name == "SwinUNETR" else [32, 32, 32]  # the probe runs on the patch size
    (tmp_path / "net.pt.json").write_text(json.dumps({"arguments": MONAI_NETS[name], "labels": ["background", "lesion"],
                                                      "patch_size": patch}))
    model = medlens.load_model(f"monai:{name}", weights=tmp_path / "net.pt")
    description = describe(model)
    assert description.task == "segmentation" and description.labels == ("background", "lesion")
    assert description.input_spec.extra["patch_size"] == patch and description.input_spec.size is None
    assert not any("not used" in note for note in description.notes)  # "arguments" is the source's own field
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


def test_monai_architecture_in_a_sidecar_and_mistakes(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    arguments = MONAI_NETS["UNet"]
    net = nets.UNet(**arguments).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    (tmp_path / "w.pt.json").write_text(json.dumps({"architecture": "monai:UNet", "arguments": arguments}))
    model = medlens.load_model(str(tmp_path / "w.pt"))
    assert describe(model).task == "segmentation" and describe(model).source.startswith("monai:UNet + ")
    (tmp_path / "w.pt.json").write_text(json.dumps({"labels": ["a", "b"]}))
    with pytest.raises(ModelError, match='"arguments"'):
        medlens.load_model("monai:UNet", weights=tmp_path / "w.pt")
    (tmp_path / "w.pt.json").write_text(json.dumps({"arguments": arguments}))
    with pytest.raises(ModelError, match="did you mean UNet"):
        medlens.load_model("monai:UNett", weights=tmp_path / "w.pt")
    with pytest.raises(ModelError, match="never downloads"):
        medlens.load_model("monai:UNet")
    (tmp_path / "w.pt.json").write_text(json.dumps({"arguments": {**arguments, "channels": [4, 8, 32]}}))
    with pytest.raises(ModelError):  # weights that do not fit the network built from the arguments
        medlens.load_model("monai:UNet", weights=tmp_path / "w.pt")
    (tmp_path / "w.pt.json").write_text(json.dumps({"arguments": {**arguments, "colour": "blue"}}))
    with pytest.raises(ModelError, match="cannot be built"):
        medlens.load_model("monai:UNet", weights=tmp_path / "w.pt")


class NnUNetLike(nn.Module):
    """What nnU-Net exports: a plain conv net with per-voxel logits for every class (background first)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.nn.functional.leaky_relu(self.enc(x)))


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_nnunet_style_export_loads_as_segmentation(tmp_path, kind):
    torch.manual_seed(0)
    net = NnUNetLike().eval()
    x = torch.randn(1, 1, 16, 24, 20)
    if kind == "torchscript":
        path = tmp_path / "nnunet.pt"
        torch.jit.trace(net, x).save(str(path))
    else:
        path = tmp_path / "nnunet.pt2"
        dims = {"x": {0: torch.export.Dim("b", max=64), 2: torch.export.Dim("d", min=4, max=256), 3: torch.export.Dim("h", min=4, max=512),
                      4: torch.export.Dim("w", min=4, max=512)}}
        torch.export.save(torch.export.export(net, (x.repeat(2, 1, 1, 1, 1),), dynamic_shapes=dims), str(path))
    model = medlens.load_model(str(path), labels="background,liver,tumour", input_size="16,24,20")
    assert describe(model).task == "segmentation"
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-6)
    target = medlens.SegmentationTarget(2, region=None)  # "tumour"
    result = medlens.explain(model, x, "integratedgradients", targets=[target], n_steps=16)
    assert result.provenance["region_targets"]["targets"][0]["name"] == "tumour@image"
    gap = result.provenance["methods"]["integratedgradients"]["completeness"]["relative_gap"][0][0]
    assert gap < 0.01
    reference = medlens.explain(net, x, "integratedgradients", targets=[target], n_steps=16)
    assert torch.allclose(result["integratedgradients"], reference["integratedgradients"], atol=1e-5)


def _saved(tmp_path, builder, **kwargs):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(builder, weights=None, weights_backbone=None, **kwargs).eval()
    torch.save(net.state_dict(), tmp_path / f"{builder}.pth")
    return net, tmp_path / f"{builder}.pth"


@pytest.mark.parametrize("builder, kwargs", [("lraspp_mobilenet_v3_large", {"num_classes": 2}),
                                             ("deeplabv3_mobilenet_v3_large", {"num_classes": 3, "aux_loss": True})])
def test_torchvision_segmentation(tmp_path, builder, kwargs):
    net, weights = _saved(tmp_path, builder, **kwargs)
    model = medlens.load_model(f"torchvision:{builder}", weights=weights, input_size=64)
    assert describe(model).task == "segmentation" and len(describe(model).labels) == kwargs["num_classes"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)["out"], net(x)["out"])


def test_torchvision_detection(tmp_path):
    net, weights = _saved(tmp_path, "fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    model = medlens.load_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", weights=weights, input_size=128)
    description = describe(model)
    assert description.task == "detection" and len(description.labels) == 3
    assert any("num_classes=3" in note for note in description.notes)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        mine, theirs = model(x)[0], net(x)[0]
    assert all(torch.equal(mine[k], theirs[k]) for k in ("boxes", "labels", "scores"))
