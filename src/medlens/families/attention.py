"""The attention family: attention rollout and transformer attribution from a vision transformer's attention probabilities.

Fused kernels never materialise the probabilities, so for one pass each attention module's output is recomputed from
its own weights on its captured input (a hook hands the model that recomputation) and the logits are checked unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medlens.accel.fast_forward import relative_gap
from medlens.core.context import ExplainContext
from medlens.core.feature_layout import FeatureLayout, layout_of, with_first
from medlens.core.layers import transformer_blocks
from medlens.core.model_state import HookSet
from medlens.core.registry import MethodSpec, register
from medlens.errors import MethodError
from medlens.tensor.autograd import call_model, target_gradients
from medlens.tensor.spatial import upsample_to

AGREEMENT = 1e-4  # the recomputed pass's logits must equal the model's to this (relative), or the method refuses
HEAD_FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class _Heads:
    """How to recompute one attention module: q, k, v per head from its input, the scale, and its output from the
    attended values (the module's own output projection, in the form the module returns)."""

    split: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (B, N, C) -> 3 x (B, H, N, D)
    scale: float
    finish: Callable[[torch.Tensor, Any, torch.Tensor], Any]  # (context (B, N, H*D), output, probs) -> output


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)


def _relative_bias(module: nn.Module) -> bool:
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    names += [n for n, _ in module.named_modules()]
    return any("relative_position" in n for n in names)


def attention_adapter(module: nn.Module) -> Optional[_Heads]:
    """The recomputation of a global self-attention module: torch's MultiheadAttention (torchvision ViT), timm's
    Attention (a `qkv` projection), HuggingFace's ViT/DeiT attention (q/k/v/o projections in transformers 5, the
    query/key/value self-attention in 4); None for anything else (windowed attention with relative biases too)."""
    if _relative_bias(module):
        return None
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.in_proj_weight is not None:
        h = module.num_heads

        def split_mha(x):
            return tuple(_heads(t, h) for t in F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1))
        return _Heads(split_mha, (module.embed_dim // h) ** -0.5,
                      lambda c, out, a: with_first(out, module.out_proj(c)))
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear) and isinstance(getattr(module, "num_heads", None), int) and hasattr(module, "proj"):
        h = module.num_heads
        q_norm, k_norm = getattr(module, "q_norm", nn.Identity()), getattr(module, "k_norm", nn.Identity())
        norm = getattr(module, "norm", nn.Identity())

        def split_timm(x):
            q, k, v = (_heads(t, h) for t in qkv(x).chunk(3, dim=-1))
            return q_norm(q), k_norm(k), v
        scale = float(getattr(module, "scale", (qkv.out_features // 3 // h) ** -0.5))
        return _Heads(split_timm, scale, lambda c, out, a: with_first(out, module.proj(norm(c))))
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        h = int(getattr(module, "num_attention_heads", getattr(module, "num_heads", 0)) or 0)
        if h:
            def split_hf(x):
                return _heads(module.q_proj(x), h), _heads(module.k_proj(x), h), _heads(module.v_proj(x), h)
            scale = float(getattr(module, "scaling", (module.q_proj.out_features // h) ** -0.5))
            return _Heads(split_hf, scale, lambda c, out, a: with_first(out, module.o_proj(c)))
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value")):
        h = int(getattr(module, "num_attention_heads", 0) or 0)
        if h:
            def split_hf4(x):
                return _heads(module.query(x), h), _heads(module.key(x), h), _heads(module.value(x), h)
            return _Heads(split_hf4, (module.query.out_features // h) ** -0.5, lambda c, out, a: with_first(out, c))
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, _Heads]]:
    """The model's global self-attention modules with their recomputation, in module order.

    Raises:
        MethodError: the model has no attention blocks, or only attention this family cannot recompute (Swin's
            windows).
    """
    found, unsupported = [], []
    for name, module in model.named_modules():
        if any(module is m or any(module is d for d in m.modules()) for _, m, _ in found):
            continue
        adapter = attention_adapter(module)
        if adapter is not None:
            found.append((name, module, adapter))
        elif isinstance(module, nn.MultiheadAttention) or type(module).__name__.lower().endswith("attention"):
            unsupported.append(f"{name} ({type(module).__name__})")
    if found:
        return found
    if unsupported or transformer_blocks(model):
        raise MethodError(
            f"attention methods need global self-attention blocks (ViT, DeiT: torchvision, timm or HuggingFace); this "
            f"model's attention ({', '.join(unsupported[:3]) or 'its blocks'}) is windowed or of a kind medlens cannot "
            f"recompute (Swin's shifted windows with relative position biases). Use gradcam or a gradient method.")
    raise MethodError(
        f"{type(model).__name__} has no attention blocks, so attention_rollout and transformer_attribution do not "
        f"apply; use a CAM (gradcam) or a gradient method (integratedgradients) instead.")


@dataclass
class AttentionPass:
    """One forward pass with every attention module's probabilities (B, H, N, N) in forward order, and the grid."""

    logits: torch.Tensor
    probabilities: list[torch.Tensor]
    layout: FeatureLayout


def _uniform(product: torch.Tensor) -> torch.Tensor:
    """The same values with half the gradient: on a product of two inputs, each input then gets half the relevance
    (AttnLRP's uniform rule for the bilinear query-key and value products, in gradient x input form)."""
    half = 0.5 * product
    return half + half.detach()


def install_recomputation(modules: list[tuple[str, nn.Module, _Heads]], hooks: HookSet, probabilities: list,
                          constant: bool = False, softmax_rule: bool = False) -> None:
    """Hooks that hand the model each attention module's output recomputed from its captured input, appending the
    probabilities (B, H, N, N) to `probabilities` in forward order; with `constant` they enter the output detached
    (attention weights held constant, as LRP for transformers treats them); with `softmax_rule` (AttnLRP's own rules)
    the softmax keeps its gradient (R_s = s (R_p - p sum R_p) in gradient x input form) and the query-key and value
    products pass half the gradient to each factor (the uniform rule)."""
    product = _uniform if softmax_rule else (lambda t: t)
    inputs: dict[nn.Module, torch.Tensor] = {}

    def capture(module, args, kwargs):
        x = args[0] if args else next((kwargs[k] for k in ("hidden_states", "query", "x") if k in kwargs), None)
        if isinstance(module, nn.MultiheadAttention):
            key_, value = (args[1:3] if len(args) >= 3 else (kwargs.get("key"), kwargs.get("value")))
            if key_ is not x or value is not x:
                raise MethodError(f"{type(module).__name__} is used as cross-attention here (its key or value is not its "
                                  f"query); attention methods explain self-attention only.")
            x = x if module.batch_first else x.transpose(0, 1)
        inputs[module] = x

    def recompute(adapter: _Heads):
        def hook(module, _args, output):
            q, k, v = adapter.split(inputs.pop(module))
            probs = torch.softmax(product((q * adapter.scale) @ k.transpose(-2, -1)), dim=-1)
            probabilities.append(probs)
            weights = probs.detach() if constant and not softmax_rule else probs
            context = product(weights @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
            out = adapter.finish(context, output, probs)
            if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
                out = with_first(out, out[0].transpose(0, 1))
            return out
        return hook

    for _, module, adapter in modules:
        hooks.add(module.register_forward_pre_hook(capture, with_kwargs=True))
        hooks.forward(module, recompute(adapter))


def check_agreement(logits: torch.Tensor, reference: torch.Tensor, modules: list, what: str) -> float:
    """The relative gap between a pass with recomputed attention and the model's own logits; refused above
    `AGREEMENT`."""
    gap = relative_gap(logits.detach(), reference)
    if not gap <= AGREEMENT:
        raise MethodError(
            f"recomputing {type(modules[0][1]).__name__}'s attention from its weights changed the logits by {gap:.1e} "
            f"(relative): this attention has something medlens does not reproduce (a mask, a bias, rotary positions), "
            f"so {what} cannot run on it. Use gradcam or a gradient method on this model.")
    return gap


def attention_pass(ctx: ExplainContext, with_graph: bool) -> AttentionPass:
    """The model run once with its attention recomputed explicitly (in the graph from the input when `with_graph`),
    cached per call; the logits must equal the model's own, or the method refuses."""
    key = ("attention_pass", with_graph)
    if key in ctx.cache or ("attention_pass", True) in ctx.cache:
        return ctx.cache.get(key) or ctx.cache[("attention_pass", True)]
    modules = attention_modules(ctx.model)
    probabilities: list[torch.Tensor] = []
    local = HookSet()
    try:
        install_recomputation(modules, local, probabilities)
        if with_graph:
            with torch.enable_grad():
                logits = call_model(ctx.model, ctx.x.detach().requires_grad_(True))
        else:
            with torch.inference_mode():
                logits = call_model(ctx.model, ctx.x)
    finally:
        local.remove()
    gap = check_agreement(logits, ctx.logits, modules, "attention methods")
    tokens = torch.zeros(ctx.x.shape[0], probabilities[-1].shape[-1], 1)
    layout = layout_of(ctx.model, ctx.x, tokens, modules[-1][0], modules[-1][1])
    ctx.method_notes["attention"] = (f"{len(probabilities)} attention module(s) recomputed from their own weights; "
                                     f"logits agree with the model's to {gap:.1e} relative")
    result = AttentionPass(logits, probabilities, layout)
    ctx.cache[key] = result
    return result


def _grid_maps(ctx: ExplainContext, rows: torch.Tensor, layout: FeatureLayout) -> torch.Tensor:
    """(B, T, N) relevance of every token -> (B, T, *input) maps of the patch tokens, bilinear from the grid."""
    ctx.method_notes["grid"] = layout.describe((rows.shape[0], rows.shape[-1], "C"))
    patches = rows[..., layout.prefix:].reshape(*rows.shape[:2], *layout.grid)
    return upsample_to(patches.float(), ctx.spatial_shape)


def _source_rows(relevance: torch.Tensor, prefix: int) -> torch.Tensor:
    """The class token's row of a (..., N, N) relevance matrix; with no class token, the mean over all rows."""
    return relevance[..., 0, :] if prefix else relevance.mean(dim=-2)


def rollout(probabilities: list[torch.Tensor], head_fusion: str, discard_ratio: float) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): heads fused, the weakest `discard_ratio` of each image's entries
    dropped (never the class token's attention to itself), the identity added for the residual, rows renormalised,
    and the layers multiplied, last on the left. (B, N, N)."""
    result = None
    for probs in probabilities:
        fused = getattr(probs, "amax" if head_fusion == "max" else "amin" if head_fusion == "min" else "mean")(dim=1)
        b, n = fused.shape[:2]
        if discard_ratio > 0:
            flat = fused.reshape(b, -1).clone()
            drop = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            kept = flat[:, :1].clone()
            flat.scatter_(1, drop, 0.0)
            flat[:, :1] = kept
            fused = flat.reshape(b, n, n)
        a = (fused + torch.eye(n, dtype=fused.dtype, device=fused.device)) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def _run_rollout(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    head_fusion = options.get("head_fusion", "mean")
    if head_fusion not in HEAD_FUSIONS:
        raise MethodError(f"option head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}.")
    ratio = options.get("discard_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise MethodError(f"option discard_ratio must be a number in [0, 1) (the share of weakest attention entries "
                          f"dropped per layer), got {ratio!r}.")
    passed = attention_pass(ctx, with_graph=False)
    with torch.no_grad():
        relevance = rollout([p.detach() for p in passed.probabilities], head_fusion, float(ratio))
        rows = _source_rows(relevance, passed.layout.prefix)[:, None].expand(-1, ctx.targets.shape[1], -1)
    ctx.method_notes["class_agnostic"] = True
    return _grid_maps(ctx, rows, passed.layout)


def _run_transformer_attribution(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    """Chefer et al.'s gradient-weighted attention relevance: per block the positive part of gradient x attention,
    averaged over heads, accumulated from the identity as R <- R + A_bar R; the class token's row is the map."""
    passed = attention_pass(ctx, with_graph=True)
    picked = passed.logits.gather(1, ctx.targets)
    grads = target_gradients(picked, passed.probabilities)  # per block (T, B, H, N, N), one batched backward
    with torch.no_grad():
        n = passed.probabilities[0].shape[-1]
        relevance = torch.eye(n, dtype=picked.dtype, device=picked.device).expand(*picked.shape[::-1], n, n)
        for probs, grad in zip(passed.probabilities, grads):
            weighted = (grad * probs.detach()[None]).clamp(min=0).mean(dim=2)  # (T, B, N, N)
            relevance = relevance + weighted @ relevance
        rows = _source_rows(relevance, passed.layout.prefix).transpose(0, 1)  # (B, T, N)
    return _grid_maps(ctx, rows, passed.layout)


register(MethodSpec(
    name="attention_rollout", family="attention",
    summary="Attention rollout: the attention of every block, heads fused, residual added, multiplied through the "
            "layers; the class token's row on the patch grid; class-agnostic (Abnar & Zuidema 2020).",
    run=_run_rollout, needs_gradients=False, needs_layer=False, supports_3d=False, cost="one forward",
    options={"head_fusion": "mean", "discard_ratio": 0.0}, torchscript=False, needs_attention=True,
))
register(MethodSpec(
    name="transformer_attribution", family="attention",
    summary="Transformer attribution: per block the positive gradient x attention, averaged over heads, accumulated "
            "over the blocks (Chefer et al. 2021); the class token's row on the patch grid.",
    run=_run_transformer_attribution, needs_gradients=True, needs_layer=False, supports_3d=False,
    cost="one forward + one backward", torchscript=False, needs_attention=True,
))
