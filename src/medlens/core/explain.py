"""`explain()`: run any set of registered methods on a model, an input batch and targets, sharing passes.

It checks the request, borrows the model for the call (hooks and changes undone afterwards), resolves
targets once, runs each method on the shared context and returns a frozen `ExplanationResult`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import operator
import platform
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from medlens.version import __version__
from medlens.core.context import ExplainContext
from medlens.errors import InputError, MedlensError, MethodError, ModelError, short_message
from medlens.accel.heap import steady_heap
from medlens.core.digests import model_digest, tensor_digest
from medlens.core.explained_output import output_record, take_output, wrap_for_output
from medlens.core.jsonable import jsonable
from medlens.core.layers import LayerSpec, resolve_target_layer
from medlens.core.model_description import describe
from medlens.core.model_state import borrowed_model
from medlens.core.region_targets import (check_region_options, has_region_targets, inner_name, region_layer,
                                         region_scores, wrap_for_targets)
from medlens.core.registry import MethodSpec, all_specs, get_spec
from medlens.core.result import ExplanationResult
from medlens.core.sliding_window import checked_window, take_window, windowed_model

MethodsArg = Union[str, Iterable[str]]


def _method_names(methods: MethodsArg) -> list[str]:
    if methods is None:
        raise MethodError("no method was given; pass methods='gradcam' or a list such as ['gradcam', 'layercam'].")
    if isinstance(methods, str):
        names = [m.strip() for m in methods.split(",") if m.strip()]
    else:
        names = [str(m).strip() for m in methods]
    if not names:
        raise MethodError("no method was given; pass methods='gradcam' or a list such as ['gradcam', 'layercam'].")
    seen: list[str] = []
    for name in names:
        spec = get_spec(name)
        if spec.name not in seen:
            seen.append(spec.name)
    return seen


def check_input(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"the input must be a torch.Tensor of shape (B, C, H, W) or (B, C, D, H, W), not {type(x).__name__}; "
            f"use medlens.load_input(path, model) to read a file."
        )
    if x.dim() not in (4, 5):
        raise InputError(
            f"the input has shape {tuple(x.shape)}; expected (B, C, H, W) for 2-D or (B, C, D, H, W) for 3-D "
            f"(add a batch axis with x[None] if needed)."
        )
    if not x.is_floating_point():
        raise InputError(f"the input must be a floating-point tensor, not {x.dtype}; convert it with x.float().")
    if x.shape[0] == 0 or any(s == 0 for s in x.shape):
        raise InputError(f"the input has an empty axis: shape {tuple(x.shape)}.")
    if not torch.isfinite(x).all():
        raise InputError("the input contains NaN or infinite values; clean or re-read the image before explaining it.")
    return x


def _split_options(specs: list[MethodSpec], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    accepted = {k for s in specs for k in s.options}
    unknown = sorted(set(options) - accepted)
    if unknown:
        hints = "; ".join(f"{s.name}: {', '.join(s.options) or '(none)'}" for s in specs)
        raise MethodError(f"option(s) {', '.join(unknown)} are not used by any requested method. Options by method: {hints}.")
    per_method = {}
    for s in specs:
        opts = dict(s.options)
        opts.update({k: v for k, v in options.items() if k in s.options})
        per_method[s.name] = opts
    return per_method


def check_torchscript_support(model: nn.Module, specs: Iterable[MethodSpec]) -> None:
    """Refuse, before any work, the methods that hook a layer or patch functions when the model is TorchScript."""
    if not isinstance(model, torch.jit.ScriptModule):
        return
    hooked = [s.name for s in specs if not s.supports_torchscript]
    if hooked:
        raise MethodError(
            f"method(s) {', '.join(hooked)} need to hook a layer or patch the model's functions, which a TorchScript "
            f"model does not allow. Load the model as a Python module instead (torch.save(model), or an architecture "
            f"name with its weights file: --weights on the command line), or use a method that only calls the model: "
            f"{', '.join(n for n, sp in all_specs().items() if sp.supports_torchscript)}."
        )


def _check_seed(seed: Any) -> Optional[int]:
    if seed is None:
        return None
    try:
        if isinstance(seed, bool):
            raise TypeError
        return operator.index(seed)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        raise InputError(f"seed must be an integer or None, got {seed!r}.") from None


def check_methods(
    methods: MethodsArg,
    options: dict[str, Any],
    *,
    model: Optional[nn.Module] = None,
    input_shape: Optional[tuple[int, ...]] = None,
    model_dims: Optional[int] = None,
) -> tuple[list[MethodSpec], dict[str, dict[str, Any]]]:
    """Check a request's methods before any work: names, options, 3-D support, TorchScript; the specs and the
    options of each method. `input_shape` (B, C, *spatial) or `model_dims` (2 or 3) says whether volumes come."""
    names = _method_names(methods)
    specs = [get_spec(n) for n in names]
    per_method = _split_options(specs, take_output(checked_window(options, [s.name for s in specs]))[1])
    flat = [s.name for s in specs if not s.supports_3d]
    if flat and input_shape is not None and len(input_shape) == 5:
        raise MethodError(f"method(s) {', '.join(flat)} support 2-D inputs only; the input is a 3-D volume {tuple(input_shape)}.")
    if flat and input_shape is None and model_dims == 3:
        raise MethodError(f"method(s) {', '.join(flat)} support 2-D inputs only, and this model takes 3-D volumes.")
    if model is not None:
        check_torchscript_support(model, specs)
    return specs, per_method


_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", MemoryError), MemoryError)


def _first_pass(ctx: ExplainContext) -> torch.Tensor:
    """The model's logits on the input: where a model that cannot take this input fails, said in those terms."""
    try:
        logits = ctx.logits
    except MedlensError:
        raise
    except _OUT_OF_MEMORY as error:
        raise ModelError(
            f"out of memory running the model on the input of shape {tuple(ctx.x.shape)} on {ctx.x.device}: "
            f"{short_message(error)}. Explain fewer images at a time, or use the CPU (--device cpu)."
        ) from error
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
        param = next(ctx.model.parameters(), None)
        hint = ""
        if param is not None and param.is_floating_point() and param.dtype != ctx.x.dtype:
            hint = (f" The input is {ctx.x.dtype} but the model's parameters are {param.dtype}: convert the input "
                    f"(x.to({param.dtype})) or the model (model.to({ctx.x.dtype})).")
        raise ModelError(
            f"the model's forward pass failed on the input of shape {tuple(ctx.x.shape)} ({ctx.x.dtype}): "
            f"{short_message(error)}.{hint} If the input is not what the model expects (channels, size, intensity "
            f"range), medlens.load_input(path, model) prepares a file for a model that carries its input spec."
        ) from error
    if not torch.isfinite(logits).all():
        raise ModelError(f"the model returned non-finite logits (NaN or infinite) for the input of shape "
                         f"{tuple(ctx.x.shape)}; no explanation of them would mean anything. Check the model's weights.")
    return logits


def explain(
    model: nn.Module,
    x: torch.Tensor,
    methods: MethodsArg = "gradcam",
    targets: Any = None,
    layer: LayerSpec = None,
    seed: Optional[int] = None,
    **options: Any,
) -> ExplanationResult:
    """Explain `model`'s outputs on `x` with one or several methods, sharing passes where they can.

    The model is borrowed for the call: hooks, modes, `requires_grad` flags and `.grad` are as they were
    afterwards, even on error; gradients are switched on for the call whatever the caller's grad mode.

    Args:
        model: a `torch.nn.Module` returning logits of shape (B, K); a `torch.compile`d module is explained
            through its original module.
        x: the input batch, a floating-point tensor (B, C, H, W) or (B, C, D, H, W) on the model's device
            (`medlens.load_input` prepares a file).
        methods: one name, a comma-separated string, or a list (`medlens.methods()`); default "gradcam".
        targets: None (the top-1 class; for a multi-label model every class with p >= 0.5, or the top-1 when none
            is), an int or class name, a list (the same for every image), or one list per image (equal lengths).
        layer: the layer CAM methods read: None chooses it automatically, or a module, or its dotted name.
        seed: for stochastic methods (drawn and recorded in the provenance when None).
        **options: method options, e.g. `n_steps=`, `num_samples=`, `composite=` (docs/api.md, "Method options");
            each goes to every requested method that takes it. `output=` ("logit", the default; "log-probability";
            "contrast") is the score every method explains; `.logits` stays the model's logits.
            `sliding_window=(D, H, W)` (`_overlap`, `_blend`): a volume run window by window (core/sliding_window.py).

    Returns:
        An `ExplanationResult`: `result[name]` is a float32 tensor (B, T, *x.shape[2:]), raw and signed, at input
        resolution, on x's device; `.logits` (B, K), `.targets` (B, T), `.provenance` (settings, layer, versions,
        digests, seed, timings).

    Raises:
        MethodError: an unknown method, option or `output`, a 2-D-only method on a volume, a hooking method on
            TorchScript.
        InputError: `x` is not a finite floating-point 4-D/5-D tensor, is on another device, or a bad `seed`.
        TargetError: targets that are out of range, unknown class names, or lists of unequal length.
        ModelError: `model` is not a module, its forward pass fails or returns non-finite logits, the layer is not
            one of its modules, or it changes its input in place for a method that needs the input's gradient.

    Example:
        >>> result = medlens.explain(model, x, methods=["gradcam", "lrp"], targets="glioma", composite="epsilon")
        >>> result["gradcam"].shape   # (B, T, H, W)
        torch.Size([1, 1, 160, 160])
    """
    call = _checked_call(model, x, methods, options, seed)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # The caller's grad mode must not decide whether a method can run: gradients are switched on and
    # inference mode off for the call (both restored on exit), and an inference tensor input is copied
    # into a normal one, since autograd cannot record it. Methods that need no graph turn it off themselves.
    # Chunked passes (methods with a batch_size) reuse the C heap's pages instead of faulting them in again (heap.py).
    chunked = any("batch_size" in s.options for s in call.specs)
    heap_block = steady_heap() if chunked else contextlib.nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), heap_block, borrowed_model(call.model) as hooks:
        # A copy of its own, detached: the caller's tensor is never changed or differentiated (a model that
        # writes into its input, an input that requires grad), and an inference tensor becomes a normal one.
        call.x = call.x.detach().clone()
        done = _run_call(call, hooks, targets, layer, timings)
    timings["total"] = time.perf_counter() - started
    provenance = _provenance(call, done, timings)
    return ExplanationResult(done.maps, done.logits.detach(), done.target_grid, provenance, labels=done.labels,
                             multi_label=done.multi_label)


@dataclass
class _Call:
    """One call's checked arguments: the module explained, the input, the methods with their options, the seed."""

    model: nn.Module
    was_compiled: bool
    x: torch.Tensor
    seed: Optional[int]
    specs: list
    per_method: dict
    description: Any
    input_digest: str
    output: str = "logit"
    window: Any = None  # the SlidingWindow, when the model runs over the input window by window


@dataclass
class _Done:
    """What the methods gave: maps, the outputs and targets explained, the labels, the layer and notes."""

    maps: dict
    method_notes: dict
    logits: torch.Tensor
    target_grid: torch.Tensor
    labels: Any
    multi_label: bool
    layer_info: Optional[dict]
    region_record: Any
    ctx: ExplainContext
    output_record: Any = None


def _checked_call(model: Any, x: Any, methods: MethodsArg, options: dict[str, Any], seed: Any) -> _Call:
    """The arguments checked before any pass: the module (a compiled one's original), the input, the methods and
    their options, the seed (drawn for stochastic methods), the devices, and the input's digest."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, not {type(model).__name__}; load one with medlens.load_model().")
    model, was_compiled = _uncompiled(model)
    x = check_input(x)
    seed = _check_seed(seed)
    window, options = take_window(options)
    output, options = take_output(options)
    specs, per_method = check_methods(methods, options, model=model, input_shape=tuple(x.shape))
    description, model = describe(model), windowed_model(model, window, [s.name for s in specs], x)
    if any(s.stochastic for s in specs) and seed is None:
        seed = secrets.randbelow(2**31)
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:
        raise InputError(f"the input is on {x.device} but the model is on {param.device}; move one of them (x.to(device)).")
    # the digest before any pass: a model that changes its input in place cannot alter it
    return _Call(model, was_compiled, x, seed, specs, per_method, description, tensor_digest(x), output, window)


def _run_call(call: _Call, hooks: Any, targets: Any, layer: LayerSpec, timings: dict[str, float]) -> _Done:
    """Inside the borrowed model: region targets wrapped, the shared context made, the first pass, every method."""
    description = call.description
    labels, multi_label = description.labels, description.multi_label
    called, region_record, layer_note = call.model, None, None
    if description.task != "classification" or has_region_targets(targets):
        called, targets, labels, region_record = wrap_for_targets(call.model, call.x, targets, labels, multi_label,
                                                                  description.task)
        (layer, layer_note), multi_label = region_layer(call.model, call.x, layer, region_record["kind"],
                                                        any(s.needs_layer for s in call.specs)), False
        check_region_options(call.per_method, region_record["kind"], call.output)
    elif call.output != "logit":  # targets chosen on the model's own logits, then every method explains the score
        raw = ExplainContext(call.model, call.x, hooks, targets=targets, labels=labels, multi_label=multi_label)
        raw_logits, targets = _first_pass(raw), raw.targets
        called = wrap_for_output(call.model, call.output, multi_label, raw_logits.shape[1])
        if isinstance(layer, str):  # a dotted name in the model as given, not in the wrapper
            layer = resolve_target_layer(call.model, call.x, layer).module
    ctx = ExplainContext(
        called, call.x, hooks, layer=layer, targets=targets, labels=labels, multi_label=multi_label, seed=call.seed,
        need_layer_graph=any(s.needs_layer and s.needs_gradients for s in call.specs),
    )
    if call.was_compiled:
        ctx.notes.append("a torch.compile'd model: explained through its original module (the same parameters), "
                         "since a compiled graph does not run the hooks the methods need")
    wrapped = called is not call.model and region_record is None  # wrapped for the explained output
    if wrapped:
        ctx._targets, ctx.target_note = targets, raw.target_note
    t0 = time.perf_counter()
    logits = _first_pass(ctx)
    target_grid = ctx.targets
    explained = output_record(call.output, multi_label, logits.gather(1, target_grid).tolist(), region_record)
    logits = raw_logits if wrapped else logits  # the result's logits are the model's; the scores are in provenance
    timings["forward_and_targets"] = time.perf_counter() - t0
    maps, method_notes = _run_methods(ctx, call.specs, call.per_method, timings)
    if region_record is not None:  # the region scores are the result's outputs, one per target slot
        logits, target_grid = region_scores(logits, target_grid)
    layer_info = _layer_info(ctx, region_record or (True if wrapped else None), layer_note)
    return _Done(maps, method_notes, logits, target_grid, labels, multi_label, layer_info, region_record, ctx, explained)


def _provenance(call: _Call, done: _Done, timings: dict[str, float]) -> dict[str, Any]:
    """The result's provenance: versions, each method's options and notes, targets, layer, seed, digests, timings."""
    labels, rows = done.labels, done.target_grid.tolist()
    inner = call.model.model if call.window is not None else call.model
    provenance = {
        **_environment(call.x),
        "methods": {s.name: {"family": s.family,
                             "options": jsonable(call.per_method[s.name], list_up_to=8, digest_larger=True),
                             **jsonable(done.method_notes.get(s.name, {}), list_up_to=8, digest_larger=True)}
                    for s in call.specs},
        "targets": rows,
        "target_names": [[labels[t] for t in row] for row in rows] if labels else None,
        "target_rule": done.ctx.target_note,
        "layer": done.layer_info,
        "output": done.output_record,
        "seed": call.seed,
        "model": {"class": type(inner).__name__, "sha256": model_digest(inner, done.ctx.hooks.modules_of(inner)),
                  "mode_during_call": "eval"},
        "input": {"shape": list(call.x.shape), "dtype": str(call.x.dtype), "sha256": call.input_digest},
        "notes": list(done.ctx.notes),
        **({"sliding_window": call.window.record()} if call.window is not None else {}),
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
    }
    if done.region_record is not None:
        provenance["region_targets"] = done.region_record
    return provenance


def _uncompiled(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module to explain, and whether it was a torch.compile'd wrapper: a compiled graph does not run the hooks
    medlens adds, and the original module has the same parameters."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model._orig_mod, True
    return model, False


def _run_one(ctx: ExplainContext, spec: MethodSpec, options: Mapping[str, Any]) -> torch.Tensor:
    """One method's maps, its in-place-input failure said in the user's terms, its shape checked."""
    try:
        result = spec.run(ctx, options)
    except RuntimeError as error:
        if "leaf Variable that requires grad is being used in an in-place operation" not in str(error):
            raise
        raise ModelError(
            f"{spec.name} needs the gradient with respect to the input, but the model changes its input in "
            f"place (an in-place operation such as x.sub_() at the start of forward). Let the model work on a "
            f"copy (x = x.clone() or x = x - mean), or use a method that only runs the model (occlusion, rise)."
        ) from error
    expected = (ctx.x.shape[0], ctx.targets.shape[1], *ctx.x.shape[2:])
    if tuple(result.shape) != expected:
        raise RuntimeError(f"method {spec.name} returned shape {tuple(result.shape)}, expected {expected}")
    return result.detach().to(dtype=torch.float32)


def _run_methods(ctx: ExplainContext, specs: Sequence[MethodSpec], per_method: Mapping[str, Mapping[str, Any]],
                 timings: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every method on the shared context, in order: maps by name and each method's notes; times into `timings`."""
    maps: dict[str, torch.Tensor] = {}
    method_notes: dict[str, Any] = {}
    for spec in specs:
        t0 = time.perf_counter()
        ctx.method_notes = {}
        maps[spec.name] = _run_one(ctx, spec, per_method[spec.name])
        timings[spec.name] = time.perf_counter() - t0
        if ctx.method_notes:
            method_notes[spec.name] = ctx.method_notes
    return maps, method_notes


def _layer_info(ctx: ExplainContext, region_record: Any, layer_note: Optional[str]) -> Optional[dict[str, Any]]:
    """The target layer the call used, if any method needed one (named inside a region target's wrapper)."""
    if ctx._layer is None:
        return None
    info = {"name": inner_name(ctx.layer.name, region_record), "chosen_automatically": ctx.layer.chosen_automatically,
            "type": type(ctx.layer.module).__name__, "reason": ctx.layer.reason}
    if ctx._layer_pass is not None and ctx._layer_pass.layout is not None:  # a token sequence read as a patch grid
        info["layout"] = ctx._layer_pass.layout.describe(ctx._layer_pass.layout_shape)
    if layer_note:  # chosen for a segmentation or detection model (region_targets.region_layer)
        info.update(chosen_automatically=True, reason=layer_note)
    return info


def _environment(x: torch.Tensor) -> dict[str, Any]:
    """The versions, time and device of a call, for its provenance."""
    return {
        "medlens_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(x.device),
    }
