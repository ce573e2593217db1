"""Summary statistics for evaluation rows: means with seeded 95% bootstrap confidence intervals.

Non-finite values (an image without a region, say) are left out and `n` counts only the values used.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch


def bootstrap_ci(
    values: Union[torch.Tensor, Iterable[float]], seed: int = 0, n_boot: int = 1000, level: float = 0.95
) -> tuple[int, float, float, float]:
    """(n, mean, ci_low, ci_high): the mean of the finite values and its percentile bootstrap interval
    (`n_boot` resamples with replacement, drawn from a generator seeded with `seed`). One value gives a
    zero-width interval; no value gives NaNs and n = 0."""
    v = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values, dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    n = int(v.numel())
    if n == 0:
        nan = float("nan")
        return 0, nan, nan, nan
    mean = float(v.mean())
    if n == 1:
        return 1, mean, mean, mean
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (int(n_boot), n), generator=gen)
    means = v[idx].mean(dim=1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return n, mean, float(lo), float(hi)
