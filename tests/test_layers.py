"""Target-layer choice: automatic on torchvision families, by dotted name or module, and clear errors.

Also the role predicates (matched by isinstance, so subclasses of torch layers count).
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import medlens
from medlens.errors import MethodError, ModelError
from medlens.core.layers import is_activation, is_batchnorm, is_conv, is_global_pooling, is_linear, resolve_target_layer

from helpers import layer_output, torchvision_model


@pytest.mark.parametrize(
    "arch, expected, size",
    [
        ("resnet18", "layer4", 64),
        ("densenet121", "features", 64),
        ("vgg11", "features", 64),
        ("efficientnet_b0", "features", 64),
        ("convnext_tiny", "features", 64),
    ],
)
def test_automatic_layer_is_the_last_feature_map_before_global_pooling(arch, expected, size):
    model = torchvision_model(arch, num_classes=3)
    x = torch.randn(1, 3, size, size)
    layer = resolve_target_layer(model, x)
    assert layer.name == expected and layer.chosen_automatically
    assert layer.module is dict(model.named_modules())[expected]
    # It is spatial (more than one position) and the global pooling right after it is not chosen.
    out = layer_output(model, layer.module, x)
    assert out.dim() == 4 and out.shape[2] * out.shape[3] > 1


def test_the_remembered_automatic_layer_follows_a_replaced_or_removed_module():
    model = torchvision_model("resnet18", num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    assert resolve_target_layer(model, x).module is model.layer4
    model.layer4 = nn.Sequential(nn.Conv2d(256, 8, 3, padding=1), nn.ReLU())  # same name, a new module
    model.fc = nn.Linear(8, 3)
    layer = resolve_target_layer(model, x)
    assert layer.module is model.layer4 and layer.name == "layer4"
    convs = nn.Sequential(OrderedDict(
        a=nn.Conv2d(3, 4, 3), b=nn.Conv2d(4, 4, 3), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 3)))
    assert resolve_target_layer(convs, x).name == "b"
    del convs.b  # the remembered name is gone: the layer is found again
    assert resolve_target_layer(convs, x).name == "a"


def test_a_model_without_a_spatial_layer_gets_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with pytest.raises(ModelError, match="no layer with a spatial output"):
        medlens.explain(mlp, torch.randn(1, 3, 8, 8), "gradcam")


def test_dotted_name_and_module_select_the_layer():
    model = torchvision_model("resnet18", num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    by_name = medlens.explain(model, x, "gradcam", targets=0, layer="layer3")
    by_module = medlens.explain(model, x, "gradcam", targets=0, layer=model.layer3)
    auto = medlens.explain(model, x, "gradcam", targets=0)
    assert by_name.provenance["layer"]["name"] == "layer3" and not by_name.provenance["layer"]["chosen_automatically"]
    assert by_module.provenance["layer"]["name"] == "layer3"
    assert torch.equal(by_name["gradcam"], by_module["gradcam"])
    assert not torch.allclose(by_name["gradcam"], auto["gradcam"])  # a different layer gives a different map


def test_a_wrong_layer_name_lists_real_names():
    model = torchvision_model("resnet18", num_classes=3)
    with pytest.raises(ModelError, match=r"no layer named 'layer5'.*layer4"):
        medlens.explain(model, torch.randn(1, 3, 32, 32), "gradcam", layer="layer5")
    with pytest.raises(ModelError, match="not a submodule"):
        medlens.explain(model, torch.randn(1, 3, 32, 32), "gradcam", layer=nn.Conv2d(3, 3, 1))
    with pytest.raises(MethodError, match="not a spatial feature map"):
        medlens.explain(model, torch.randn(1, 3, 32, 32), "gradcam", layer="fc")
    with pytest.raises(ModelError, match="layer must be"):
        medlens.explain(model, torch.randn(1, 3, 32, 32), "gradcam", layer=3)


def test_roles_match_subclasses():
    class MyConv(nn.Conv2d):
        pass

    class MyBN(nn.BatchNorm3d):
        pass

    assert is_conv(MyConv(1, 1, 1)) and is_conv(nn.Conv3d(1, 1, 1)) and not is_conv(nn.Linear(1, 1))
    assert is_batchnorm(MyBN(2)) and not is_batchnorm(nn.LayerNorm(2))
    assert is_linear(nn.Linear(1, 1)) and is_activation(nn.ReLU()) and is_activation(nn.GELU())
    assert is_global_pooling(nn.AdaptiveAvgPool3d(1)) and not is_global_pooling(nn.MaxPool2d(2))
