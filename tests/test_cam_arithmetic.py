"""CAM arithmetic against the textbook expressions: each gradient CAM's weighted activation, the channel sum by a
matrix product, Grad-CAM++ bit for bit, the batched first principal component against an SVD, and the
separable resize against F.interpolate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medlens.tensor.spatial import upsample_to
from medlens.families import cam_arithmetic as ca


def _terms(dims: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grid = (5, 6) if dims == 2 else (3, 4, 5)
    a = torch.randn(2, 7, *grid, generator=gen)  # signed, like a pre-activation map (DenseNet's norm5)
    g = torch.randn(2, 3, 7, *grid, generator=gen)
    g[g.abs() < 0.3] = 0  # exact zeros, as behind a ReLU
    return a, g


def _textbook(name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The pre-change formulas (A as (B, 1, C, *s)), written out: the weighted activation (B, T, C, *s)."""
    a = a[:, None]
    dims = tuple(range(3, g.dim()))
    if name == "gradcam":
        return g.mean(dim=dims, keepdim=True) * a
    if name == "hirescam":
        return g * a
    if name == "xgradcam":
        return (g * a).sum(dim=dims, keepdim=True) / (a.sum(dim=dims, keepdim=True) + 1e-7) * a
    if name == "layercam":
        return F.relu(g) * a
    g2, g3 = g.pow(2), g.pow(2) * g
    alpha = g2 / (2 * g2 + a.sum(dim=dims, keepdim=True) * g3 + 1e-7)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (F.relu(g) * alpha).sum(dim=dims, keepdim=True) * a


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"])
def test_each_gradient_cam_equals_its_textbook_formula(name, dims):
    a, g = _terms(dims)
    weigh = {"gradcam": ca.gradcam, "gradcam++": ca.gradcam_plus_plus, "xgradcam": ca.xgradcam,
             "hirescam": ca.hirescam, "layercam": ca.layercam}[name]
    terms = weigh(ca.GradientTerms(a, g))
    expected = _textbook(name, a, g)
    torch.testing.assert_close(terms.full(), expected, rtol=1e-6, atol=1e-7)
    # the channel sum by a matrix product equals the sum of the full tensor
    torch.testing.assert_close(terms.maps(False, 3), expected.sum(dim=2), rtol=1e-5, atol=1e-6)


def _textbook_plus_plus_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(3, g.dim()))
    g2, g3 = g.pow(2), g.pow(2) * g
    alpha = g2 / (2 * g2 + a[:, None].sum(dim=dims, keepdim=True) * g3 + 1e-7)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (F.relu(g) * alpha).sum(dim=dims)


def test_gradcam_plus_plus_weights_are_the_textbook_values_bit_for_bit():
    a, g = _terms(2, seed=3)
    a[0] -= 3.0  # a negative activation sum for one image: 2 G^2 + sum(A) G^3 changes sign where G > 0
    weights = ca.gradcam_plus_plus(ca.GradientTerms(a, g)).channel_weights
    assert torch.equal(weights, _textbook_plus_plus_weights(a, g))


def test_gradcam_plus_plus_with_an_infinite_activation_sum_matches_the_textbook_where():
    a, g = _terms(2, seed=4)
    a[1, 2, 0, 0] = float("inf")  # sum(A) * G^3 is NaN where G = 0: the textbook's where() zeroes alpha there
    weights = ca.gradcam_plus_plus(ca.GradientTerms(a, g)).channel_weights
    torch.testing.assert_close(weights, _textbook_plus_plus_weights(a, g), rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(weights).all()


def _svd_first_component(weighted: torch.Tensor) -> torch.Tensor:
    """Slow reference: per map, SVD of the centred (positions x channels) matrix, projection on v1, sign of the sum."""
    b, t, c = weighted.shape[:3]
    out = torch.empty(b, t, *weighted.shape[3:], dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            x = weighted[i, j].reshape(c, -1).T.double()
            x = x - x.mean(dim=0)
            _, _, vh = torch.linalg.svd(x, full_matrices=False)
            p = x @ vh[0]
            ref = weighted[i, j].sum(0).reshape(-1).double()
            if (p * (ref - ref.mean())).sum() < 0:
                p = -p
            out[i, j] = p.reshape(weighted.shape[3:])
    return out


@pytest.mark.parametrize("shape", [(2, 3, 16, 5, 6), (1, 4, 8, 3, 4, 5), (1, 2, 40, 2, 3)])
def test_first_component_equals_an_svd_per_map(shape):
    weighted = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    ours = ca.first_component(weighted)
    ref = _svd_first_component(weighted)
    assert (ours.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_eigencam_terms_shared_over_targets_equal_the_per_target_computation():
    a = torch.randn(2, 9, 4, 4, generator=torch.Generator().manual_seed(6))
    once = ca.CamTerms(a, weighted=a[:, None]).maps(True, 3)
    per_target = ca.first_component(a[:, None].expand(-1, 3, -1, -1, -1))
    assert once.shape == (2, 3, 4, 4) and once.is_contiguous()
    assert torch.equal(once, per_target)


@pytest.mark.parametrize("shape,size", [
    ((1, 14, 7, 7), (224, 224)), ((2, 3, 5, 9), (31, 17)), ((1, 2, 4, 6, 5), (9, 33, 7)), ((2, 3, 7), (50,)),
    ((1, 3, 7, 7), (5, 3)), ((1, 1, 3, 3, 3), (97, 64, 33)), ((1, 2, 16, 13), (300, 301)),
])
def test_separable_resize_equals_f_interpolate(shape, size):
    maps = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    ref = F.interpolate(maps.double(), size=size, mode=mode, align_corners=False)
    ours64 = upsample_to(maps.double(), size)
    assert (ours64 - ref).abs().max() <= 1e-12 * ref.abs().max()
    ref32 = F.interpolate(maps, size=size, mode=mode, align_corners=False)
    assert (upsample_to(maps, size) - ref32).abs().max() <= 1e-6 * ref32.abs().max()


def test_large_grids_and_other_dtypes_keep_f_interpolate():
    big = torch.randn(1, 2, 40, 40)
    assert torch.equal(upsample_to(big, (80, 80)), F.interpolate(big, size=(80, 80), mode="bilinear", align_corners=False))
    half = torch.randn(1, 2, 7, 7).to(torch.bfloat16)
    assert torch.equal(upsample_to(half, (14, 14)), F.interpolate(half, size=(14, 14), mode="bilinear", align_corners=False))


def test_top_eigenpair_falls_back_to_eigh_when_the_lu_path_fails(monkeypatch):
    import medlens.families.cam_arithmetic as arithmetic

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, 6, dtype=torch.float64, generator=gen)
    gram = a @ a.transpose(1, 2)

    def broken(*args, **kwargs):  # oneMKL's batched LU handing back invalid pivots (two threads, ViT-sized grams)
        raise RuntimeError("Pivots given to lu_solve must all be greater or equal to 1.")

    monkeypatch.setattr(arithmetic.torch.linalg, "lu_factor_ex", broken)
    top, vector = arithmetic.top_eigenpair(gram)
    values, vectors = torch.linalg.eigh(gram)
    torch.testing.assert_close(top, values[:, -1])
    torch.testing.assert_close((vector * vectors[..., -1]).sum(dim=1).abs(), torch.ones(3, dtype=torch.float64))


def test_top_eigenpair_of_large_grams_never_calls_the_batched_lu(monkeypatch):
    import medlens.families.cam_arithmetic as arithmetic

    gen = torch.Generator().manual_seed(1)
    n = arithmetic.LU_LIMIT + 1  # a ViT's 14 x 14 token grid is 196
    a = torch.randn(2, n, n, dtype=torch.float64, generator=gen)
    gram = a @ a.transpose(1, 2)

    def refuse(*args, **kwargs):  # with two threads oneMKL prints errors to stderr for these sizes
        raise AssertionError("the batched LU was called on a Gram matrix above LU_LIMIT")

    monkeypatch.setattr(arithmetic.torch.linalg, "lu_factor_ex", refuse)
    top, vector = arithmetic.top_eigenpair(gram)
    values, vectors = torch.linalg.eigh(gram)
    torch.testing.assert_close(top, values[:, -1])
    torch.testing.assert_close((vector * vectors[..., -1]).sum(dim=1).abs(), torch.ones(2, dtype=torch.float64))
