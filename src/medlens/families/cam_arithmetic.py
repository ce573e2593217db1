"""The arithmetic of the CAM family: what each CAM weighs the layer's activation with, and how that becomes a map.

A CAM is either channel weights (B, T, C) on the activation or an element-wise weighted activation (B, T, C, *s)
(`CamTerms`); its map is the channel sum (a matrix product for channel weights) or, with eigen smoothing, the
first principal component. Everything is batched over images and targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from medlens.tensor.spatial import spatial_dims

EPS = 1e-7


@dataclass
class CamTerms:
    """What a CAM weighs: `channel_weights` (B, T, C) on `activation` (B, C, *s), or `weighted` (B, T', C, *s).

    `weighted` may have T' = 1 for a map that is the same for every target (EigenCAM): it is computed once
    and repeated for the T targets.
    """

    activation: torch.Tensor
    channel_weights: Optional[torch.Tensor] = None
    weighted: Optional[torch.Tensor] = None

    def full(self) -> torch.Tensor:
        """The per-channel weighted activation (B, T', C, *s)."""
        if self.weighted is not None:
            return self.weighted
        w = self.channel_weights
        return w.reshape(*w.shape, *([1] * (self.activation.dim() - 2))) * self.activation[:, None]

    def channel_sum(self) -> torch.Tensor:
        """The sum over channels (B, T', *s); for channel weights one matrix product, not a (B, T, C, *s) tensor."""
        if self.weighted is not None:
            return self.weighted.sum(dim=2)
        a = self.activation
        flat = torch.matmul(self.channel_weights, a.reshape(a.shape[0], a.shape[1], -1))  # (B, T, N)
        return flat.reshape(*flat.shape[:2], *a.shape[2:])

    def maps(self, eigen_smooth: bool, n_targets: int) -> torch.Tensor:
        """(B, n_targets, *s): the channel sum, or the first principal component with `eigen_smooth`."""
        maps = first_component(self.full(), self.channel_sum()) if eigen_smooth else self.channel_sum()
        if maps.shape[1] != n_targets:
            maps = maps.expand(maps.shape[0], n_targets, *maps.shape[2:]).contiguous()
        return maps


class GradientTerms:
    """The activation A (B, C, *s) and the target gradients G (B, T, C, *s) at the target layer, with the products
    several gradient CAMs use (G * A, ReLU(G)) computed once per call."""

    def __init__(self, activation: torch.Tensor, gradients: torch.Tensor) -> None:
        self.activation = activation
        self.gradients = gradients
        self._product: Optional[torch.Tensor] = None
        self._positive: Optional[torch.Tensor] = None

    @property
    def product(self) -> torch.Tensor:
        if self._product is None:
            self._product = self.gradients * self.activation[:, None]
        return self._product

    @property
    def positive(self) -> torch.Tensor:
        if self._positive is None:
            self._positive = F.relu(self.gradients)
        return self._positive

    def spatial_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=spatial_dims(t, 3))


Weigher = Callable[[GradientTerms], CamTerms]


def gradcam(terms: GradientTerms) -> CamTerms:
    g = terms.gradients
    return CamTerms(terms.activation, channel_weights=g.mean(dim=spatial_dims(g, 3)))


def hirescam(terms: GradientTerms) -> CamTerms:
    return CamTerms(terms.activation, weighted=terms.product)


def xgradcam(terms: GradientTerms) -> CamTerms:
    a = terms.activation
    weights = terms.spatial_sum(terms.product) / (a.sum(dim=spatial_dims(a, 2))[:, None] + EPS)
    return CamTerms(a, channel_weights=weights)


def gradcam_plus_plus(terms: GradientTerms) -> CamTerms:
    """alpha = G^2 / (2 G^2 + sum(A) G^3 + eps) where G != 0, weights = sum over space of ReLU(G) alpha.

    Written with in-place steps in an order that gives the textbook expression's values bit for bit (products
    and sums are commutative in IEEE arithmetic, and 2 G^2 is exact).
    """
    g, a = terms.gradients, terms.activation
    sum_a = a.sum(dim=spatial_dims(a, 2), keepdim=True)[:, None]  # (B, 1, C, 1...)
    g2 = g.pow(2)
    denominator = (g2 * g).mul_(sum_a).add_(g2, alpha=2).add_(EPS)
    alpha = g2.div_(denominator)
    if not bool(torch.isfinite(sum_a).all()):  # only then can alpha be non-zero where G = 0
        alpha.masked_fill_(g == 0, 0)
    return CamTerms(a, channel_weights=terms.spatial_sum(alpha.mul_(terms.positive)))


def layercam(terms: GradientTerms) -> CamTerms:
    return CamTerms(terms.activation, weighted=terms.positive * terms.activation[:, None])


def first_component(weighted: torch.Tensor, channel_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project (B, T, C, *s) onto its first principal component over channels: (B, T, *s).

    The projection on the first right singular vector of the centred (positions x channels) matrix X, X v1 = s1 u1,
    comes from the top eigenvector of the smaller Gram matrix, in float64, batched over images and targets: the
    same values as an SVD (up to sign). Singular-vector signs are arbitrary; each map is oriented to agree with
    the plain channel sum (`channel_sum`, computed when not given), so an eigen-smoothed map keeps the sign of
    its ordinary map.
    """
    b, t, c = weighted.shape[:3]
    spatial = weighted.shape[3:]
    x = weighted.reshape(b * t, c, -1).double()  # (BT, C, N): converted in memory order, then centred over positions
    if x.data_ptr() == weighted.data_ptr():  # already float64, no copy made: centre a copy, never the caller's tensor
        x = x.clone()
    x.sub_(x.mean(dim=2, keepdim=True))
    if x.shape[2] <= x.shape[1]:
        gram = x.transpose(1, 2) @ x  # (BT, N, N)
        top, vector = top_eigenpair(gram)
        projection = vector * top[:, None].clamp_min(0).sqrt()
    else:
        _, vector = top_eigenpair(x @ x.transpose(1, 2))  # (BT, C, C)
        projection = torch.einsum("bcn,bc->bn", x, vector)
    if channel_sum is None:
        channel_sum = weighted.sum(dim=2)
    reference = channel_sum.reshape(b * t, -1).double()
    reference = reference - reference.mean(dim=1, keepdim=True)
    sign = torch.sign((projection * reference).sum(dim=1, keepdim=True))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (projection * sign).to(weighted.dtype).reshape(b, t, *spatial)


LU_LIMIT = 128  # the largest Gram matrix (a CNN's 7 x 7 or 14 x 14 grid) taken through inverse iteration


def top_eigenpair(gram: torch.Tensor, tolerance: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest eigenvalue (M,) and a unit eigenvector (M, n) of each symmetric (M, n, n) float64 matrix.

    The eigenvalues alone (`eigvalsh`, about half the time of `eigh`), then the vector by two steps of inverse
    iteration shifted just above the top eigenvalue, and a certificate: for a symmetric matrix the angle to
    the true eigenvector is at most |G v - l1 v| / (l1 - l2), which must stay below `tolerance`. Matrices that
    fail it (a repeated top eigenvalue, a zero matrix) get `eigh`'s vector, as before.
    """
    n = gram.shape[-1]
    if n > LU_LIMIT:  # oneMKL's batched LU of large matrices fails with two threads and prints to stderr: eigh
        values, vectors = torch.linalg.eigh(gram)
        return values[:, -1], vectors[..., -1]
    values = torch.linalg.eigvalsh(gram)  # ascending
    top = values[:, -1]
    if n == 1:
        return top, torch.ones_like(gram[:, 0])
    scale = values.abs().amax(dim=1)
    shifted = gram - (top + 1e-13 * scale)[:, None, None] * torch.eye(n, dtype=gram.dtype, device=gram.device)
    vector = torch.linspace(1.0, 2.0, n, dtype=gram.dtype, device=gram.device).expand(gram.shape[0], n)[..., None]
    try:
        lu, pivots, _ = torch.linalg.lu_factor_ex(shifted)
        for _ in range(2):
            vector = torch.linalg.lu_solve(lu, pivots, vector)
            vector = vector / vector.norm(dim=1, keepdim=True)
    except RuntimeError:
        # Seen with two threads on a batch of 196 x 196 Gram matrices (a ViT's token grid, now above LU_LIMIT):
        # oneMKL's batched LU handed back invalid pivots. eigh gives the same vector.
        return top, torch.linalg.eigh(gram)[1][..., -1]
    vector = vector[..., 0]
    residual = ((gram @ vector[..., None])[..., 0] - top[:, None] * vector).norm(dim=1)
    certified = torch.isfinite(vector).all(dim=1) & (residual <= tolerance * (top - values[:, -2]))
    if not bool(certified.all()):
        failed = ~certified
        vector = vector.clone()
        vector[failed] = torch.linalg.eigh(gram[failed])[1][..., -1]
    return top, vector
