"""Hygiene for one explanation call: hooks and temporary model changes that cannot outlive it.

`borrowed_model()` puts the model in eval mode with frozen parameters for the call, collects every hook
handle, and on exit (also on error) removes them and restores modes, `requires_grad` flags and `.grad`.
Borrowing is serialised per model: calls on one model wait for each other, calls on two models run at once.
`override_forward()` gives modules a temporary instance `forward` for one block (LRP, integrated gradients).
`module_tree()` lists a model's modules and parameters in one walk, which the borrow's hooks keep for the call.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

from torch import nn


class HookSet:
    """The hook handles of one call; `remove()` detaches them all. A borrow's set also knows the borrowed model's
    modules as walked when it was borrowed (`modules_of`), so the call's later steps need not walk them again."""

    def __init__(self, model: Optional[nn.Module] = None, modules: Optional[list[nn.Module]] = None) -> None:
        self._handles: list[Any] = []
        self._model, self._modules = model, modules

    def modules_of(self, model: nn.Module) -> list[nn.Module]:
        """`model`'s modules, itself first: the borrow's walk for the borrowed model, a new walk for any other."""
        if model is self._model and self._modules is not None:
            return self._modules
        return module_tree(model)[0]

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


class _LockTable:
    """One re-entrant lock per live object (module or parameter), found by identity, dropped when the object goes.

    Keyed by id() with a weak reference to check it, not by a WeakKeyDictionary: tensors compare elementwise. The
    sorted lock list of a model is cached and reused while its modules and parameters are the same objects.
    """

    def __init__(self) -> None:
        self._guard = threading.RLock()  # re-entrant: a weakref callback may run during a lookup (garbage collection)
        self._locks: dict[int, tuple[weakref.ref, threading.RLock]] = {}
        self._by_model: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list[threading.RLock]]]" = (
            weakref.WeakKeyDictionary())

    def _forget(self, key: int, ref: weakref.ref) -> None:
        with self._guard:
            if key in self._locks and self._locks[key][0] is ref:
                del self._locks[key]

    def locks_for(self, model: nn.Module, objects: list[Any]) -> list[threading.RLock]:
        """The locks of these objects (the model's modules and parameters), created on first use, in one global
        order (by the lock's id)."""
        signature = tuple(map(id, objects))
        with self._guard:
            cached = self._by_model.get(model)
            if cached is not None and cached[0] == signature:
                return cached[1]
            found: dict[int, threading.RLock] = {}
            for obj in objects:
                key = id(obj)
                entry = self._locks.get(key)
                if entry is None or entry[0]() is not obj:
                    ref = weakref.ref(obj, lambda r, key=key: self._forget(key, r))
                    entry = self._locks[key] = (ref, threading.RLock())
                found[id(entry[1])] = entry[1]
            locks = [found[k] for k in sorted(found)]
            self._by_model[model] = (signature, locks)
            return locks


# A lock per module and per parameter, since those are what a borrow changes (modes, hooks, requires_grad, .grad):
# two models that share a submodule or a parameter wait for each other; two separate models do not. Every borrow
# takes all its locks in one global order, so two borrows never hold part each and wait on the other. Re-entrant
# for nested borrows in one thread. (A model whose forward waits on another thread that explains the same model
# would wait for ever; README says so.)
_LOCKS = _LockTable()


@contextlib.contextmanager
def _held(locks: list[threading.RLock]) -> Iterator[None]:
    taken: list[threading.RLock] = []
    try:
        for lock in locks:
            lock.acquire()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()


def module_tree(model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """The model's modules (itself first, in `model.modules()`'s order) and its parameters, each once.

    The same objects as `list(model.modules())` and `list(model.parameters())`, in one walk over the `_modules` and
    `_parameters` dicts without the dotted names those build: on DenseNet121 (433 modules) about 2 ms less a call.

    Args:
        model: the module.

    Returns:
        (modules, parameters), shared ones listed once.
    """
    modules: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        modules.append(module)
        stack.extend(reversed([child for child in module._modules.values() if child is not None]))
    params: list[nn.Parameter] = []
    seen.clear()
    for module in modules:
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return modules, params


@contextlib.contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold `model` (every module and parameter of it) for this thread for the block."""
    with _held(_LOCKS.locks_for(model, [*model.modules(), *model.parameters()])):
        yield


@contextlib.contextmanager
def borrowed_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[HookSet]:
    """Borrow `model` for one call and give it back exactly as it was found.

    Inside the block the model is in eval mode (when `eval_mode`) and no parameter requires grad, so no
    method accumulates into `.grad` or builds a graph over the weights it does not need. Other threads
    borrowing the same model (or one sharing a module or parameter with it) wait until the block ends.
    """
    modules, params = module_tree(model)  # walked once for the locks and the borrow
    with _held(_LOCKS.locks_for(model, [*modules, *params])):
        with _borrowed(model, eval_mode, modules, params) as hooks:
            yield hooks


@contextlib.contextmanager
def _borrowed(model: nn.Module, eval_mode: bool, modules: list[nn.Module], params: list[nn.Parameter]) -> Iterator[HookSet]:
    modes = [(m, m.training) for m in modules]
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    hooks = HookSet(model, modules)
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


@contextlib.contextmanager
def override_forward(overrides: dict[nn.Module, Any]) -> Iterator[None]:
    """Give modules a temporary instance-level `forward`; the previous state (usually none) is restored in `finally`."""
    saved = [(m, "forward" in m.__dict__, m.__dict__.get("forward")) for m in overrides]
    try:
        for m, fn in overrides.items():
            m.forward = fn
        yield
    finally:
        for m, had, old in saved:
            if had:
                m.forward = old
            elif "forward" in m.__dict__:
                del m.__dict__["forward"]
