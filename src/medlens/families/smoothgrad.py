"""SmoothGrad: any method with a per-batch form in the registry (saliency, input x gradient, guided backprop,
integrated gradients, LRP) averaged over noisy copies of the input, the noise a fraction of each image's range.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from medlens.tensor.autograd import CHANNELS_NOTE, slots_first_to_maps
from medlens.core.context import ExplainContext
from medlens.core.options import finite_float, positive_int
from medlens.core.registry import MethodSpec, all_specs, register
from medlens.errors import MethodError


def wrappable() -> dict[str, MethodSpec]:
    """The methods SmoothGrad can wrap: every registered method that declares a per-batch form."""
    return {name: spec for name, spec in all_specs().items() if spec.per_batch is not None}


def _run_smoothgrad(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    base = str(options["base"]).strip().lower()
    bases = wrappable()
    if base not in bases:
        raise MethodError(f"smoothgrad cannot wrap {options['base']!r}; base must be one of {', '.join(bases)}.")
    per_batch = bases[base].per_batch
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
    base_options = {**bases[base].options, "batch_size": batch_size}  # the base method's own defaults
    chunk = b if per_batch.chunks_itself else max(b, (batch_size // b) * b)
    total = None
    for start in range(0, noisy.shape[0], chunk):
        part = per_batch.fn(ctx.model, noisy[start:start + chunk], targets[start:start + chunk], base_options)
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
