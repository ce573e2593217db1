"""SmoothGrad: a gradient method (saliency, input x gradient, guided backprop, integrated gradients or LRP)
averaged over noisy copies of the input, the noise a fraction of each image's range, seeded per image.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from medlens.tensor.autograd import CHANNELS_NOTE, slots_first_to_maps
from medlens.core.context import ExplainContext
from medlens.core.options import finite_float, positive_int
from medlens.core.registry import MethodSpec, register
from medlens.errors import MethodError
from medlens.families.gradients import input_x_gradient, saliency
from medlens.families.guided import guided_backprop
from medlens.families.lrp import DEFAULT_COMPOSITE, lrp_relevance


def _lrp(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    return lrp_relevance(model, x, targets, DEFAULT_COMPOSITE).relevance


# The methods SmoothGrad can wrap: name -> per-batch function returning (T, N, C, *s); integrated gradients adds
# itself (families/integrated.py), with its defaults in BASE_DEFAULTS.
SMOOTHABLE: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": saliency,
    "inputxgradient": input_x_gradient,
    "guidedbackprop": guided_backprop,
    "lrp": _lrp,  # with lrp's default composite (DEFAULT_COMPOSITE)
}
BASE_DEFAULTS: dict[str, dict[str, Any]] = {}


def _run_smoothgrad(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    base = str(options["base"]).strip().lower()
    if base not in SMOOTHABLE:
        raise MethodError(f"smoothgrad cannot wrap {options['base']!r}; base must be one of {', '.join(SMOOTHABLE)}.")
    n_samples = positive_int(options, "n_samples")
    batch_size = positive_int(options, "batch_size")
    noise = finite_float(options, "noise", minimum=0.0)  # a fraction of the input's range
    x = ctx.x.detach()
    b = x.shape[0]
    flat = x.reshape(b, -1)
    sigma = noise * (flat.amax(dim=1) - flat.amin(dim=1))  # per image
    # Each image's noise comes from its own generator, seeded alike: an image's map does not depend on the others
    # in the batch, nor on its place there.
    eps = torch.stack([torch.randn((n_samples,) + tuple(x.shape[1:]), generator=ctx.generator("smoothgrad"),
                                   device=x.device, dtype=x.dtype) for _ in range(b)], dim=1)
    noisy = (x[None] + eps * sigma.view(1, b, *([1] * (x.dim() - 1)))).reshape(n_samples * b, *x.shape[1:])
    targets = ctx.targets.repeat(n_samples, 1)
    base_options = {**BASE_DEFAULTS.get(base, {}), "batch_size": batch_size}
    fn = SMOOTHABLE[base]
    chunk = max(b, (batch_size // b) * b) if base != "integratedgradients" else b
    total = None
    for start in range(0, noisy.shape[0], chunk):
        part = fn(ctx.model, noisy[start:start + chunk], targets[start:start + chunk], base_options)
        part = part.reshape(part.shape[0], -1, b, *x.shape[1:]).sum(dim=1)  # (T, B, C, *s)
        total = part if total is None else total + part
    ctx.method_notes["noise_sigma"] = sigma.tolist()
    ctx.method_notes["base"] = base
    return slots_first_to_maps(total / n_samples)


register(MethodSpec(
    name="smoothgrad", family="gradient",
    summary="SmoothGrad: a gradient method averaged over noisy copies of the input; noise is a fraction of the "
            "input's range (Smilkov et al. 2017)." + CHANNELS_NOTE,
    run=_run_smoothgrad, needs_gradients=True, needs_layer=False, stochastic=True,
    cost="n_samples forwards + backwards, batched",
    display="magnitude",  # Smilkov et al. draw the absolute value of the averaged map
    options={"n_samples": 25, "noise": 0.15, "base": "saliency", "batch_size": 16},
))
