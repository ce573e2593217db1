"""The model loaded once in the processes executor's forkserver, before it forks the workers: imported there as a
preload module, it loads the model the driver named in `MEDLENS_FORKSERVER_MODEL`, and each worker takes it as is.

A forked worker shares the model's memory with the forkserver (copy on write) and starts in the time a fork takes
instead of importing torch and loading the weights itself (and the method families, imported here too). Only CPU
models: CUDA must not be set up before a fork. If the model cannot be loaded here, nothing is kept, and the worker
loads it itself and reports what went wrong.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

ENV = "MEDLENS_FORKSERVER_MODEL"
_LOADED: dict[str, Any] = {}


def preload_key(model_source: str, model_options: dict[str, Any], device: str) -> Optional[str]:
    """The text that names a model for the forkserver (None: not one to preload: not on the CPU, or options that are
    not JSON values or paths)."""
    if device != "cpu":
        return None
    try:
        return json.dumps([model_source, model_options, device], sort_keys=True,
                          default=lambda v: str(v) if isinstance(v, os.PathLike) else _refuse(v))
    except (TypeError, ValueError):
        return None


def _refuse(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def preloaded(key: Optional[str]) -> Any:
    """The model loaded in this process (the forkserver a worker was forked from) under `key`, or None."""
    return _LOADED.get(key) if key is not None else None


def _load_named() -> None:
    key = os.environ.get(ENV)
    if not key or key in _LOADED:
        return
    try:
        import torch

        from medlens.models.loading import load_model

        source, options, device = json.loads(key)
        torch.set_num_threads(1)  # no OpenMP thread team before the fork: each worker sets its own count
        model = load_model(source, **options).to(device)
    except Exception:  # noqa: BLE001 - the worker loads the model itself and says what is wrong
        return
    _LOADED[key] = model
    from medlens.core.registry import methods

    methods()  # every family imported (registered) here once, not by each worker on its first explanation


_load_named()
