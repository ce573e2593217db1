"""The public `explain()` surface for the CAM family: registry metadata, result object, options, errors.

Shapes and dtypes are checked together with values (never blank, provenance that matches what ran).
"""
from __future__ import annotations

import pytest
import torch

import medlens
from medlens.errors import InputError, MethodError

from conftest import TinyCNN2d, _randomise_bn

CAM_NAMES = ["cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam",
             "scorecam", "ablationcam"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return _randomise_bn(TinyCNN2d(num_classes=3), 0)


def test_every_cam_is_registered_with_its_capabilities():
    names = medlens.methods()
    for name in CAM_NAMES:
        assert name in names
        info = medlens.method_info(name)
        assert info["family"] == "cam" and info["needs_layer"] and info["supports_3d"] and not info["stochastic"]
        assert {"eigen_smooth", "aug_smooth"} <= set(info["options"])
    assert medlens.method_info("gradcam")["needs_gradients"] and not medlens.method_info("scorecam")["needs_gradients"]
    assert not medlens.method_info("cam")["needs_gradients"]
    assert "batch_size" in medlens.method_info("scorecam")["options"]
    assert "batch_size" in medlens.method_info("ablationcam")["options"]


def test_result_is_a_read_only_mapping_of_raw_maps(model):
    x = torch.randn(2, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    result = medlens.explain(model, x, CAM_NAMES, targets=[0, 1])
    assert list(result) == CAM_NAMES and len(result) == len(CAM_NAMES)
    for name in CAM_NAMES:
        m = result[name]
        assert m.shape == (2, 2, 20, 20) and m.dtype == torch.float32 and m.device == x.device
        assert torch.isfinite(m).all() and m.abs().sum() > 0
    # Raw and signed: Grad-CAM keeps negative values and is not min-max normalised.
    assert result["gradcam"].min() < 0 or result["gradcam"].max() > 1
    with pytest.raises(AttributeError):
        result.foo = 1
    with pytest.raises(TypeError):
        result["gradcam"] = None  # type: ignore[index]
    with pytest.raises(KeyError, match="was not computed"):
        result["lime"]
    torch.testing.assert_close(result.logits, model(x))
    assert result.targets.tolist() == [[0, 1], [0, 1]]
    prov = result.provenance
    assert prov["layer"]["name"] == "features" and prov["targets"] == [[0, 1], [0, 1]]
    assert set(prov["methods"]) == set(CAM_NAMES)
    assert prov["methods"]["scorecam"]["options"]["batch_size"] == medlens.method_info("scorecam")["options"]["batch_size"]


def test_methods_as_a_comma_string_and_options(model):
    x = torch.randn(1, 1, 20, 20)
    result = medlens.explain(model, x, "gradcam, layercam", targets=1, eigen_smooth=True)
    assert list(result) == ["gradcam", "layercam"]
    assert result.provenance["methods"]["gradcam"]["options"]["eigen_smooth"] is True
    small = medlens.explain(model, x, "scorecam", targets=1, batch_size=3)
    big = medlens.explain(model, x, "scorecam", targets=1, batch_size=64)
    torch.testing.assert_close(small["scorecam"], big["scorecam"])  # the chunk size changes memory, not values
    small = medlens.explain(model, x, "ablationcam", targets=1, batch_size=5)
    big = medlens.explain(model, x, "ablationcam", targets=1)
    torch.testing.assert_close(small["ablationcam"], big["ablationcam"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"methods": "gradkam"}, MethodError, "unknown method 'gradkam'"),
        ({"methods": []}, MethodError, "no method"),
        ({"methods": "gradcam", "n_steps": 5}, MethodError, "not used by any requested method"),
        ({"methods": "scorecam", "batch_size": 0}, MethodError, "batch_size must be a positive integer"),
        ({"methods": "ablationcam", "batch_size": 2.5}, MethodError, "batch_size must be a positive integer"),
    ],
)
def test_bad_requests_raise_clear_errors(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        medlens.explain(model, torch.randn(1, 1, 16, 16), **kwargs)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(1, 16, 16), "expected"),
        (torch.zeros(1, 1, 16, 16, dtype=torch.int64), "floating-point"),
        (torch.full((1, 1, 16, 16), float("nan")), "NaN"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_input_error(model, x, message):
    with pytest.raises(InputError, match=message):
        medlens.explain(model, x, "gradcam")


def test_shared_pass_one_forward_for_all_gradient_cams(model):
    calls = {"n": 0}

    def count(_m, _i):
        calls["n"] += 1

    x = torch.randn(2, 1, 16, 16)
    medlens.explain(model, x, "gradcam")  # warms the automatic-layer cache for this input shape
    handle = model.register_forward_pre_hook(count)
    try:
        medlens.explain(model, x, ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam",
                                   "eigencam", "cam"], targets=[0, 1, 2])
    finally:
        handle.remove()
    assert calls["n"] == 1
