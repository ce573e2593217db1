"""Evaluation metrics against hand-computed values, peer oracles (grad-cam ROAD, scikit-learn, scipy) and axioms."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medlens.errors import InputError
from medlens.evaluation import faithfulness as F
from medlens.evaluation import localisation as L
from medlens.evaluation import trust as TR
from medlens.evaluation.noise import image_key, noise_generator
from medlens.evaluation.stats import bootstrap_ci
from medlens.core.model_state import hook_count

from helpers import TinyCNN2d, TinyCNN3d, make_tiny2d


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded, setting restored after


class LinearToy(nn.Module):
    """logit_0 = sum_i w_i x_i + b, logit_1 = 0: every perturbation curve can be computed by hand."""

    def __init__(self, weights, bias: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(weights, dtype=torch.float32).flatten())
        self.b = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x.flatten(1) * self.w).sum(1) + self.b
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# --------------------------------------------------------------------------------------------- deletion / insertion
def test_deletion_and_insertion_by_hand_2d_and_3d():
    model = LinearToy([4, 3, 2, 1])
    x = torch.ones(1, 1, 2, 2)
    maps = torch.tensor([1.0, 4.0, 2.0, 3.0]).view(1, 1, 2, 2)  # order: pixel 1 (w 3), 3 (w 1), 2 (w 2), 0 (w 4)
    t = torch.tensor([[0]])
    d = F.deletion(model, x, maps, t, steps=4, baseline="zero", output="logit")
    assert d.curves[0, 0].tolist() == pytest.approx([10, 7, 6, 4, 0])
    assert float(d.values) == pytest.approx(0.25 * (10 / 2 + 7 + 6 + 4 + 0 / 2))
    assert d.baseline == "zero"
    i = F.insertion(model, x, maps, t, steps=4, baseline="zero", output="logit")
    assert i.curves[0, 0].tolist() == pytest.approx([0, 3, 4, 6, 10])
    assert float(i.values) == pytest.approx(0.25 * (0 + 3 + 4 + 6 + 10 / 2))
    # probabilities (softmax over [s, 0] = sigmoid(s)) by default
    p = F.deletion(model, x, maps, t, steps=4, baseline="zero")
    expected = [sig(v) for v in (10, 7, 6, 4, 0)]
    assert p.curves[0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(p.values) == pytest.approx(0.25 * (expected[0] / 2 + sum(expected[1:4]) + expected[4] / 2), abs=1e-6)
    # a constant baseline value, and the same case as a 3-D volume (1 x 2 x 2)
    c = F.deletion(model, x, maps, t, steps=4, baseline=0.5, output="logit")
    assert c.curves[0, 0].tolist() == pytest.approx([10, 8.5, 8, 7, 5])  # each removed pixel loses w_i / 2
    d3 = F.deletion(model, x.view(1, 1, 1, 2, 2), maps.view(1, 1, 1, 2, 2), t, steps=4, baseline="zero", output="logit")
    assert d3.curves.tolist() == d.curves.tolist()


def test_deletion_multi_target_and_batch():
    model = LinearToy([4, 3, 2, 1])
    x = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    maps = torch.tensor([1.0, 4.0, 2.0, 3.0]).view(1, 1, 2, 2).repeat(2, 2, 1, 1)
    t = torch.tensor([[0, 1], [0, 1]])
    d = F.deletion(model, x, maps, t, steps=4, baseline="zero", output="logit", chunk=3)
    assert d.curves[1, 0].tolist() == pytest.approx([20, 14, 12, 8, 0])
    assert d.curves[:, 1].abs().max() == 0  # the class-1 logit is constant 0


def test_constant_map_removes_in_raster_order():
    model = LinearToy([4, 3, 2, 1])
    x = torch.ones(1, 1, 2, 2)
    d = F.deletion(model, x, torch.zeros(1, 1, 2, 2), torch.tensor([[0]]), steps=4, baseline="zero", output="logit")
    assert d.curves[0, 0].tolist() == pytest.approx([10, 6, 3, 1, 0])
    assert torch.isfinite(d.values).all()


def test_blur_baseline_keeps_a_constant_image():
    x = torch.full((1, 2, 9, 9), 3.0)
    ref, desc = F.make_baseline(x, "blur", blur_sigma=2.0)
    assert torch.allclose(ref, x) and "blur" in desc
    with pytest.raises(InputError):
        F.make_baseline(x, "sparkle")


# --------------------------------------------------------------------------------------------- ROAD
def test_linear_imputation_matches_grad_cam_imputer():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 12, generator=g)
    removed = torch.rand(12, 12, generator=g) < 0.6
    ref = NoisyLinearImputer(noise=0)(x, (~removed).float())
    ours = F.linear_impute(x[None], removed[None], noise=0)[0]
    assert torch.allclose(ours, ref, atol=1e-4)
    assert torch.equal(ours[:, ~removed], x[:, ~removed])


def test_linear_imputation_3d_centre_voxel_by_hand():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 3, 3, 3, generator=g)
    removed = torch.zeros(1, 3, 3, 3, dtype=torch.bool)
    removed[0, 1, 1, 1] = True
    out = F.linear_impute(x, removed, noise=0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3) - 1] * 3, indexing="ij"))
    k = (grid != 0).sum(0)
    w = torch.where(k == 1, 2.0, torch.where(k == 2, 1.0, 0.0))
    expected = (w * x[0, 0]).sum() / w.sum()
    assert float(out[0, 0, 1, 1, 1]) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_matches_grad_cam_road(order):
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric, RemoveLeastRelevantFirst,
                                                                  RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = make_tiny2d(0, in_channels=3, num_classes=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g)
    cams = torch.rand(2, 8, 8, generator=g)  # distinct values: percentiles split cleanly
    targets = torch.tensor([[1], [2]])
    # grad-cam keeps the pixels below the p-th percentile (63 * p / 100 is never an integer here), so for
    # MoRF percentile p removes the top 1 - p/100; for LeRF (run on 1 - cam) it removes the bottom 1 - p/100.
    percentiles = [25, 50, 75]
    remover = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    exact = [PerturbationConfidenceMetric(remover(p, NoisyLinearImputer(noise=0)))(
        x, cams.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in targets[:, 0]], model, return_diff=False)
        for p in percentiles]
    ours = F.road(model, x, cams[:, None], targets, order=order, fractions=[1 - p / 100 for p in percentiles], noise=0)
    assert torch.allclose(ours.curves[:, 0], torch.tensor(exact).T.float(), atol=1e-4)
    assert torch.allclose(ours.values[:, 0], torch.tensor(exact).mean(0).float(), atol=1e-4)
    # With grad-cam's own noisy classes (noise 0.01 from the global RNG, ours from a seeded generator) the
    # scores agree within what 1% noise can move this model's probabilities.
    cls = ROADMostRelevantFirst if order == "morf" else ROADLeastRelevantFirst
    noisy = cls(percentile=50)(x, cams.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in targets[:, 0]], model,
                              return_diff=False)
    ours_noisy = F.road(model, x, cams[:, None], targets, order=order, fractions=[0.5], noise=0.01, seed=3)
    assert torch.allclose(ours_noisy.values[:, 0], torch.tensor(noisy).float(), atol=2e-2)
    again = F.road(model, x, cams[:, None], targets, order=order, fractions=[0.5], noise=0.01, seed=3)
    assert torch.equal(again.values, ours_noisy.values)


def test_road_3d_runs_and_respects_order():
    model = LinearToy(torch.arange(8.0).tolist())
    x = torch.ones(1, 1, 2, 2, 2)
    x[0, 0, 1, 1, 1] = 5.0
    maps = x.clone()  # the bright voxel is the most relevant
    t = torch.tensor([[0]])
    morf = F.road_morf(model, x, maps, t, fractions=[1 / 8], noise=0, output="logit")
    lerf = F.road_lerf(model, x, maps, t, fractions=[1 / 8], noise=0, output="logit")
    full = float(model(x)[0, 0])
    # removing the bright voxel (weight 7) replaces 5 by the mean of its neighbours (1): the logit falls by 28
    assert float(morf.values) == pytest.approx(full - 7 * 4, abs=1e-3)
    assert float(lerf.values) == pytest.approx(full, abs=1e-3)  # the least relevant voxel (0) has weight 0


# --------------------------------------------------------------------------------------------- Average Drop / IC
def test_average_drop_and_increase_in_confidence_by_hand():
    model = LinearToy([4, 3, 2, -5])
    x = torch.ones(1, 1, 2, 2)
    t = torch.tensor([[0]])
    y = sig(4)
    keep_first = torch.tensor([2.0, 0, 0, -1]).view(1, 1, 2, 2)  # m = [1, 0, 0, 0] -> logit 4 -> no drop
    assert float(F.average_drop(model, x, keep_first, t)) == pytest.approx(0.0, abs=1e-7)
    half = torch.tensor([2.0, 1.0, 0, 0]).view(1, 1, 2, 2)  # m = [1, .5, 0, 0] -> logit 5.5 -> rise
    assert float(F.increase_in_confidence(model, x, half, t)) == 1.0
    only_two = torch.tensor([0, 0, 1.0, 0]).view(1, 1, 2, 2)  # logit 2 -> drop
    assert float(F.average_drop(model, x, only_two, t)) == pytest.approx((y - sig(2)) / y, abs=1e-6)
    assert float(F.increase_in_confidence(model, x, only_two, t)) == 0.0
    zero = torch.zeros(1, 1, 2, 2)  # an all-zero map keeps nothing: logit 0
    assert float(F.average_drop(model, x, zero, t)) == pytest.approx((y - 0.5) / y, abs=1e-6)


def test_scores_leave_the_model_as_found():
    model = make_tiny2d(0).train()
    x = torch.randn(2, 1, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    F.deletion(model, x, torch.rand(2, 1, 8, 8), torch.tensor([[0], [1]]), steps=4)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN stats untouched (eval inside)
    assert hook_count(model) == 0


# --------------------------------------------------------------------------------------------- localisation
def _box_mask(n=8):
    m = torch.zeros(1, n, n, dtype=torch.bool)
    m[0, 2:4, 2:4] = True
    return m


def test_pointing_game_inside_outside_and_tolerance():
    mask = _box_mask()
    inside = torch.zeros(1, 1, 8, 8)
    inside[0, 0, 2, 3] = 1
    outside = torch.zeros(1, 1, 8, 8)
    outside[0, 0, 7, 7] = 1
    assert float(L.pointing_game(inside, mask, tolerance=0)) == 1
    assert float(L.pointing_game(outside, mask, tolerance=0)) == 0
    assert float(L.pointing_game(outside, mask, tolerance=5.7)) == 1  # (7,7) to (3,3): sqrt(32) = 5.66
    assert float(L.pointing_game(outside, mask, tolerance=5.6)) == 0
    assert float(L.pointing_game(inside, mask)) == 1  # default: 15 / 224 of the side
    # ties: the first maximal pixel in raster order; a constant map points at (0, 0), 2.83 px from the box
    const = torch.full((1, 1, 8, 8), 0.3)
    assert float(L.pointing_game(const, mask, tolerance=2.8)) == 0
    assert float(L.pointing_game(const, mask, tolerance=2.9)) == 1
    assert float(L.pointing_game(torch.zeros(1, 1, 8, 8), mask, tolerance=0)) == 0
    two_peaks = torch.zeros(1, 1, 8, 8)
    two_peaks[0, 0, 0, 7] = two_peaks[0, 0, 3, 3] = 1  # (0, 7) comes first in raster order
    assert float(L.pointing_game(two_peaks, mask, tolerance=0)) == 0
    # an image without a region is undefined: NaN, left out by the runner
    assert math.isnan(float(L.pointing_game(inside, torch.zeros(1, 8, 8, dtype=torch.bool))))
    # 3-D and several targets
    vol_mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    vol_mask[0, 1, 1, 1] = True
    vol = torch.zeros(1, 2, 4, 4, 4)
    vol[0, 0, 1, 1, 1] = 1
    vol[0, 1, 3, 3, 3] = 1
    assert L.pointing_game(vol, vol_mask, tolerance=0).tolist() == [[1.0, 0.0]]


def test_energy_in_box_by_hand():
    mask = _box_mask()
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 2, 2] = 3
    m[0, 0, 6, 6] = 1
    m[0, 0, 5, 5] = -7  # negative evidence is ignored
    assert float(L.energy_in_box(m, mask)) == pytest.approx(0.75)
    assert float(L.energy_in_box(torch.zeros(1, 1, 8, 8), mask)) == pytest.approx(4 / 64)
    assert float(L.energy_in_box(torch.full((1, 1, 8, 8), 2.0), mask)) == pytest.approx(4 / 64)


def test_iou_and_dice_by_hand():
    mask = _box_mask()
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 2:4, 3:6] = 1.0  # 6 pixels, 2 of them in the 4-pixel box
    assert float(L.iou(m, mask, threshold=0.5)) == pytest.approx(2 / 8)
    assert float(L.dice(m, mask, threshold=0.5)) == pytest.approx(2 * 2 / 10)
    # Otsu on a two-level map picks the bright region
    m2 = torch.full((1, 1, 8, 8), 0.1)
    m2[0, 0, 2:4, 2:4] = 0.9
    assert float(L.iou(m2, mask)) == pytest.approx(1.0)
    assert float(L.dice(m2, mask)) == pytest.approx(1.0)
    for flat in (torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)):
        assert float(L.iou(flat, mask)) == 0 and float(L.dice(flat, mask)) == 0


def test_otsu_agrees_with_scikit_image():
    from skimage.filters import threshold_otsu

    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.rand(300, generator=g) * 0.4, 0.6 + torch.rand(100, generator=g) * 0.4])
    ours = float(L.otsu_threshold(v[None]))
    ref = float(threshold_otsu(v.numpy(), nbins=256))
    assert ((v > ours) != (v > ref)).sum() <= 2


def test_auprc_matches_scikit_learn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(3, 2, 10, 10, generator=g) * 5).round()  # many ties
    masks = torch.rand(3, 10, 10, generator=g) < 0.3
    ours = L.auprc(maps, masks)
    for b in range(3):
        for t in range(2):
            ref = average_precision_score(masks[b].flatten().numpy(), maps[b, t].flatten().numpy())
            assert float(ours[b, t]) == pytest.approx(ref, abs=1e-6)
    assert float(L.auprc(torch.zeros(1, 1, 8, 8), _box_mask())) == pytest.approx(4 / 64)


def test_baselines():
    c = L.center_map((9, 9))
    assert c.shape == (1, 1, 9, 9) and int(c.flatten().argmax()) == 40
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[2, 3, 3] = True
    total = masks.float().sum(0)
    prior = L.prior_maps(masks, total, 3)
    assert prior[0, 0, 0, 0] == pytest.approx(0.5) and prior[0, 0, 3, 3] == pytest.approx(0.5)
    assert prior[2, 0, 3, 3] == 0  # its own mask never leaks into its prior


# --------------------------------------------------------------------------------------------- trust
def test_sparseness_by_hand():
    m = torch.tensor([0.0, 0, 0, 1]).view(1, 1, 2, 2)
    assert float(TR.sparseness(m)) == pytest.approx(0.75)
    m2 = torch.tensor([1.0, 2, 3, -4]).view(1, 1, 2, 2)  # |.| sorted 1 2 3 4: (-3 -2 +2 +12) / 40
    assert float(TR.sparseness(m2)) == pytest.approx(0.25)
    assert float(TR.sparseness(torch.zeros(1, 1, 2, 2))) == 0
    assert float(TR.sparseness(torch.full((1, 1, 2, 2), 3.0))) == 0


def test_completeness_with_a_tolerance():
    model = LinearToy([4, 3, 2, 1], bias=0.5)
    x = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)
    t = torch.tensor([[0]])
    ixg = (x.flatten() * model.w.detach()).view(1, 1, 2, 2)  # input x gradient: exact for a linear model
    r = TR.completeness(model, x, ixg, t)  # f(x) - f(0) = 20
    assert bool(r.holds) and float(r.values) == pytest.approx(0.0, abs=1e-6)
    r2 = TR.completeness(model, x, ixg * 1.1, t)
    assert not bool(r2.holds) and float(r2.values) == pytest.approx(0.1, abs=1e-5)
    r3 = TR.completeness(model, x, ixg, t, baseline=None, rtol=0.01)  # conservation against f(x) = 20.5
    assert float(r3.values) == pytest.approx(0.5 / 20.5, abs=1e-6) and not bool(r3.holds)
    zero = TR.completeness(LinearToy([0, 0, 0, 0]), x, torch.zeros(1, 1, 2, 2), t)
    assert bool(zero.holds) and torch.isfinite(zero.values).all()


def test_max_sensitivity_by_hand():
    x = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)
    t = torch.tensor([[0]])
    model = LinearToy([1, 1, 1, 1])
    identity = lambda m, xx, tt: xx[:, :1].clone()  # noqa: E731  the map is the input itself
    value = TR.max_sensitivity(model, x, t, identity, radius=0.1, samples=4, seed=5)
    g = noise_generator(5, image_key(x[0]))  # the image's own generator (medlens.evaluation.noise)
    norms = [float(((torch.rand(x.shape, generator=g) * 2 - 1) * 0.1 * 3).norm()) for _ in range(4)]
    assert float(value) == pytest.approx(max(norms) / float(x.norm()), rel=1e-5)
    const = lambda m, xx, tt: torch.ones(xx.shape[0], 1, 2, 2)  # noqa: E731
    assert float(TR.max_sensitivity(model, x, t, const, samples=3)) == 0
    zero = lambda m, xx, tt: torch.zeros(xx.shape[0], 1, 2, 2)  # noqa: E731
    assert float(TR.max_sensitivity(model, x, t, zero, samples=3)) == 0


def test_spearman_and_ssim_against_references():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 50, generator=g) * 6).round()
    b = (torch.rand(3, 50, generator=g) * 6).round()
    ours = TR.spearman(a, b)
    for i in range(3):
        assert float(ours[i]) == pytest.approx(spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-5)
    assert TR.spearman(torch.ones(1, 5), torch.ones(1, 5)).item() == 1
    assert TR.spearman(torch.ones(1, 5), torch.arange(5.0)[None]).item() == 0
    u = torch.rand(2, 12, 12, generator=g)
    v = torch.rand(2, 12, 12, generator=g)
    s = TR.ssim(u, v)
    ref = structural_similarity(TR._unit(u.double())[0].numpy(), TR._unit(v.double())[0].numpy(), data_range=1.0, win_size=7)
    assert float(s[0]) == pytest.approx(ref, abs=1e-6)
    assert float(TR.ssim(u, u)[1]) == pytest.approx(1.0)


def _sobel(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """An 'explanation' that ignores the model: the Sobel edge magnitude of the input, for every target."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    g = x.mean(1, keepdim=True)
    gx = torch.nn.functional.conv2d(g, kx, padding=1)
    gy = torch.nn.functional.conv2d(g, kx.transpose(2, 3), padding=1)
    return (gx ** 2 + gy ** 2).sqrt().expand(-1, targets.shape[1], -1, -1).clone()


def _square_task(n: int, gen: torch.Generator, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright 4x4 square on noise; its half (left = class 0, right = class 1) decides the class."""
    x = torch.randn(n, 1, size, size, generator=gen) * 0.3
    y = torch.randint(0, 2, (n,), generator=gen)
    for i in range(n):
        r = int(torch.randint(0, size - 4, (1,), generator=gen))
        c = int(torch.randint(0, size // 2 - 4, (1,), generator=gen)) + (size // 2 if y[i] else 0)
        x[i, 0, r:r + 4, c:c + 4] += 2.0
    return x, y


def test_randomisation_fails_edge_detector_and_passes_gradcam_on_a_trained_model():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyCNN2d(in_channels=1, num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(60):
        xb, yb = _square_task(32, gen)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    x, y = _square_task(6, gen)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.8  # it learned the task
    targets = y[:, None]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    edge = TR.randomization(model, x, targets, _sobel, max_steps=3, seed=0)
    assert edge.values.min() > 0.99 and not edge.passes.any()  # identical maps whatever the weights
    cam = TR.randomization(model, x, targets, "gradcam", max_steps=3, seed=0)
    assert cam.spearman.shape == (6, 1, 3) and len(cam.layers) == 3 and cam.layers[-1] == "features.0"
    # per image, random CNNs still respond a little to the bright square; on average the similarity is gone
    assert cam.values.mean() < 0.5 and cam.passes.float().mean() >= 0.5
    assert cam.ssim.mean() < edge.ssim.mean()
    # the model itself was never touched (the cascade runs on a deep copy)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert hook_count(model) == 0
    again = TR.randomization(model, x, targets, "gradcam", max_steps=3, seed=0)
    assert torch.equal(again.spearman, cam.spearman)


# --------------------------------------------------------------------------------------------- stats
def test_bootstrap_ci_is_seeded_and_ignores_nan():
    vals = [0.1, 0.5, 0.9, float("nan"), 0.3]
    n, mean, lo, hi = bootstrap_ci(vals, seed=1)
    assert n == 4 and mean == pytest.approx(0.45) and lo <= mean <= hi
    assert bootstrap_ci(vals, seed=1) == (n, mean, lo, hi)
    assert bootstrap_ci([2.0]) == (1, 2.0, 2.0, 2.0)
    n0, m0, _, _ = bootstrap_ci([float("nan")])
    assert n0 == 0 and math.isnan(m0)


def test_bad_shapes_raise_user_errors():
    model = LinearToy([1, 1, 1, 1])
    with pytest.raises(InputError):
        F.deletion(model, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 3, 3), torch.tensor([[0]]))
    with pytest.raises(InputError):
        L.pointing_game(torch.ones(1, 1, 2, 2), torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(InputError):
        F.road(model, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor([[0]]), order="sideways")


def test_multi_label_models_are_scored_with_sigmoid():
    model = LinearToy([4, 3, 2, 1])
    x = torch.ones(1, 1, 2, 2)
    maps = torch.tensor([1.0, 4.0, 2.0, 3.0]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    t = torch.tensor([[0, 1]])  # two findings explained at once
    model.multi_label = True
    d = F.deletion(model, x, maps, t, steps=4, baseline="zero")
    assert d.curves[0, 0].tolist() == pytest.approx([sig(v) for v in (10, 7, 6, 4, 0)], abs=1e-6)
    assert d.curves[0, 1].tolist() == pytest.approx([0.5] * 5)  # sigmoid(0), independent of class 0
    model.multi_label = False
    s = F.deletion(model, x, maps, t, steps=4, baseline="zero")
    assert torch.allclose(s.curves[0, 0] + s.curves[0, 1], torch.ones(5))  # softmax: the two share the mass


@pytest.mark.parametrize("fill", [0.0, 0.7], ids=["zero map", "constant map"])
@pytest.mark.parametrize("dims", [2, 3])
def test_every_metric_is_finite_on_zero_and_constant_maps(fill, dims):
    # no division by zero anywhere: faithfulness, localisation, trust; values defined as documented
    torch.manual_seed(0)
    shape = (8, 8) if dims == 2 else (4, 6, 6)
    model = (TinyCNN2d(in_channels=1, num_classes=2) if dims == 2 else TinyCNN3d(in_channels=1, num_classes=2)).eval()
    x = torch.rand(2, 1, *shape)
    targets = torch.tensor([[0], [1]])
    maps = torch.full((2, 1, *shape), fill)
    masks = torch.zeros(2, *shape, dtype=torch.bool)
    masks[:, 1:3, 1:3] = True
    values = {
        "deletion": F.deletion(model, x, maps, targets, steps=4).values,
        "insertion": F.insertion(model, x, maps, targets, steps=4).values,
        "road_morf": F.road_morf(model, x, maps, targets, fractions=(0.25, 0.5)).values,
        "road_lerf": F.road_lerf(model, x, maps, targets, fractions=(0.25, 0.5)).values,
        "average_drop": F.average_drop(model, x, maps, targets),
        "increase_in_confidence": F.increase_in_confidence(model, x, maps, targets),
        "pointing_game": L.pointing_game(maps, masks),
        "energy_in_box": L.energy_in_box(maps, masks),
        "iou": L.iou(maps, masks),
        "dice": L.dice(maps, masks),
        "auprc": L.auprc(maps, masks),
        "completeness": TR.completeness(model, x, maps, targets).values,
        "sparseness": TR.sparseness(maps),
        "randomization": TR.randomization(model, x, targets, lambda m, xx, t: torch.full((2, 1, *shape), fill),
                                          max_steps=2, seed=0).values,
    }
    for name, v in values.items():
        assert torch.isfinite(v).all(), (name, v)
    assert (values["sparseness"] == 0).all()  # Gini of a constant (or empty) map
    area = float(masks[0].float().mean())
    for name in ("energy_in_box", "auprc"):  # a map that prefers no pixel scores chance level: the area fraction
        torch.testing.assert_close(values[name], torch.full_like(values[name], area))


def test_noise_seeds_follow_the_image_not_its_place() -> None:
    """The same image gets the same generator in any batch; other images, other seeds, or other parts other ones."""
    from medlens.evaluation.noise import image_key, noise_generator

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    same = draw(noise_generator(3, image_key(x[0]))), draw(noise_generator(3, image_key(x[0].clone())))
    assert torch.equal(*same)
    others = [draw(noise_generator(3, image_key(x[1]))), draw(noise_generator(4, image_key(x[0]))),
              draw(noise_generator(3, image_key(x[0]), 1)), draw(noise_generator(3, image_key(x[0].double())))]
    assert all(not torch.equal(same[0], o) for o in others)
    for seed in (2**63, 2**64 - 1, -1):  # every seed `torch.Generator.manual_seed` takes (and a negative one)
        draw(noise_generator(seed, image_key(x[0]), 2))
