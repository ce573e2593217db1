"""explain() gives the same maps whatever grad mode the caller is in, for any floating dtype.

Users often wrap model code in `torch.no_grad()` or `torch.inference_mode()`, or hand over a tensor made
inside inference mode; none of that may stop a gradient method or change a map.
"""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch

import medlens

FAST_OPTIONS = {
    "integratedgradients": {"n_steps": 4},
    "smoothgrad": {"n_samples": 3},
    "rise": {"n_masks": 40},
    "lime": {"num_samples": 40, "n_segments": 8},
    "kernelshap": {"num_samples": 40, "n_segments": 8},
}


def _explain(model, x, method):
    return medlens.explain(model, x, method, targets=[1], seed=3, **FAST_OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", [m for m in medlens.methods() if not medlens.method_info(m)["needs_attention"]])
def test_maps_do_not_depend_on_the_callers_grad_mode(tiny2d, method):
    x = torch.randn(2, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    reference = _explain(tiny2d, x, method)[method]
    with torch.no_grad():
        under_no_grad = _explain(tiny2d, x, method)[method]
        assert not torch.is_grad_enabled()  # the caller's mode is back after the call
    with torch.inference_mode():
        inference_result = _explain(tiny2d, x, method)
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        x_inference = x.clone()
    assert x_inference.is_inference()
    from_inference_tensor = _explain(tiny2d, x_inference, method)[method]
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    for got in (under_no_grad, inference_result[method], from_inference_tensor):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    assert not inference_result[method].is_inference()  # usable outside inference mode afterwards
    assert not any(p.requires_grad is False for p in tiny2d.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["gradcam", "scorecam", "integratedgradients", "lrp", "occlusion"])
def test_half_and_double_precision_models_are_explained(tiny2d, dtype, method):
    x32 = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(2))
    reference = _explain(tiny2d, x32, method)[method]
    model = copy.deepcopy(tiny2d).to(dtype)
    x = x32.to(dtype)
    result = _explain(model, x, method)
    got = result[method]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    if dtype == torch.float64:  # the same map as in float32, to float32 rounding
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    else:  # half precision: the same map up to its rounding (correlation over pixels)
        assert torch.corrcoef(torch.stack([got.flatten(), reference.flatten()]))[0, 1] > 0.99
    raw = x.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert result.provenance["input"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert result.provenance["input"]["dtype"] == str(dtype)


def test_float32_input_digest_is_the_sha256_of_its_bytes(tiny2d):
    x = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(4))
    result = medlens.explain(tiny2d, x, "gradcam")
    assert result.provenance["input"]["sha256"] == hashlib.sha256(x.numpy().tobytes()).hexdigest()
