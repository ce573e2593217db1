"""Hygiene for one explanation call: hooks and temporary model changes that cannot outlive it.

`borrowed_model()` puts the model in eval mode with frozen parameters for the call, collects every hook
handle, and on exit (also on error) removes them and restores modes, `requires_grad` flags and `.grad`.
Borrowing is serialised across threads: calls from several threads run one at a time.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

from torch import nn


class HookSet:
    """The hook handles of one call; `remove()` detaches them all."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def forward(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self._handles.append(module.register_forward_hook(hook))

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self._handles.append(module.register_forward_pre_hook(hook))

    def full_backward(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self._handles.append(module.register_full_backward_hook(hook))

    def add(self, handle: Any) -> None:
        """Keep any removable handle (a tensor hook, a parametrisation undo) for removal at exit."""
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


# One lock for every borrow in the process, re-entrant for nested borrows in one thread. Per model would not do:
# two models can share modules, and guided backprop swaps torch's ReLU process-wide for its call. (A model whose
# forward waits on another thread that calls medlens.explain would deadlock; README says so.)
_BORROW_LOCK = threading.RLock()


@contextlib.contextmanager
def borrowed_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[HookSet]:
    """Borrow `model` for one call and give it back exactly as it was found.

    Inside the block the model is in eval mode (when `eval_mode`) and no parameter requires grad, so no
    method accumulates into `.grad` or builds a graph over the weights it does not need.
    """
    with _BORROW_LOCK:
        with _borrowed(model, eval_mode) as hooks:
            yield hooks


@contextlib.contextmanager
def _borrowed(model: nn.Module, eval_mode: bool) -> Iterator[HookSet]:
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    hooks = HookSet()
    # Only what differs is written (Module.__setattr__ is slow: on DenseNet121 writing every flag twice cost
    # about 2 ms a call); a model already in eval mode is not asked again.
    try:
        if eval_mode and any(mode for _, mode in modes):
            model.eval()
        for p, flag in zip(params, flags):
            if flag:
                p.requires_grad_(False)
        yield hooks
    finally:
        hooks.remove()
        for m, mode in modes:
            if m.training != mode:
                m.training = mode
        for p, flag, grad in zip(params, flags, grads):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not grad:
                p.grad = grad


def hook_count(model: nn.Module) -> int:
    """How many hooks hang on the model's modules (for tests and leak checks)."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(m, attr, {}) or {})
    return total
