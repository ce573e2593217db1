"""The gradient family: saliency, input x gradient, guided backprop, guided Grad-CAM, integrated gradients, SmoothGrad.

All targets of a batch come from one forward and one batched backward (`target_gradients`); the plain
input gradients are cached in `ctx.cache` so several methods of one call share them.

Conventions (documented for users in `medlens methods`):
- every map is the signed attribution summed over input channels, shape (B, T, *spatial): for a one-channel
  image it is the attribution itself; for RGB it is the per-pixel sum of the three channel attributions
  (signed, so completeness still holds: the map sums to what the channels sum to);
- `saliency` is the signed gradient (not its absolute value; take `abs()` when rendering if you want it);
- guided backprop takes the guided ReLU backward (positive gradient through positive inputs) on its own graph
  only: `guided_relus()` puts a pre-hook on every ReLU node of the graph (`nn.ReLU`, functional `F.relu` /
  `torch.relu` / `Tensor.relu` as in torchvision's DenseNet, in place or not, in threads the model starts), so
  nothing process-wide changes and calls in other threads are unaffected.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medlens.core.context import ExplainContext, call_model
from medlens.errors import MethodError
from medlens.core.options import finite_float, finite_number, positive_int
from medlens.core.registry import MethodSpec, register
from medlens.core.spatial import spatial_dims, upsample_to

# ------------------------------------------------------------------------------------------ shared pass


def target_gradients(picked: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d picked[:, t] / d input for every slot t of picked (B, T): one (T, *input.shape) per input.

    Inputs the outputs do not depend on get zeros. One batched backward when the graph supports it (vmap over the grad outputs), else one backward
    per slot with the graph retained. Images of the batch are independent (eval mode), so the gradient of
    the batch sum of slot t gives each image's own gradient.
    """
    n_slots = picked.shape[1]
    if n_slots == 1:
        grads = torch.autograd.grad(picked[:, 0].sum(), list(inputs), allow_unused=True, materialize_grads=True)
        return [g.unsqueeze(0) for g in grads]
    eye = torch.eye(n_slots, dtype=picked.dtype, device=picked.device)
    grad_outputs = eye[:, None, :].expand(n_slots, picked.shape[0], n_slots)
    try:
        grads = torch.autograd.grad(picked, list(inputs), grad_outputs=grad_outputs, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
        # an input the outputs do not depend on gets None: zeros with the slot axis
        return [g if g is not None else inp.new_zeros((n_slots,) + tuple(inp.shape)) for g, inp in zip(grads, inputs)]
    except (RuntimeError, NotImplementedError):
        per_slot = [torch.autograd.grad(picked[:, t].sum(), list(inputs), retain_graph=t < n_slots - 1,
                                        allow_unused=True, materialize_grads=True)
                    for t in range(n_slots)]
        return [torch.stack([g[i] for g in per_slot]) for i in range(len(inputs))]


def input_gradients(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, *, guided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradients (T, B, C, *s), logits (B, K)) of every target logit with respect to the input x.

    `guided`: through the graph's ReLUs the guided way (`guided_relus`), for guided backprop."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = call_model(model, leaf)
        picked = logits.gather(1, targets)
        with guided_relus(picked) if guided else contextlib.nullcontext():
            (grads,) = target_gradients(picked, [leaf])
    return grads.detach(), logits.detach()


def _slots_first_to_maps(values: torch.Tensor) -> torch.Tensor:
    """(T, B, C, *s) attributions -> (B, T, *s) channel-summed maps."""
    return values.sum(dim=2).transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------- guided ReLU
def _guided_grad_outputs(grad_outputs: tuple[Optional[torch.Tensor], ...]) -> tuple[Optional[torch.Tensor], ...]:
    # Only positive gradients enter a ReLU's backward, which then passes them where its output is positive.
    return tuple(None if g is None else g.clamp(min=0) for g in grad_outputs)


@contextlib.contextmanager
def guided_relus(output: torch.Tensor) -> Iterator[int]:
    """Backward passes from `output` inside the block go through every ReLU of its graph the guided way.

    Guided backprop (Springenberg et al.): a ReLU passes back only positive gradients, where its output is
    positive. Each ReLU of the graph that produced `output` (module, `F.relu`, `torch.relu`, `Tensor.relu`,
    in place or not, in any thread the model ran it) is one `ReluBackward0` node; a pre-hook on that node clamps
    the gradient arriving at it. Nothing outside this one graph changes, so other calls, other threads and
    other models are untouched. Yields how many ReLU nodes were found; the hooks are removed on exit.
    """
    handles = []
    seen: set[Any] = set()
    stack = [output.grad_fn]
    try:
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node.name() == "ReluBackward0":
                handles.append(node.register_prehook(_guided_grad_outputs))
            stack.extend(next_node for next_node, _ in node.next_functions)
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------ per-batch methods
# Each takes (model, x (N, C, *s), targets (N, T), options) and returns raw attributions (T, N, C, *s).
def _saliency(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    return input_gradients(model, x, targets)[0]


def _inputxgradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    return input_gradients(model, x, targets)[0] * x.detach()[None]


def _guidedbackprop(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    if isinstance(model, torch.jit.ScriptModule):  # its ReLUs run inside TorchScript's own graph: no ReLU node to hook
        raise MethodError("guided backpropagation cannot run on a TorchScript model: its ReLUs run inside TorchScript, "
                          "where medlens cannot swap their backward (the result would silently be the plain gradient). "
                          "Load the model as a Python module, or use saliency / integratedgradients.")
    return input_gradients(model, x, targets, guided=True)[0]


def gauss_legendre(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1] (Golub-Welsch: eigen-decomposition of the Jacobi matrix)."""
    if n == 1:
        return torch.tensor([0.5], dtype=dtype), torch.tensor([1.0], dtype=dtype)
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k * k - 1)
    jacobi = torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    weights = 2 * vectors[0] ** 2
    return ((nodes + 1) / 2).to(dtype), (weights / 2).to(dtype)


def blurred(x: torch.Tensor, sigma: Optional[float] = None) -> torch.Tensor:
    """A strongly Gaussian-blurred copy of x (separable, reflect padding), 2-D and 3-D alike.

    sigma defaults to a tenth of the smallest spatial side (at least 1 voxel): fine structure is gone,
    the coarse intensity layout stays, which is what a "blurred baseline" is meant to keep.
    """
    dims = x.dim() - 2
    if sigma is None:
        sigma = max(1.0, min(x.shape[2:]) / 10.0)
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = x
    channels = x.shape[1]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    for axis in range(dims):
        size = out.shape[2 + axis]
        r = min(radius, size - 1)
        k = kernel[radius - r: radius + r + 1]
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = r
        pad[2 * (dims - 1 - axis) + 1] = r
        padded = F.pad(out, pad, mode="reflect") if r > 0 else out
        out = conv(padded, k.reshape(shape).expand(channels, *shape[1:]).contiguous(), groups=channels)
    return out


def make_baseline(x: torch.Tensor, baseline: Any) -> torch.Tensor:
    """The integrated-gradients baseline for x: "zero", "blur", a float, or a tensor broadcastable to x."""
    if isinstance(baseline, str):
        key = baseline.strip().lower()
        if key == "zero":
            return torch.zeros_like(x)
        if key == "blur":
            return blurred(x)
        raise MethodError(f"unknown baseline {baseline!r}; use 'zero', 'blur', a number, or a tensor shaped like the input.")
    if isinstance(baseline, bool):
        raise MethodError("baseline must be 'zero', 'blur', a number, or a tensor, not a boolean.")
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, finite_number(baseline, "baseline"))
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape).clone()
        except RuntimeError:
            raise MethodError(
                f"the baseline tensor has shape {tuple(baseline.shape)}, which does not broadcast to the input "
                f"{tuple(x.shape)}; give one shaped like the input (or like one image)."
            ) from None
    raise MethodError(f"baseline must be 'zero', 'blur', a number, or a tensor, not {type(baseline).__name__}.")


_STOCK_AFFINE_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward)


def _affine_forward64(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """A stock convolution or dense layer applied in float64 (float64 copies of its weight and bias)."""
    weight = module.weight.detach().double()
    bias = None if module.bias is None else module.bias.detach().double()
    if isinstance(module, nn.Linear):
        return F.linear(inp, weight, bias)
    return module._conv_forward(inp, weight, bias)


class _AffineInputLayers:
    """The input-layer shortcut of integrated gradients, exact for any model.

    Along the straight path p_k = b + a_k (x - b), a stock convolution or dense layer that reads the model input
    is affine in it, so y(p_k) = y(b) + a_k (y(x) - y(b)): it runs once on [b; x] instead of once per path
    point, and the gradients at its output, summed with the quadrature weights, go back through it once (its
    Jacobian is constant). Only a call whose argument *is* the batch of path points is intercepted; every other
    use of the input keeps the ordinary autograd path (its gradient is added), so nothing depends on the
    model's layout. On ResNet18's 7x7 stem this saves about 6% of the multiply-adds.
    """

    def __init__(self, model: nn.Module, baseline: torch.Tensor, x: torch.Tensor) -> None:
        self.baseline, self.x = baseline, x
        self.ends: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (y(b), y(x) - y(b))
        self.calls: list[tuple[nn.Module, torch.Tensor]] = []  # (layer, gradient anchor) of the current chunk
        self.weighted: dict[nn.Module, torch.Tensor] = {}  # layer -> quadrature-weighted output gradients (T, N, *out)
        self.points: Optional[torch.Tensor] = None
        self.alpha_rows = self.image_rows = None
        self.overrides = {} if isinstance(model, torch.jit.ScriptModule) else {  # TorchScript: calls only
            m: self._forward_for(m) for m in model.modules()
            if type(m).forward in _STOCK_AFFINE_FORWARDS and "forward" not in m.__dict__
        }

    def _forward_for(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        original = type(module).forward.__get__(module)

        def forward(inp: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if inp is not self.points or args or kwargs:
                return original(inp, *args, **kwargs)
            if module not in self.ends:
                with torch.no_grad():  # the two ends in float64, rounded once: more exact than the layer per point
                    ends = _affine_forward64(module, torch.cat([self.baseline, self.x]).double())
                n = self.x.shape[0]
                self.ends[module] = (ends[:n].to(self.x.dtype), (ends[n:] - ends[:n]).to(self.x.dtype))
            y_b, dy = self.ends[module]
            alpha = self.alpha_rows.view(-1, *([1] * (dy.dim() - 1)))
            out = y_b[self.image_rows] + alpha * dy[self.image_rows]
            anchor = out.requires_grad_(True)  # a fresh leaf: its gradient is the gradient at the layer's output
            self.calls.append((module, anchor))
            return anchor

        return forward

    def begin_chunk(self, points: torch.Tensor, alpha_rows: torch.Tensor, image_rows: torch.Tensor) -> None:
        self.points, self.alpha_rows, self.image_rows = points, alpha_rows, image_rows
        self.calls = []

    def accumulate(self, grads: Sequence[torch.Tensor], rows: int, k: int, w: torch.Tensor) -> None:
        """Add this chunk's anchor gradients (T, rows(+n), *out), weighted over its k path points."""
        n = self.x.shape[0]
        for (module, _), g in zip(self.calls, grads):
            g = g[:, :rows].reshape(g.shape[0], k, n, *g.shape[2:])
            part = (g * w.view(1, -1, *([1] * (g.dim() - 2)))).sum(dim=1)
            self.weighted[module] = part if module not in self.weighted else self.weighted[module] + part

    def input_gradients(self, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
        """Sum over intercepted layers of their transposed Jacobian applied to the weighted gradients: (T, N, *x)."""
        total = None
        for module, g in self.weighted.items():
            t, n = g.shape[:2]
            with torch.enable_grad():
                probe = torch.zeros((t * n,) + tuple(shape[1:]), dtype=torch.float64, device=self.x.device, requires_grad=True)
                out = _affine_forward64(module, probe)
                (back,) = torch.autograd.grad(out, probe, grad_outputs=g.reshape(t * n, *g.shape[2:]).double())
            back = back.reshape(t, n, *shape[1:]).to(self.x.dtype)
            total = back if total is None else total + back
        return total


def integrated_gradients(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any],
    baseline: Optional[torch.Tensor] = None, baseline_logits: Optional[list] = None,
    notes: Optional[dict] = None,
) -> torch.Tensor:
    """(x - baseline) * integral of the gradient along the straight path, Gauss-Legendre in n_steps points.

    The path points of all images go through the model in chunks of at most `batch_size` inputs; every
    chunk is one forward and one batched backward for all targets. Returns (T, N, C, *s). When
    `baseline_logits` is a list, the baseline images ride along in the first chunk's forward (no extra
    model call) and their logits (N, K) are appended to it, for the completeness check. A layer that reads
    the input directly runs once, not once per path point (`_AffineInputLayers`); `notes` gets its name.
    """
    from medlens.families.lrp.canonizers import override_forward

    n_steps = positive_int(options, "n_steps")
    batch_size = positive_int(options, "batch_size")
    if baseline is None:
        baseline = make_baseline(x, options.get("baseline", "zero"))
    x = x.detach()
    n = x.shape[0]
    alphas, weights = gauss_legendre(n_steps)
    alphas = alphas.to(device=x.device, dtype=x.dtype)
    weights = weights.to(device=x.device, dtype=x.dtype)
    baseline = baseline.detach().to(dtype=x.dtype).expand_as(x)
    delta = x - baseline
    steps_per_chunk = max(1, batch_size // n)
    total = torch.zeros((targets.shape[1],) + tuple(x.shape), dtype=x.dtype, device=x.device)
    view = (-1,) + (1,) * x.dim()
    shortcut = _AffineInputLayers(model, baseline, x)
    images = torch.arange(n, device=x.device)
    with override_forward(shortcut.overrides):
        for start in range(0, n_steps, steps_per_chunk):
            a = alphas[start:start + steps_per_chunk]
            w = weights[start:start + steps_per_chunk]
            k = a.numel()
            points = (baseline[None] + a.view(view) * delta[None]).reshape(k * n, *x.shape[1:])
            alpha_rows, image_rows = a.repeat_interleave(n), images.repeat(k)
            extra = baseline_logits is not None and start == 0
            if extra:
                points = torch.cat([points, baseline])
                alpha_rows, image_rows = torch.cat([alpha_rows, alpha_rows.new_zeros(n)]), torch.cat([image_rows, images])
            with torch.enable_grad():
                leaf = points.requires_grad_(True)
                shortcut.begin_chunk(leaf, alpha_rows, image_rows)
                logits = call_model(model, leaf)
                picked = logits[: k * n].gather(1, targets.repeat(k, 1))
                grads, *anchor_grads = target_gradients(picked, [leaf] + [anchor for _, anchor in shortcut.calls])
            if extra:
                baseline_logits.append(logits[k * n:].detach())
            shortcut.accumulate(anchor_grads, k * n, k, w)
            grads = grads[:, : k * n].reshape(grads.shape[0], k, n, *x.shape[1:])
            total += (grads * w.view(1, -1, *([1] * x.dim()))).sum(dim=1)
        shortcut.begin_chunk(None, None, None)
    through_layers = shortcut.input_gradients(tuple(x.shape))
    if through_layers is not None:
        total += through_layers
    if notes is not None and shortcut.weighted:
        names = {m: name for name, m in model.named_modules()}
        notes["input_layers_run_once"] = [names.get(m, type(m).__name__) for m in shortcut.weighted]
    return total * delta[None]


def _integratedgradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    return integrated_gradients(model, x, targets, options)


# ---------------------------------------------------------------------------------------------- runners
def _cached_plain_gradients(ctx: ExplainContext) -> torch.Tensor:
    key = ("gradients", "input")
    if key not in ctx.cache:
        ctx.cache[key] = input_gradients(ctx.model, ctx.x, ctx.targets)[0]
    return ctx.cache[key]


def _run_saliency(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    return _slots_first_to_maps(_cached_plain_gradients(ctx))


def _run_inputxgradient(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    return _slots_first_to_maps(_cached_plain_gradients(ctx) * ctx.x.detach()[None])


def _cached_guided(ctx: ExplainContext) -> torch.Tensor:
    key = ("gradients", "guided")
    if key not in ctx.cache:
        ctx.cache[key] = _guidedbackprop(ctx.model, ctx.x, ctx.targets, {})
    return ctx.cache[key]


def _run_guidedbackprop(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    return _slots_first_to_maps(_cached_guided(ctx))


def gradcam_maps(ctx: ExplainContext) -> torch.Tensor:
    """Grad-CAM at ctx.layer from the shared layer pass, ReLU'd and upsampled: (B, T, *input spatial)."""
    lp = ctx.layer_pass()
    grads = lp.gradients(ctx.targets)  # (T, B, C, *s)
    activation = lp.activation.detach()[None]
    weights = grads.mean(dim=spatial_dims(grads, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=2)).transpose(0, 1)  # (B, T, *s)
    return upsample_to(cam, ctx.spatial_shape)


def _run_guidedgradcam(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    ctx.method_notes["layer"] = ctx.layer.name
    ctx.method_notes["upsampling"] = "bilinear/trilinear Grad-CAM (ReLU'd) times the channel-summed guided backprop"
    return _slots_first_to_maps(_cached_guided(ctx)) * gradcam_maps(ctx)


def _run_integratedgradients(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    x = ctx.x.detach()
    baseline = make_baseline(x, options["baseline"])
    collected: list[torch.Tensor] = []
    attributions = integrated_gradients(ctx.model, x, ctx.targets, options, baseline=baseline, baseline_logits=collected,
                                        notes=ctx.method_notes)
    base_logits = collected[0]
    output_gap = ctx.logits.gather(1, ctx.targets) - base_logits.gather(1, ctx.targets)  # (B, T)
    attribution_sum = attributions.flatten(2).sum(dim=2).transpose(0, 1)  # (B, T)
    relative = (attribution_sum - output_gap).abs() / output_gap.abs().clamp_min(1e-12)
    ctx.method_notes["quadrature"] = f"Gauss-Legendre, {options['n_steps']} points"
    ctx.method_notes["completeness"] = {
        "attribution_sum": attribution_sum.tolist(),
        "output_gap": output_gap.tolist(),
        "relative_gap": relative.tolist(),
    }
    return _slots_first_to_maps(attributions)


def _lrp(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    from medlens.families.lrp import lrp_relevance  # imported here: the LRP package builds on this module

    return lrp_relevance(model, x, targets, "epsilon_plus_flat").relevance


# The methods SmoothGrad can wrap: name -> per-batch function returning (T, N, C, *s).
SMOOTHABLE: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": _saliency,
    "inputxgradient": _inputxgradient,
    "guidedbackprop": _guidedbackprop,
    "integratedgradients": _integratedgradients,
    "lrp": _lrp,  # with its default composite, epsilon_plus_flat
}
_BASE_DEFAULTS = {"integratedgradients": {"n_steps": 50, "baseline": "zero"}}


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
    base_options = {**_BASE_DEFAULTS.get(base, {}), "batch_size": batch_size}
    fn = SMOOTHABLE[base]
    chunk = max(b, (batch_size // b) * b) if base != "integratedgradients" else b
    total = None
    for start in range(0, noisy.shape[0], chunk):
        part = fn(ctx.model, noisy[start:start + chunk], targets[start:start + chunk], base_options)
        part = part.reshape(part.shape[0], -1, b, *x.shape[1:]).sum(dim=1)  # (T, B, C, *s)
        total = part if total is None else total + part
    ctx.method_notes["noise_sigma"] = sigma.tolist()
    ctx.method_notes["base"] = base
    return _slots_first_to_maps(total / n_samples)


# --------------------------------------------------------------------------------------------- registry
_CHANNELS = " Multi-channel inputs: signed sum over channels."
register(MethodSpec(
    name="saliency", family="gradient",
    summary="Saliency: the signed gradient of the target logit with respect to the input (Simonyan et al. 2014)." + _CHANNELS,
    run=_run_saliency, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
))
register(MethodSpec(
    name="inputxgradient", family="gradient",
    summary="Input x gradient (Shrikumar et al. 2016); equals LRP-0 on ReLU networks." + _CHANNELS,
    run=_run_inputxgradient, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
))
register(MethodSpec(
    name="guidedbackprop", family="gradient",
    summary="Guided backpropagation: only positive gradients pass through positive ReLUs, module or functional "
            "(Springenberg et al. 2015)." + _CHANNELS,
    run=_run_guidedbackprop, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
    torchscript=False,
))
register(MethodSpec(
    name="guidedgradcam", family="gradient",
    summary="Guided Grad-CAM: guided backprop times the upsampled Grad-CAM of the target layer (Selvaraju et al. 2017).",
    run=_run_guidedgradcam, needs_gradients=True, needs_layer=True, cost="two forwards + two backwards",
))
register(MethodSpec(
    name="integratedgradients", family="gradient",
    summary="Integrated gradients along the straight path from a baseline (Sundararajan et al. 2017); the "
            "completeness gap is recorded in provenance." + _CHANNELS,
    run=_run_integratedgradients, needs_gradients=True, needs_layer=False, cost="n_steps forwards + backwards, batched",
    options={"n_steps": 50, "baseline": "zero", "batch_size": 16},
    completeness="baseline",
))
register(MethodSpec(
    name="smoothgrad", family="gradient",
    summary="SmoothGrad: a gradient method averaged over noisy copies of the input; noise is a fraction of the "
            "input's range (Smilkov et al. 2017)." + _CHANNELS,
    run=_run_smoothgrad, needs_gradients=True, needs_layer=False, stochastic=True,
    cost="n_samples forwards + backwards, batched",
    options={"n_samples": 25, "noise": 0.15, "base": "saliency", "batch_size": 16},
))
