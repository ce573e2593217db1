"""Tests of the perturbation family (occlusion, rise, lime, kernelshap): oracles, axioms and hygiene.

captum's Occlusion is the oracle for occlusion; brute-force Shapley values over every coalition are the
oracle for kernelshap; linear and one-region models check what the maps must show.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import medlens
from medlens.errors import MethodError
from medlens.core.baselines import resolve_baseline
from medlens.families.perturbation import rise_masks, window_starts
from medlens.families.surrogate import grid_segments, shapley_coalitions, superpixels
from medlens.core.model_state import hook_count

PERTURBATION = ("occlusion", "rise", "lime", "kernelshap")
SMALL = {
    "occlusion": dict(window=6, stride=4),
    "rise": dict(n_masks=64),
    "lime": dict(num_samples=64, n_segments=9),
    "kernelshap": dict(num_samples=64, n_segments=9),
}


class CellLinear(nn.Module):
    """logit_k = sum over pixels of w_k(pixel) * x, with w constant on each cell of a 4x4 grid of a 32x32 image."""

    def __init__(self, cell_weights: torch.Tensor) -> None:  # (K, 4, 4)
        super().__init__()
        w = cell_weights.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # (K, 32, 32)
        self.weight = nn.Parameter(w.reshape(w.shape[0], -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T / 64.0


class OneRegion(nn.Module):
    """Looks only at the top-left 12x12 (or 12^3) corner: logit 0 = mean intensity there, logit 1 = its negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[(slice(None), slice(None)) + (slice(0, 12),) * (x.dim() - 2)]
        m = corner.flatten(1).mean(1) * 4
        return torch.stack([m, -m], dim=1)


def _x2d(b: int = 2, c: int = 1, size: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, size, size, generator=gen)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# --------------------------------------------------------------------------------------------- registry
def test_registry_metadata_is_honest():
    for name in PERTURBATION:
        info = medlens.method_info(name)
        assert info["family"] == "perturbation"
        assert info["needs_gradients"] is False and info["needs_layer"] is False
        assert info["supports_3d"] is True
        assert info["stochastic"] is (name != "occlusion")
    assert {"window", "stride", "baseline"} <= set(medlens.method_info("occlusion")["options"])
    assert {"n_masks", "cell_size", "p_keep"} <= set(medlens.method_info("rise")["options"])
    assert {"num_samples", "n_segments", "baseline", "kernel_width"} <= set(medlens.method_info("lime")["options"])
    assert {"num_samples", "n_segments", "baseline"} <= set(medlens.method_info("kernelshap")["options"])


# ------------------------------------------------------------------------------- occlusion vs captum
def _captum_occlusion(model, x, targets, window, stride, baseline):
    from captum.attr import Occlusion

    occ = Occlusion(model)
    c = x.shape[1]
    maps = []
    for t in range(targets.shape[1]):
        maps.append(occ.attribute(
            x, sliding_window_shapes=(c, *window), strides=(c, *stride), baselines=baseline,
            target=targets[:, t].tolist(), perturbations_per_eval=64,
        ))
    return torch.stack(maps, dim=1)[:, :, 0] if c == 1 else torch.stack(maps, dim=1)


@pytest.mark.parametrize("baseline", ["zero", "blur", 0.5])
def test_occlusion_equals_captum_2d(tiny2d, baseline):
    x = _x2d(2, 1, 21)  # (21 - 5) / 3 is not whole: the last window is cut at the edge, as in captum
    targets = [[0, 2], [1, 0]]
    res = medlens.explain(tiny2d, x, "occlusion", targets=targets, window=5, stride=3, baseline=baseline, batch_size=17)
    ref, _ = resolve_baseline(x, baseline)
    expected = _captum_occlusion(tiny2d, x, res.targets, (5, 5), (3, 3), ref.expand_as(x).clone())
    # captum returns one map per channel; with one channel they are the spatial map itself
    torch.testing.assert_close(res["occlusion"], expected.reshape(res["occlusion"].shape), rtol=1e-5, atol=1e-6)
    assert res.provenance["methods"]["occlusion"]["baseline"] == baseline


def test_occlusion_equals_captum_multichannel_and_rectangular(tiny2d):
    torch.manual_seed(1)
    model = type(tiny2d)(in_channels=3).eval()
    x = _x2d(1, 3, 20)
    res = medlens.explain(model, x, "occlusion", targets=[1], window=(4, 6), stride=(2, 5))
    expected = _captum_occlusion(model, x, res.targets, (4, 6), (2, 5), 0.0)  # (1, T, C, H, W), same over C
    torch.testing.assert_close(expected[:, :, 0], expected[:, :, 2])
    torch.testing.assert_close(res["occlusion"], expected[:, :, 0], rtol=1e-5, atol=1e-6)


def test_occlusion_equals_captum_3d(tiny3d):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 10, 12, 11, generator=gen)
    res = medlens.explain(tiny3d, x, "occlusion", targets=[0, 2], window=(4, 4, 5), stride=(2, 3, 4), baseline="mean")
    ref, _ = resolve_baseline(x, "mean")
    expected = _captum_occlusion(tiny3d, x, res.targets, (4, 4, 5), (2, 3, 4), ref.expand_as(x).clone())
    torch.testing.assert_close(res["occlusion"], expected.reshape(res["occlusion"].shape), rtol=1e-5, atol=1e-6)


def test_window_starts_cover_the_axis():
    assert window_starts(26, 5, 3) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert window_starts(8, 8, 4) == [0]


# -------------------------------------------------------------------------------- kernelshap oracles
def _brute_force_shapley(model, x, ref, labels, target):
    """Shapley values of the features in `labels` by enumerating all 2^m coalitions (the textbook formula)."""
    m = int(labels.max()) + 1
    codes = torch.arange(2**m)
    z = ((codes[:, None] >> torch.arange(m)) & 1).float()
    keep = z[:, labels].unsqueeze(1)
    with torch.no_grad():
        v = model(ref + (x - ref) * keep)[:, target].double()
    phi = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        for code in range(2**m):
            if code >> i & 1:
                continue
            s = bin(code).count("1")
            weight = math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
            phi[i] += weight * (v[code | (1 << i)] - v[code])
    return phi, v[2**m - 1] - v[0]


def test_kernelshap_matches_exact_shapley_values(tiny2d):
    x = _x2d(1, 1, 24, seed=5)
    res = medlens.explain(tiny2d, x, "kernelshap", targets=[0, 1], seed=0, num_samples=600, n_segments=9,
                          segmentation="grid", baseline="zero")
    notes = res.provenance["methods"]["kernelshap"]
    assert notes["exact"] == [True] and notes["n_features"] == [9]
    labels = grid_segments((24, 24), 9, x.device)
    for slot in range(2):
        phi_exact, gap = _brute_force_shapley(tiny2d, x, torch.zeros_like(x), labels, int(res.targets[0, slot]))
        phi = torch.tensor(notes["feature_attributions"][0][slot], dtype=torch.float64)
        torch.testing.assert_close(phi, phi_exact, rtol=1e-4, atol=1e-6)
        assert abs(notes["attribution_sum"][0][slot] - float(gap)) < 1e-4
        # the map spreads each feature's value over its pixels, so the map itself sums to the gap
        assert abs(float(res["kernelshap"][0, slot].double().sum()) - float(gap)) < 1e-4


@pytest.mark.parametrize("output", ["logit", "probability"])
def test_kernelshap_efficiency_when_sampling(tiny2d, output):
    x = _x2d(2, 1, 24, seed=6)
    res = medlens.explain(tiny2d, x, "kernelshap", targets=[0, 2], seed=1, num_samples=120, n_segments=16,
                          segmentation="grid", baseline="blur", output=output)
    notes = res.provenance["methods"]["kernelshap"]
    assert notes["exact"] == [False, False]
    assert all(e <= 121 for e in notes["model_evaluations"])
    for i in range(2):
        for s in range(2):
            assert abs(notes["attribution_sum"][i][s] - notes["output_gap"][i][s]) < 1e-4
            assert abs(float(res["kernelshap"][i, s].double().sum()) - notes["output_gap"][i][s]) < 1e-4
    # output_gap is f(x) - f(baseline) with f the logit, or the softmax probability
    f_x = res.logits if output == "logit" else torch.softmax(res.logits, 1)
    for i in range(2):
        for s in range(2):
            f_b = notes["baseline_output"][i][s]
            assert abs(float(f_x[i, res.targets[i, s]]) - f_b - notes["output_gap"][i][s]) < 1e-5


def test_shapley_coalitions_enumerate_outer_sizes_and_pair_the_rest():
    gen = torch.Generator().manual_seed(0)
    z, w, exact = shapley_coalitions(12, 200, gen, torch.device("cpu"))
    assert not exact and z.shape[0] <= 200
    sizes = z.sum(1)
    assert int((sizes == 1).sum()) == 12 and int((sizes == 11).sum()) == 12  # fully enumerated
    sampled = z[24:]
    torch.testing.assert_close(sampled[0::2] + sampled[1::2], torch.ones_like(sampled[0::2]))  # antithetic pairs
    assert abs(float(w.sum()) - 1.0) < 1e-9


# --------------------------------------------------------------------------------------- linear model
@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_surrogates_recover_linear_weights_ranking(method):
    gen = torch.Generator().manual_seed(2)
    cell_w = torch.randperm(16, generator=gen).float().reshape(1, 4, 4) - 7.5  # distinct, signed
    model = CellLinear(torch.cat([cell_w, -cell_w]))
    x = torch.ones(1, 1, 32, 32)
    res = medlens.explain(model, x, method, targets=[0], seed=3, num_samples=400, n_segments=16,
                          segmentation="grid", baseline="zero")
    cell_values = res[method][0, 0].reshape(4, 8, 4, 8)[:, 0, :, 0].reshape(-1)
    assert _spearman(cell_values, cell_w.reshape(-1)) == pytest.approx(1.0)
    if method == "kernelshap":  # a linear model's Shapley values are its exact contributions
        torch.testing.assert_close(cell_values.double() * 64, cell_w.reshape(-1).double(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ one-region model
@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_mass_lands_on_the_region_the_model_reads_2d(method):
    x = torch.ones(1, 1, 36, 36) + 0.1 * _x2d(1, 1, 36)
    opts = dict(window=6, stride=3) if method == "occlusion" else dict(n_masks=400, cell_size=6, p_keep=0.5)
    sal = medlens.explain(OneRegion(), x, method, targets=[0], seed=0, **opts)[method][0, 0]
    inside = torch.zeros(36, 36, dtype=torch.bool)
    inside[:12, :12] = True
    if method == "occlusion":
        assert float(sal[inside].clamp_min(0).sum()) / float(sal.clamp_min(0).sum()) > 0.8
        assert float(sal[20:, 20:].abs().max()) == 0.0  # windows that never touch the corner change nothing
    else:
        # RISE carries a constant offset E[f]; the region must stand above everything far from it
        assert float(sal[:8, :8].min()) > float(sal[24:, 24:].max())
        assert int(sal.argmax()) in inside.reshape(-1).nonzero().reshape(-1).tolist()


def test_mass_lands_on_the_region_3d():
    x = torch.ones(1, 1, 24, 24, 24)
    model = OneRegion()
    occ = medlens.explain(model, x, "occlusion", targets=[0], window=6, stride=6)["occlusion"][0, 0]
    assert float(occ[:12, :12, :12].sum()) / float(occ.clamp_min(0).sum()) == pytest.approx(1.0)
    rise = medlens.explain(model, x, "rise", targets=[0], seed=0, n_masks=300, cell_size=6)["rise"][0, 0]
    assert float(rise[:8, :8, :8].mean()) > float(rise[16:, 16:, 16:].mean()) + 0.3 * float(rise.std())


# ------------------------------------------------------------------------------- seeds, targets, batch
@pytest.mark.parametrize("method", ["rise", "lime", "kernelshap"])
def test_same_seed_same_map_other_seed_differs(tiny2d, method):
    x = _x2d(1, 1, 24, seed=8)
    opts = dict(SMALL[method])
    if method == "kernelshap":
        opts.update(n_segments=16, segmentation="grid")  # 2^16 > 64 samples: really sampled
    a = medlens.explain(tiny2d, x, method, targets=[0], seed=11, **opts)[method]
    b = medlens.explain(tiny2d, x, method, targets=[0], seed=11, **opts)[method]
    c = medlens.explain(tiny2d, x, method, targets=[0], seed=12, **opts)[method]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", PERTURBATION)
def test_all_targets_from_one_set_of_evaluations_equal_separate_calls(tiny2d, method):
    x = _x2d(2, 1, 24, seed=9)
    calls = {"n": 0}

    def counting(_m, _i, _o):
        calls["n"] += 1

    handle = tiny2d.register_forward_hook(counting)
    try:
        joint = medlens.explain(tiny2d, x, method, targets=[0, 1, 2], seed=4, batch_size=16, **SMALL[method])
        joint_calls = calls["n"]
        calls["n"] = 0
        single = [medlens.explain(tiny2d, x, method, targets=[t], seed=4, batch_size=16, **SMALL[method])[method]
                  for t in range(3)]
        assert calls["n"] == 3 * joint_calls  # three targets cost the evaluations of one
    finally:
        handle.remove()
    torch.testing.assert_close(joint[method], torch.cat(single, dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", PERTURBATION)
def test_batch_size_changes_memory_not_values(tiny2d, method):
    x = _x2d(1, 1, 24, seed=10)
    a = medlens.explain(tiny2d, x, method, targets=[0], seed=5, batch_size=5, **SMALL[method])[method]
    b = medlens.explain(tiny2d, x, method, targets=[0], seed=5, batch_size=64, **SMALL[method])[method]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_global_rng_untouched(tiny2d):
    x = _x2d(1, 1, 24)
    state = torch.get_rng_state()
    medlens.explain(tiny2d, x, ["rise", "lime", "kernelshap"], targets=[0], seed=1,
                    n_masks=16, num_samples=16, n_segments=4)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------- hygiene, UX
def test_progress_bar_does_not_break_non_tty_runs(tiny2d, capsys):
    x = _x2d(1, 1, 24)
    shown = medlens.explain(tiny2d, x, "rise", targets=[0], seed=2, n_masks=40, progress=True)["rise"]
    quiet = medlens.explain(tiny2d, x, "rise", targets=[0], seed=2, n_masks=40)["rise"]
    auto = capsys.readouterr()
    assert torch.equal(shown, quiet)
    assert "rise" in auto.err  # the forced bar went to stderr
    medlens.explain(tiny2d, x, "rise", targets=[0], seed=2, n_masks=400)  # long, but stderr is not a TTY
    assert capsys.readouterr().err == ""


class Interrupting(nn.Module):
    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner(x)


@pytest.mark.parametrize("method", PERTURBATION)
def test_ctrl_c_stops_cleanly(tiny2d, method):
    model = Interrupting(tiny2d, after=2)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        medlens.explain(model, _x2d(1, 1, 24), method, targets=[0], seed=0, batch_size=4, progress=True, **SMALL[method])
    assert hook_count(model) == 0
    assert model.training and model.inner.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", PERTURBATION)
def test_model_left_as_found_and_maps_are_raw(tiny2d, method):
    before = {k: v.clone() for k, v in tiny2d.state_dict().items()}
    tiny2d.train()
    res = medlens.explain(tiny2d, _x2d(2, 1, 24), method, targets=[0, 1], seed=0, **SMALL[method])
    assert tiny2d.training and hook_count(tiny2d) == 0
    assert all(torch.equal(before[k], v) for k, v in tiny2d.state_dict().items())
    sal = res[method]
    assert sal.dtype == torch.float32 and sal.shape == (2, 2, 24, 24) and torch.isfinite(sal).all()
    assert not torch.is_inference(sal)


def test_lime_slic_on_grayscale_and_3d_and_top_regions(tiny2d, tiny3d):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    phantom = (((xx**2 + yy**2) < 0.5).float() + 0.05 * _x2d(1, 1, 48)[0, 0])[None, None]
    res = medlens.explain(tiny2d, phantom, "lime", targets=[0, 1], seed=0, num_samples=100, n_segments=20, top_k=3)
    notes = res.provenance["methods"]["lime"]
    assert notes["n_features"][0] > 5 and notes["segmentation"] == "slic"
    top = notes["top_regions"][0][0]
    assert len(top["segments"]) == 3 and top["weights"] == sorted(top["weights"], reverse=True)
    # the map is the coefficient of each pixel's superpixel, and the top regions can be rebuilt as a mask
    labels = superpixels(phantom[0], 20, "slic", 0.3)
    assert int(labels.max()) + 1 == notes["n_features"][0]
    coef = torch.stack([res["lime"][0, 0][labels == j][0] for j in range(notes["n_features"][0])])
    for j in range(notes["n_features"][0]):
        assert torch.all(res["lime"][0, 0][labels == j] == coef[j])
    assert top["segments"] == coef.topk(3).indices.tolist()
    mask = torch.isin(labels, torch.tensor(top["segments"]))
    assert float(mask.float().mean()) == pytest.approx(top["area_fraction"], abs=1e-6)
    vol = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    res3 = medlens.explain(tiny3d, vol, ["lime", "kernelshap"], targets=[0], seed=0, num_samples=60, n_segments=8)
    assert res3["lime"].shape == (1, 1, 16, 16, 16) and torch.isfinite(res3["kernelshap"]).all()


# --------------------------------------------------------------------------------------------- baselines
def test_baselines_resolve_to_what_they_say():
    x = torch.full((2, 1, 20, 20), 3.0)
    x[:, :, 4:16, 4:16] = 10.0
    bg, notes = resolve_baseline(x, "background")
    assert bg.reshape(-1).tolist() == [3.0, 3.0] and notes["baseline"] == "background"
    mean, _ = resolve_baseline(x, "mean")
    torch.testing.assert_close(mean.reshape(-1), x.mean(dim=(1, 2, 3)))
    flat = torch.full((1, 1, 9, 9, 9), 2.5)
    blurred, notes = resolve_baseline(flat, "blur", blur_sigma=1.5)
    torch.testing.assert_close(blurred, flat)  # blurring a constant volume changes nothing
    assert notes["blur_sigma"] == 1.5
    blurred2d, _ = resolve_baseline(x, "blur")
    assert float(blurred2d.std()) < float(x.std())
    with pytest.raises(MethodError, match="baseline must be one of"):
        resolve_baseline(x, "median")
    with pytest.raises(MethodError, match="does not broadcast"):
        resolve_baseline(x, torch.zeros(3, 3))


def test_option_errors_speak_the_users_language(tiny2d):
    x = _x2d(1, 1, 24)
    with pytest.raises(MethodError, match="window"):
        medlens.explain(tiny2d, x, "occlusion", window=(4, 4, 4))
    with pytest.raises(MethodError, match="p_keep"):
        medlens.explain(tiny2d, x, "rise", p_keep=1.5)
    with pytest.raises(MethodError, match="segmentation"):
        medlens.explain(tiny2d, x, "lime", segmentation="watershed")
    with pytest.raises(MethodError, match="output"):
        medlens.explain(tiny2d, x, "kernelshap", output="logits")


def test_multi_label_probability_is_the_sigmoid(tiny2d):
    tiny2d.multi_label = True
    try:
        x = _x2d(1, 1, 24, seed=12)
        res = medlens.explain(tiny2d, x, "kernelshap", targets=[0, 1, 2], seed=0, num_samples=600, n_segments=4,
                              segmentation="grid", baseline="zero", output="probability")
    finally:
        del tiny2d.multi_label
    notes = res.provenance["methods"]["kernelshap"]
    assert "sigmoid" in notes["f"]
    with torch.no_grad():
        f_b = torch.sigmoid(tiny2d(torch.zeros_like(x)))[0]
    f_x = torch.sigmoid(res.logits[0])
    for s in range(3):
        assert abs(notes["output_gap"][0][s] - float(f_x[s] - f_b[s])) < 1e-5
        assert abs(notes["attribution_sum"][0][s] - notes["output_gap"][0][s]) < 1e-6


def test_rise_equals_the_textbook_sum_over_masks(tiny2d):
    """saliency = sum_i f(x * M_i) M_i / (N p), with the masks rebuilt from the same seeded draws."""
    from medlens.core.context import ExplainContext
    from medlens.core.model_state import HookSet

    x = _x2d(1, 1, 20, seed=13)
    n, p = 48, 0.4
    res = medlens.explain(tiny2d, x, "rise", targets=[2, 0], seed=21, n_masks=n, p_keep=p, cell_size=5)
    ctx = ExplainContext(tiny2d, x, HookSet(), seed=21)
    gen = ctx.generator("rise")
    grids = (torch.rand((n, 1, 5, 5), generator=gen) < p).float()
    shifts = torch.stack([torch.randint(0, 5, (n,), generator=gen) for _ in range(2)], dim=1)
    masks = rise_masks(grids, shifts, (5, 5), (20, 20))
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1 + 1e-6
    expected = torch.zeros(2, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n):
            logits = tiny2d(x * masks[i : i + 1])[0]
            for slot, target in enumerate([2, 0]):
                expected[slot] += float(logits[target]) * masks[i, 0].double()
    expected /= n * p
    torch.testing.assert_close(res["rise"][0].double(), expected, rtol=1e-4, atol=1e-5)
