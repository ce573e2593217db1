"""Turning provenance and settings into what `json.dumps` takes: the one JSON conversion in medlens.

Numbers, strings and None stay; numpy scalars become numbers, paths strings; small tensors and arrays lists,
larger tensors their shape (and, when asked, a short digest of their bytes); anything else its repr.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlens.core.digests import tensor_digest


def jsonable(value: Any, *, list_up_to: int = 64, digest_larger: bool = False) -> Any:
    """`value` as JSON-ready data: tensors of at most `list_up_to` elements as lists, larger ones as
    {"tensor": shape} (with the first 16 hex digits of their sha256 when `digest_larger`)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, list_up_to=list_up_to, digest_larger=digest_larger) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, list_up_to=list_up_to, digest_larger=digest_larger) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() <= list_up_to:
            return value.tolist()
        summary: dict[str, Any] = {"tensor": list(value.shape)}
        if digest_larger:
            summary["sha256"] = tensor_digest(value)[:16]
        return summary
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
