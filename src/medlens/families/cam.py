"""The CAM family: class activation maps from one target layer, all sharing one forward and one backward.

Gradient CAMs differ only in how they weigh the captured activation with its gradients (`cam_arithmetic`);
`cam` reads the linear head, EigenCAM needs no target, Score-CAM and Ablation-CAM run batched passes.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from medlens.tensor.autograd import call_model, logits_of
from medlens.core.batching import chunks
from medlens.core.context import ExplainContext
from medlens.core.explained_output import OutputScores, output_scores
from medlens.errors import MethodError
from medlens.core.options import flag, positive_int
from medlens.core.registry import MethodSpec, register
from medlens.tensor.spatial import channels_last, spatial_dims, upsample_to
from medlens.accel.masked_stem import build_masked_stem
from medlens.families.cam_arithmetic import (
    EPS, CamTerms, GradientTerms, Weigher, gradcam, gradcam_plus_plus, hirescam, layercam, xgradcam,
)

CAM_OPTIONS = {"eigen_smooth": False, "aug_smooth": False, "aug_flip": False}


# ---------------------------------------------------------------------------------------- augmentation
def _augmentations(flip: bool, n_spatial: int) -> list[tuple[str, Callable, Callable]]:
    """(name, transform input, map back to the original grid). Small scale and intensity changes only;
    mirror flips only on request, since laterality matters in radiology."""

    def scale(f: float):
        def forward(x: torch.Tensor) -> torch.Tensor:
            size = [max(8, round(s * f)) for s in x.shape[2:]]
            return upsample_to(x, size)
        return forward

    def intensity(f: float):
        return lambda x: x * f

    identity_back = None  # maps are resized to the original grid by the caller
    augs = [
        ("identity", lambda x: x, identity_back),
        ("scale_1.1", scale(1.1), identity_back),
        ("scale_0.9", scale(0.9), identity_back),
        ("intensity_1.1", intensity(1.1), identity_back),
        ("intensity_0.9", intensity(0.9), identity_back),
    ]
    if flip:
        augs.append(("flip", lambda x: torch.flip(x, dims=(x.dim() - 1,)), lambda m: torch.flip(m, dims=(m.dim() - 1,))))
    return augs


def _cam_runner(terms_of: Callable[[ExplainContext, Mapping[str, Any]], CamTerms], *, always_eigen: bool = False):
    """A registry runner from a function giving a CAM's terms (channel weights or a weighted activation).

    The channel sum (or, with eigen smoothing, the first principal component) is the map; `aug_smooth`
    averages maps over small input changes; the result is upsampled to the input grid in torch.
    """

    def map_of(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
        terms = terms_of(ctx, options)
        with torch.no_grad():
            maps = terms.maps(always_eigen or flag(options, "eigen_smooth"), ctx.targets.shape[1])
        return upsample_to(maps, ctx.spatial_shape)

    def run(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
        for name in CAM_OPTIONS:  # checked before any pass, also the ones this request does not use
            flag(options, name)
        if not flag(options, "aug_smooth"):
            return map_of(ctx, options)
        augs = _augmentations(flag(options, "aug_flip"), len(ctx.spatial_shape))
        total, used, refused = None, [], ""
        for name, forward, back in augs:
            if name == "identity":
                child = ctx
            else:
                key = ("aug", name)
                if key not in ctx.cache:
                    ctx.cache[key] = ctx.derive(forward(ctx.x))
                child = ctx.cache[key]
            try:
                m = upsample_to(map_of(child, options), ctx.spatial_shape)
            except (RuntimeError, ValueError, AssertionError) as error:
                if not name.startswith("scale"):
                    raise
                # A model built for one input size (a ViT's fixed position embeddings) refuses rescaled copies.
                refused = f"{type(error).__name__}: {str(error)[:120]}"
                continue
            if back is not None:
                m = back(m)
            total = m if total is None else total + m
            used.append(name)
        ctx.method_notes["aug_smooth"] = used
        if refused:
            ctx.method_notes["aug_smooth_scales_left_out"] = f"the model takes only its own input size ({refused})"
        return total / len(used)

    return run


def _gradient_terms(ctx: ExplainContext) -> GradientTerms:
    """The activation and target gradients at the layer, shared by every gradient CAM of the call."""
    if "gradient_terms" not in ctx.cache:
        lp = ctx.layer_pass()
        grads = lp.gradients(ctx.targets).transpose(0, 1)  # (B, T, C, *s)
        ctx.cache["gradient_terms"] = GradientTerms(lp.activation.detach(), grads)
    return ctx.cache["gradient_terms"]


def _gradient_cam(weigh: Weigher):
    def terms_of(ctx: ExplainContext, options: Mapping[str, Any]) -> CamTerms:
        terms = _gradient_terms(ctx)
        with torch.no_grad():
            return weigh(terms)
    return terms_of


def _eigencam(ctx: ExplainContext, options: Mapping[str, Any]) -> CamTerms:
    a = ctx.layer_pass().activation.detach()
    return CamTerms(a, weighted=a[:, None])  # class-agnostic: one map, repeated for every target


def _cam(ctx: ExplainContext, options: Mapping[str, Any]) -> CamTerms:
    """Zhou et al.'s CAM: the linear head's class weights on the pooled feature map, no backward pass.

    Scaled by 1/N (N grid positions) so the map's sum over the layer grid plus the bias is the logit, and the map equals
    Grad-CAM's on a global-average-pool + linear head.
    """
    lp = ctx.layer_pass()
    a = lp.activation.detach()
    head, head_input = lp.head, lp.head_input
    if head is None or head_input is None or head.in_features != a.shape[1] or head_input.shape != a.shape[:2]:
        raise MethodError(
            f"cam needs a global-average-pool + linear head right after the target layer ({ctx.layer.name}); this "
            f"model's head does not have that form. Use gradcam, which gives the same map on such heads."
        )
    dims = spatial_dims(a, 2)
    tol = dict(rtol=1e-4, atol=1e-5)
    if torch.allclose(a.mean(dim=dims), head_input, **tol):
        features = a
        if lp.inplace_relu:
            ctx.method_notes["head"] = "an in-place ReLU sits between the target layer and the pooling (as in DenseNet); applied"
    elif torch.allclose(F.relu(a).mean(dim=dims), head_input, **tol):
        features = F.relu(a)
        ctx.method_notes["head"] = "a ReLU sits between the target layer and the pooling (as in DenseNet); applied"
    else:
        raise MethodError(
            f"cam needs the target layer's map to be average-pooled straight into the last linear layer; the "
            f"linear layer's input is not the spatial mean of {ctx.layer.name}'s output. Use gradcam instead."
        )
    weights = _explained_head_weights(ctx, head.weight.detach())[ctx.targets] / a[0, 0].numel()  # (B, T, C)
    return CamTerms(features, channel_weights=weights)


def _explained_head_weights(ctx: ExplainContext, weight: torch.Tensor) -> torch.Tensor:
    """The head's class weights (K, C) for the score explained (`explain(output=...)`): the contrast is linear in
    the logits, so its weights are the same contrast of the classes' weights; the log-probability is not linear."""
    output = getattr(ctx.model, "output", "logit") if isinstance(ctx.model, OutputScores) else "logit"
    if output == "log-probability":
        raise MethodError("cam reads the linear head's class weights, and the log-probability is not linear in the "
                          "logits; use gradcam (the same map as cam for the logit on such heads) or output='contrast'.")
    return output_scores(weight.T, output, False).T


# ------------------------------------------------------------------------------------ perturbation CAMs
SCORECAM_BATCH = 16  # masked inputs per pass: with the precomputed first convolution 16 is about 3% faster per image than 8 (resnet18, 224 px, in-process A/B) for about 70 MiB more
ABLATIONCAM_BATCH = 256  # ablated copies of the layer's output per pass (only the head above the layer runs on them)


def _check_batch_size(options: Mapping[str, Any], default: int) -> int:
    """`batch_size` (how many perturbed copies run per pass); None means the method's default."""
    size = options.get("batch_size", default)
    return default if size is None else positive_int({"batch_size": size}, "batch_size")


def _scorecam(ctx: ExplainContext, batch_size: int) -> CamTerms:
    """Score-CAM: each channel, upsampled and min-max scaled, masks the input; the softmax over channels of
    the masked target scores weighs the channels.

    Batched in inference mode with `batch_size` masked inputs per pass, masks made per chunk (memory stays
    bounded), through a per-call copy of the model with BatchNorm folded (`inference.fast_forward`). A
    channel that is constant over space gives an all-zero mask, so all such channels share the score of one
    zero input: computed once. When the input goes straight into a convolution, that convolution's output on
    each masked input is a combination of precomputed values (`masked_stem`), checked on the first mask.
    """
    a = ctx.layer_pass().activation.detach()
    b, c = a.shape[:2]
    grid = tuple(a.shape[2:])
    targets = ctx.targets
    weights = torch.empty(b, targets.shape[1], c, dtype=a.dtype, device=a.device)
    fast = ctx.fast_forward()
    zero_scores: Optional[torch.Tensor] = None
    skipped = 0
    stem_note = ""
    with torch.inference_mode():
        for i in range(b):
            flat = a[i].flatten(1)
            varying = torch.nonzero(flat.amax(dim=1) > flat.amin(dim=1)).flatten()
            scores = torch.empty(c, targets.shape[1], dtype=a.dtype, device=a.device)
            if varying.numel() < c:
                if zero_scores is None:
                    zero_scores = fast(torch.zeros_like(ctx.x[:1]))[0]
                scores[:] = zero_scores[targets[i]]
                skipped += c - varying.numel()
            image = channels_last(ctx.x[i : i + 1])
            stem = None
            if varying.numel():
                stem, why = build_masked_stem(fast, ctx.x[i : i + 1], grid)
                if stem is None:
                    stem_note = f"not used: {why}"
            for lo, hi in chunks(varying.numel(), batch_size):
                idx = varying[lo:hi]
                maps = a[i, idx]  # (n, *grid)
                up = upsample_to(maps.unsqueeze(0), ctx.spatial_shape)[0].flatten(1)  # (n, prod S)
                mn = up.amin(dim=1, keepdim=True)
                scale = (up.amax(dim=1, keepdim=True) - mn).clamp_min(EPS)
                masked = image * ((up - mn) / scale).view(-1, 1, *ctx.spatial_shape)  # channels-last, like `image`
                out = None
                if stem is not None:
                    gap = None
                    try:  # on the first chunk, the shortcut must give what the convolution gives on the first mask
                        out, used, gap = stem.logits((maps.flatten(1) - mn) / scale, masked, check=lo == 0)
                    except RuntimeError:  # e.g. a .view() that needs contiguous tensors
                        out, used = None, False
                    if out is None and gap is not None:
                        stem, stem_note = None, f"not used: it differed from the convolution on the first mask by {gap:.1e}"
                    elif out is None:
                        stem, stem_note = None, "not used: the model failed on the channels-last precomputed output"
                    elif not used:  # the model changed its input before the convolution: it ran as usual
                        stem, stem_note = None, "not used: the first convolution did not receive the masked input itself"
                    elif gap is not None:
                        stem_note = f"used ({gap:.1e} relative from the convolution on the first mask)"
                if out is None:
                    out = fast(masked)  # (n, K)
                scores[idx] = out[:, targets[i]]
            weights[i] = torch.softmax(scores.T, dim=-1)
    ctx.method_notes["constant_channels_scored_once"] = skipped
    if stem_note:
        ctx.method_notes["first_convolution_precomputed"] = stem_note
    return CamTerms(a, channel_weights=weights.clone())


def _ablation_value(a: torch.Tensor) -> float:
    # A channel is "off" at zero after a ReLU; for pre-activation maps (DenseNet's norm5) a value far
    # below the minimum is off after the ReLU that follows (the convention of Desai & Ramaswamy's code).
    return 0.0 if float(a.min()) >= 0 else float(a.min()) - 1e7


def _ablationcam(ctx: ExplainContext, batch_size: int) -> CamTerms:
    """Ablation-CAM: a channel's weight is how much the target score drops when that channel is ablated.

    Uses the plain score difference (not divided by the score), so the sign stays right for negative
    logits. Per chunk of `batch_size` channels, the image runs once (batch 1) through the layers below
    the target layer, and a forward hook swaps the layer's output for the chunk's ablated copies, so only
    the layers above it run on the whole chunk.
    """
    lp = ctx.layer_pass()
    a = lp.activation.detach()
    b, c = a.shape[:2]
    targets = ctx.targets
    base = ctx.logits.gather(1, targets)  # (B, T)
    value = _ablation_value(a)
    layer = ctx.layer.module
    weights = torch.empty(b, targets.shape[1], c, dtype=a.dtype, device=a.device)
    replacement: dict[str, torch.Tensor] = {}
    n_classes = ctx.logits.shape[1]

    def swap(_m, _i, out):  # the ablated maps, in the layer's own layout (a token sequence keeps its class token)
        return lp.layout.rebuild(out, replacement["act"])

    def head_scores(i: int, n: int) -> torch.Tensor:
        if not ctx.method_notes.get("input_repeated"):
            try:
                out = logits_of(ctx.model(ctx.x[i : i + 1]))
            except RuntimeError:  # e.g. DenseNet's torch.cat of the layer's n copies with batch-1 features
                out = None
            if isinstance(out, torch.Tensor) and tuple(out.shape) == (n, n_classes):
                return out
        # Something above the layer ties its batch to the input's: run the image n times instead.
        ctx.method_notes["input_repeated"] = True
        return call_model(ctx.model, ctx.x[i : i + 1].expand(n, *ctx.x.shape[1:]))

    with torch.inference_mode():
        handle = layer.register_forward_hook(swap)
        try:
            for i in range(b):
                drops = []
                for lo, hi in chunks(c, batch_size):
                    n = hi - lo
                    ablated = a[i : i + 1].repeat(n, *([1] * (a.dim() - 1)))
                    idx = torch.arange(n, device=a.device)
                    ablated[idx, lo + idx] = value
                    replacement["act"] = ablated
                    out = head_scores(i, n)
                    drops.append(base[i][None, :] - out[:, targets[i]])  # (n, T)
                weights[i] = torch.cat(drops).T
        finally:
            handle.remove()
            replacement.clear()
    return CamTerms(a, channel_weights=weights.clone())


def _perturbation_cam(fn, default_batch: int):
    def terms_of(ctx: ExplainContext, options: Mapping[str, Any]) -> CamTerms:
        size = _check_batch_size(options, default_batch)
        ctx.method_notes["batch_size"] = size
        return fn(ctx, size)
    return terms_of


# ----------------------------------------------------------------------------------------- registration
# How each CAM is drawn (the registry's `display`): the positive part where the published definition ends in a
# ReLU (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, Score-CAM, Ablation-CAM); signed where it does not (CAM, Zhou et
# al. 2016: the class-weighted sum; HiResCAM, Draelos & Carin 2020, a generalisation of CAM whose negative values are
# evidence against the class). EigenCAM's component has an arbitrary sign that medlens orients to agree with the plain
# channel sum (cam_arithmetic.first_component), so its positive part is what agrees with the layer's activation.
_POSITIVE = {"gradcam", "gradcam++", "xgradcam", "layercam"}
_GRADIENT_CAMS = {
    "gradcam": (gradcam, "Grad-CAM: channel weights are the spatial mean of the target's gradient (Selvaraju et al. 2017)."),
    "gradcam++": (gradcam_plus_plus, "Grad-CAM++: higher-order gradient weights, better for several instances (Chattopadhay et al. 2018)."),
    "xgradcam": (xgradcam, "XGrad-CAM: gradient weights normalised by the activation, axiom-based (Fu et al. 2020)."),
    "hirescam": (hirescam, "HiResCAM: element-wise gradient x activation, faithful to the model's computation (Draelos & Carin 2020)."),
    "layercam": (layercam, "LayerCAM: positive gradients weigh each location, finer maps (Jiang et al. 2021)."),
}

register(MethodSpec(
    name="cam", family="cam",
    summary="CAM: the linear head's class weights on the last feature map, no backward pass (Zhou et al. 2016).",
    run=_cam_runner(_cam), needs_gradients=False, needs_layer=True, cost="one forward", options=CAM_OPTIONS,
))
for _name, (_weigh, _summary) in _GRADIENT_CAMS.items():
    register(MethodSpec(
        name=_name, family="cam", summary=_summary, run=_cam_runner(_gradient_cam(_weigh)),
        needs_gradients=True, needs_layer=True, cost="one forward + one partial backward", options=CAM_OPTIONS,
        display="positive" if _name in _POSITIVE else "signed",
    ))
register(MethodSpec(
    name="eigencam", family="cam",
    summary="EigenCAM: first principal component of the feature map; class-agnostic (Muhammad & Yeasin 2020).",
    run=_cam_runner(_eigencam, always_eigen=True), needs_gradients=False, needs_layer=True, cost="one forward",
    options=CAM_OPTIONS,
    display="positive",
))
register(MethodSpec(
    name="eigengradcam", family="cam",
    summary="Eigen-Grad-CAM: first principal component of gradient x activation; class-specific.",
    run=_cam_runner(_gradient_cam(hirescam), always_eigen=True), needs_gradients=True, needs_layer=True,
    cost="one forward + one partial backward", options=CAM_OPTIONS,
    display="positive",
))
register(MethodSpec(
    name="scorecam", family="cam",
    summary="Score-CAM: channels as input masks, weighted by the masked target score; gradient-free (Wang et al. 2020).",
    run=_cam_runner(_perturbation_cam(_scorecam, SCORECAM_BATCH)), needs_gradients=False, needs_layer=True,
    cost="one forward per channel, batched", options={**CAM_OPTIONS, "batch_size": SCORECAM_BATCH},
    display="positive",
))
register(MethodSpec(
    name="ablationcam", family="cam",
    summary="Ablation-CAM: a channel's weight is the target score's drop when it is ablated (Desai & Ramaswamy 2020).",
    run=_cam_runner(_perturbation_cam(_ablationcam, ABLATIONCAM_BATCH)), needs_gradients=False, needs_layer=True,
    cost="one pass above the layer per channel, batched", options={**CAM_OPTIONS, "batch_size": ABLATIONCAM_BATCH},
    display="positive",
))
