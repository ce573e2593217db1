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


def uniform_per_image(x: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """`samples` draws of uniform [0, 1) noise shaped like each image of `x`, each image's from its own generator
    (`noise_generator(seed, image_key(image))`, the draws of one image in sample order).

    Args:
        x: (B, C, *s) images.
        samples: how many draws per image.
        seed: the call's seed.

    Returns:
        (samples, B, C, *s) float32 on the CPU.
    """
    u = torch.empty((int(samples),) + tuple(x.shape), dtype=torch.float32)
    for b in range(x.shape[0]):
        gen = noise_generator(int(seed), image_key(x[b]))
        for k in range(int(samples)):
            u[k, b] = torch.rand(x.shape[1:], generator=gen, dtype=torch.float32)
    return u


__all__ = ["image_key", "noise_generator", "uniform_per_image"]
