"""Digests for provenance: the sha256 of a model's parameters and buffers (cached) and of a tensor's bytes."""
from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch
from torch import nn

_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, str]]" = weakref.WeakKeyDictionary()


def model_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers, cached until one of them changes."""
    tensors = list(model.state_dict(keep_vars=True).values())
    key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)
    cached = _DIGESTS.get(model)
    if cached and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    _DIGESTS[model] = (key, digest)
    return digest


def tensor_digest(x: torch.Tensor) -> str:
    """sha256 of the tensor's bytes (any dtype, bfloat16 included: numpy has none, so the bytes are read as uint8)."""
    flat = x.detach().cpu().contiguous().view(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()
