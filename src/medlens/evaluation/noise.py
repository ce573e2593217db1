"""Noise seeds of the metrics that perturb images (max-sensitivity, ROAD): from the call's seed and the image's own
values, so an image gets the same noise in any batch, at any place in it, and different images get independent noise.
"""
from __future__ import annotations

import hashlib
import struct

import torch


def image_key(image: torch.Tensor) -> bytes:
    """A digest of one image's values (its dtype and shape included)."""
    values = image.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{values.dtype}{tuple(values.shape)}".encode())
    h.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return h.digest()


def noise_generator(seed: int, key: bytes, *parts: int) -> torch.Generator:
    """A generator seeded from the call's `seed`, an image's `image_key` and `parts` (a target slot, a step)."""
    h = hashlib.sha256(key)
    # any integer seed (a 64-bit one as torch takes it, a negative one): each number as its 64-bit pattern
    h.update(struct.pack(f"<{1 + len(parts)}Q", *(int(v) % 2**64 for v in (seed, *parts))))
    return torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") & (2**63 - 1))


__all__ = ["image_key", "noise_generator"]
