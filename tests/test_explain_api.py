"""The public `explain()` surface for the CAM family: registry metadata, result object, options, errors.

Shapes and dtypes are checked together with values (never blank, provenance that matches what ran).
"""
from __future__ import annotations

import pytest
import torch

import medlens
from medlens.errors import InputError, MethodError

from helpers import TinyCNN2d, make_tiny2d

CAM_NAMES = ["cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam",
             "scorecam", "ablationcam"]


@pytest.fixture
def model():
    return make_tiny2d(0, num_classes=3)


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


# ------------------------------------------------------------------ requests that used to escape as raw errors
class _ShiftsItsInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN2d()

    def forward(self, x):
        x.sub_(0.5)  # writes into the tensor it is given
        return self.net(x)


def test_the_callers_tensor_is_never_changed_nor_differentiated(model):
    x = torch.randn(1, 1, 24, 24, requires_grad=True)
    kept = x.detach().clone()
    for method in ("gradcam", "saliency", "lime", "kernelshap", "occlusion"):
        medlens.explain(model, x, method, targets=[0], seed=0, **({"num_samples": 30} if method in ("lime", "kernelshap") else {}))
    assert x.grad is None and torch.equal(x.detach(), kept)
    shifting = _ShiftsItsInput().eval()
    y = torch.randn(1, 1, 24, 24)
    y0 = y.clone()
    result = medlens.explain(shifting, y, "ablationcam", targets=[0])
    assert torch.equal(y, y0)
    import hashlib
    assert result.provenance["input"]["sha256"] == hashlib.sha256(y0.numpy().tobytes()).hexdigest()
    with pytest.raises(medlens.MedlensError, match="changes its input in place"):
        medlens.explain(shifting, y, "saliency", targets=[0])


@pytest.mark.parametrize("option", ["eigen_smooth", "aug_smooth", "aug_flip"])
def test_cam_flags_must_be_booleans(model, option):
    with pytest.raises(MethodError, match=f"option {option} must be True or False, got 'false'"):
        medlens.explain(model, torch.randn(1, 1, 24, 24), "gradcam", **{option: "false"})


@pytest.mark.parametrize("method,options,message", [
    ("integratedgradients", {"baseline": float("nan")}, "baseline must be a finite number"),
    ("occlusion", {"baseline": "blur", "blur_sigma": -1}, "blur_sigma must be above 0"),
    ("rise", {"baseline": "blur", "blur_sigma": "x", "n_masks": 8}, "blur_sigma must be a number"),
    ("smoothgrad", {"noise": float("inf")}, "noise must be a finite number"),
    ("smoothgrad", {"noise": None}, "noise must be a number"),
    ("lime", {"kernel_width": "x"}, "kernel_width must be a number"),
    ("lime", {"compactness": "x"}, "compactness must be a number"),
    ("kernelshap", {"compactness": 0}, "compactness must be above 0"),
])
def test_numeric_options_are_checked(model, method, options, message):
    with pytest.raises(MethodError, match=message):
        medlens.explain(model, torch.randn(1, 1, 24, 24), method, targets=[0], seed=0, **options)


@pytest.mark.parametrize("seed", [1.9, "3", True, [1]])
def test_seed_must_be_an_integer(model, seed):
    with pytest.raises(InputError, match="seed must be an integer"):
        medlens.explain(model, torch.randn(1, 1, 24, 24), "rise", seed=seed, n_masks=8)


def test_integer_like_seeds_are_recorded_as_ints(model):
    import json

    import numpy as np

    x = torch.randn(1, 1, 24, 24)
    a = medlens.explain(model, x, "rise", seed=np.int64(5), n_masks=8)
    b = medlens.explain(model, x, "rise", seed=torch.tensor(5), n_masks=8)
    assert a.provenance["seed"] == b.provenance["seed"] == 5 and torch.equal(a["rise"], b["rise"])
    json.dumps(b.provenance)


def test_model_and_input_mismatches_are_model_or_input_errors(model):
    with pytest.raises(medlens.MedlensError, match=r"The input is torch.float64 but the model's parameters are torch.float32"):
        medlens.explain(model, torch.randn(1, 1, 24, 24, dtype=torch.float64), "gradcam")

    class CastsItsInput(torch.nn.Module):  # converts its own input: a float64 tensor from numpy is fine
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x.float())

    medlens.explain(CastsItsInput().eval(), torch.randn(1, 1, 24, 24, dtype=torch.float64), "occlusion")
    with pytest.raises(medlens.MedlensError, match=r"forward pass failed on the input of shape \(1, 3, 24, 24\)"):
        medlens.explain(model, torch.randn(1, 3, 24, 24), "saliency")
    nan_model = TinyCNN2d().eval()
    with torch.no_grad():
        nan_model.fc.bias.fill_(float("nan"))
    with pytest.raises(medlens.MedlensError, match="non-finite logits"):
        medlens.explain(nan_model, torch.randn(1, 1, 24, 24), "occlusion")
    with pytest.raises(MethodError, match="no method was given"):
        medlens.explain(model, torch.randn(1, 1, 24, 24), None)


def test_a_token_layer_is_read_on_its_patch_grid_and_a_flat_layer_is_refused():
    class Tokens(torch.nn.Module):  # a (B, N, C) token layer, as in a vision transformer
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Conv2d(1, 8, 4, stride=4)
            self.mix = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            tokens = self.mix(self.embed(x).flatten(2).transpose(1, 2))
            return self.head(tokens.mean(1))

    result = medlens.explain(Tokens().eval(), torch.randn(1, 1, 32, 32), "gradcam", layer="mix")
    assert "64 patch tokens on a 8 x 8 grid" in result.provenance["layer"]["layout"]
    with pytest.raises(MethodError, match="not a spatial feature map"):
        medlens.explain(Tokens().eval(), torch.randn(1, 1, 32, 32), "gradcam", layer="head")


def test_result_keys_are_found_whatever_their_case(model):
    result = medlens.explain(model, torch.randn(1, 1, 24, 24), "GradCAM")
    assert torch.equal(result["GradCAM"], result["gradcam"])


def test_a_compiled_model_is_explained_through_its_original_module(model):
    compiled = torch.compile(model)  # not run here: wrapping is enough, and compiling would take a while
    x = torch.randn(1, 1, 24, 24)
    got = medlens.explain(compiled, x, ["gradcam", "scorecam"], targets=[0])
    want = medlens.explain(model, x, ["gradcam", "scorecam"], targets=[0])
    for name in ("gradcam", "scorecam"):
        assert torch.equal(got[name], want[name])
    assert any("torch.compile" in note for note in got.provenance["notes"])


@pytest.mark.parametrize("method,options", [("smoothgrad", {"n_samples": 4}), ("lime", {"num_samples": 40}),
                                            ("kernelshap", {"num_samples": 40}), ("rise", {"n_masks": 16})])
def test_a_seeded_random_map_does_not_depend_on_the_rest_of_the_batch(model, method, options):
    x = torch.randn(3, 1, 24, 24, generator=torch.Generator().manual_seed(7))
    batch = medlens.explain(model, x, method, targets=[0], seed=11, **options)[method]
    alone = medlens.explain(model, x[2:3], method, targets=[0], seed=11, **options)[method]
    torch.testing.assert_close(alone[0], batch[2], rtol=1e-5, atol=1e-6)


def test_a_torchscript_failure_is_told_by_its_cause():
    import warnings

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(10, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(Flat())
    with pytest.raises(medlens.MedlensError, match=r"cannot be multiplied") as info:
        medlens.explain(scripted, torch.zeros(1, 1, 8, 8), "saliency")
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_out_of_memory_is_said_as_such(model):
    class Greedy(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(medlens.MedlensError, match="out of memory running the model.*fewer images"):
        medlens.explain(Greedy(), torch.randn(1, 1, 8, 8), "occlusion")
