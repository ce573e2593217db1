"""The model's forward passes for the evaluation metrics: scores of many inputs in inference mode, batched.

Owns the folded fast forward's reuse across metric calls (built once per model and input shape, rebuilt when a
module, a hook or a folded weight or statistic of the model changes) and the scoring of distinct inputs only.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from medlens.accel import fast_forward as fast_forward_module
from medlens.accel.fast_forward import AGREEMENT, FastForward, fast_forward
from medlens.accel.heap import steady_heap
from medlens.core.model_description import describe
from medlens.core.model_state import borrowed_model
from medlens.errors import InputError
from medlens.evaluation.winograd import with_winograd

# Building the folded copy costs about three forwards of one image and saves about a third of each forward after
# it (brain-tumor-mri, CPU, one thread): below this many inputs the model runs as given, unless a copy is at hand.
FOLD_FROM = 8
# Inputs per forward, whatever the chunk: measured on the brain-tumor-mri model, one thread, a busy machine
# (benchmarks/bench_vs_quantus.py), deletion on 8 slices took 12.7 s in forwards of 8 or 16, 15.4 s of 32, 18.4 s of 64;
# in CPU time (load 10-19) 1.74-1.78 s in forwards of 16, 1.66-1.83 s of 32, 1.85 s of 64: no steady difference;
# again with the Winograd copy and the logits given (load 3.3): 1.49, 1.51, 1.53, 1.54 s in forwards of 8, 16, 32, 64.
FORWARD_BATCH = 16

@dataclass
class _Held:
    """A folded copy kept for later calls, and what it was built from."""

    modules: tuple[nn.Module, ...]  # the model's submodules when built (not the model itself: it is the weak key)
    signature: tuple
    # None: the model does not fold; only its layout is kept (the model itself as a value would never be let go)
    forward: Optional[FastForward]
    layout: bool
    baked: list[tuple[torch.Tensor, torch.Tensor]]  # (the model's tensor, a copy of it) of every module folded away


# model -> what was built for it. Weak keys: the copy goes with the model. Besides the copy (about the model's folded
# weights again in memory) it holds a copy of each tensor folded into it, to see changes made through `.data`.
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, _Held]" = weakref.WeakKeyDictionary()


def _signature(modules: tuple[nn.Module, ...], x: torch.Tensor) -> tuple:
    """What a folded copy depends on besides the module tree and the folded tensors' values: the hooks on the
    modules, the input's shape, type and device."""
    hooks = tuple(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    return (fast_forward_module.ENABLED, hooks, tuple(x.shape[1:]), x.dtype, x.device)


def _baked(model: nn.Module, forward: FastForward) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The parameters and buffers of the model's modules that the copy replaced (their values are baked into it);
    the copy's other modules are shallow copies that share the model's dictionaries of parameters and buffers."""
    out = []
    for name, module in model.named_modules():
        if forward.module.get_submodule(name)._parameters is not module._parameters:
            own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
            out += [(t, t.detach().clone()) for t in own]
    return out


def folded_forward(model: nn.Module, x: torch.Tensor, fold: bool = True) -> FastForward:
    """The folded fast forward of `model` for inputs like `x` (call inside `borrowed_model`, outside inference mode),
    its wide 3x3 convolutions as Winograd ones (`medlens.evaluation.winograd`):
    the copy an earlier call built when nothing it depends on has changed since (module tree, hooks, input shape,
    the folded tensors' values), else a new one, kept for the next call. `fold=False`: the copy at hand if there is
    one, else the model as given (building would not pay for a few inputs)."""
    modules = tuple(model.modules())[1:]
    signature = _signature((model, *modules), x)
    held = _FOLDED.get(model)
    if (held is not None and len(held.modules) == len(modules) and all(a is b for a, b in zip(held.modules, modules))
            and held.signature == signature and all(torch.equal(t, c) for t, c in held.baked)):
        return held.forward if held.forward is not None else FastForward(module=model, layout=held.layout)
    if not fold:
        return FastForward(module=model, layout=False)
    forward = fast_forward(model, x)
    if forward.module is not model:  # only where the model could be folded (a copy checked against it)
        forward = with_winograd(forward, x, AGREEMENT)
    folded = forward.module is not model
    _FOLDED[model] = _Held(modules, signature, forward if folded else None, forward.layout,
                           _baked(model, forward) if folded else [])
    return forward


@contextlib.contextmanager
def scoring(
    model: nn.Module, x: torch.Tensor, output: str = "probability", fold: bool = True
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """For the length of the block, a function (N, C, *s) -> (N, K) float32 scores of inputs like `x`:
    probabilities (softmax, or sigmoid when `model.multi_label`) or raw logits (`output="logit"`).

    The model is borrowed once (eval mode, restored after); the forwards run in inference mode, `FORWARD_BATCH`
    inputs at a time, through the folded fast forward the perturbation methods use (BatchNorm folded into the layer
    before it, channels-last; checked against the model on `x` when built, reused by later calls on the same model
    and input shape; `fold=False`: the model as given unless a copy is at hand), and the C heap is kept steady.
    Raises InputError for an unknown `output`."""
    if output not in ("probability", "logit"):
        raise InputError(f"output must be 'probability' or 'logit', not {output!r}.")
    multi = describe(model).multi_label
    with borrowed_model(model), steady_heap():
        forward = folded_forward(model, x, fold)  # built outside inference mode (it watches version counters)

        def score(batch: torch.Tensor) -> torch.Tensor:
            parts = [forward(batch[i:i + FORWARD_BATCH]) for i in range(0, batch.shape[0], FORWARD_BATCH)]
            logits = torch.cat(parts).float()
            if output == "probability":
                logits = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=1)
            return logits

        with torch.inference_mode():
            yield score


def distinct_rows(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, index): `batch` is `rows[index]`, rows its distinct inputs (bit for bit), in their first order: one
    row for a constant baseline, one per distinct value for a baseline that is constant per image (the scan's
    black, measured per image, takes a few values over a batch)."""
    B = batch.shape[0]
    if B <= 1:
        return batch, torch.arange(B, device=batch.device)
    if bool((batch == batch[:1]).all()):  # the common case, without a sort
        return batch[:1], torch.zeros(B, dtype=torch.long, device=batch.device)
    _, inverse = torch.unique(batch.reshape(B, -1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), B, dtype=torch.long, device=batch.device)
    first.scatter_reduce_(0, inverse, torch.arange(B, device=batch.device), reduce="amin")
    if first.numel() == B:
        return batch, torch.arange(B, device=batch.device)
    keep = first.sort().values  # the first image of each distinct row, in batch order
    where = torch.empty_like(first)
    where[inverse[keep]] = torch.arange(keep.numel(), device=batch.device)
    return batch[keep], where[inverse]


def model_scores(
    model: nn.Module, x: torch.Tensor, output: str = "probability", chunk: int = 64
) -> torch.Tensor:
    """(N, K) scores of `model` on `x` (see `scoring`; folded from `FOLD_FROM` inputs), in chunks of at most
    `chunk` inputs.

    Raises InputError for an unknown `output`."""
    with scoring(model, x, output, fold=x.shape[0] >= FOLD_FROM) as score:
        step = max(1, int(chunk))
        return torch.cat([score(x[i:i + step]) for i in range(0, x.shape[0], step)])


def given_scores(
    model: nn.Module, logits: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, output: str = "probability"
) -> torch.Tensor:
    """(B, K) float32 scores from logits the caller already has for the unperturbed inputs `x` (B, ...), e.g.
    `ExplanationResult.logits` or the logits `medlens evaluate` picks its targets with: the same scores `scoring`
    gives (softmax, or sigmoid when `model.multi_label`; raw for `output="logit"`), without running the model.

    Raises InputError when `logits` is not a (B, K) tensor for the B inputs with a column for every target, or
    for an unknown `output`."""
    if output not in ("probability", "logit"):
        raise InputError(f"output must be 'probability' or 'logit', not {output!r}.")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"logits must be the model's (B, K) output on the {x.shape[0]} inputs (as "
                         f"ExplanationResult.logits); got {got}.")
    if targets.numel() and int(targets.max()) >= logits.shape[1]:
        raise InputError(f"logits have {logits.shape[1]} classes but a target is class {int(targets.max())}: pass the "
                         f"model's logits on these inputs.")
    scores = logits.detach().to(device=x.device, dtype=torch.float32)
    if output == "probability":
        scores = torch.sigmoid(scores) if describe(model).multi_label else torch.softmax(scores, dim=1)
    return scores


def pick(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, K), targets (B, T) -> (B, T)."""
    return scores.gather(1, targets.to(scores.device))
