"""The forward-only fast paths: BatchNorm folding in a structural copy (accel/fast_forward.py) and Score-CAM's
precomputed first convolution (accel/masked_stem.py), checked in float64 against the direct computation and a textbook loop.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medlens
from medlens.accel import fast_forward as inference
from medlens.accel import masked_stem
from medlens.accel.masked_stem import build_masked_stem
from medlens.accel.fast_forward import fast_forward
from medlens.tensor.spatial import upsample_to

from helpers import TinyCNN2d, randomise_bn, torchvision_model


def _state(model: nn.Module) -> tuple:
    """Everything about a model that a call must leave as it was: tensors, module tree, attributes."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tree = [(name, type(m), id(m), sorted(vars(m).keys())) for name, m in model.named_modules()]
    return tensors, tree


def _same_state(model: nn.Module, before: tuple) -> bool:
    tensors, tree = _state(model)
    return tree == before[1] and tensors.keys() == before[0].keys() and all(torch.equal(tensors[k], before[0][k]) for k in tensors)


# ------------------------------------------------------------------------------------ BatchNorm folding
@pytest.mark.parametrize("arch, expected", [("resnet18", 20), ("densenet121", 59)])
def test_folded_trace_agrees_and_leaves_the_model_as_it_was(arch, expected):
    model = randomise_bn(torchvision_model(arch, num_classes=4, seed=3), 3)
    before = _state(model)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fast = fast_forward(model, x)
    assert f"{expected} BatchNorm layer(s) folded" in fast.note["forward_passes"]
    def batchnorms(m: nn.Module) -> int:
        return sum(isinstance(b, nn.modules.batchnorm._BatchNorm) for b in m.modules())

    # DenseNet's norm1 layers come before their convolution and stay; every BatchNorm after one is gone
    assert batchnorms(fast.module) == batchnorms(model) - expected
    with torch.inference_mode():
        reference = model(x)
        got = fast(x)
    assert inference.relative_gap(got, reference) < 1e-5
    assert _same_state(model, before)  # folded convolutions are new modules on the trace, not in the model


def test_folding_in_float64_is_exact_to_rounding():
    model = randomise_bn(torchvision_model("resnet18", num_classes=4, seed=5), 5).double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = fast_forward(model, x)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-11, atol=1e-11)


class _Branching(TinyCNN2d):
    """Data-dependent control flow and Python-side state: the copy runs this forward code itself."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.mean() > 0:
            x = x * 2
        return super().forward(x)


def _conv_bn_net() -> nn.Sequential:
    return randomise_bn(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)), 1)


def test_the_copy_runs_the_models_own_forward_code_and_hooks():
    model = randomise_bn(_Branching(), 0)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    fast = fast_forward(model, x)
    assert "2 BatchNorm layer(s) folded" in fast.note["forward_passes"]
    with torch.inference_mode():
        for sign in (1, -1):  # both branches of the data-dependent `if`
            y = sign * x.abs()
            assert inference.relative_gap(fast(y), model(y)) < 1e-5
    fired = []
    model.pool.register_forward_hook(lambda m, i, o: fired.append(1))  # a user's hook, added after the copy was made
    with torch.inference_mode():
        fast(x)
    assert fired == [1]  # the copy shares hooks with the model's modules


def test_models_that_are_not_rewritten_run_as_given_with_a_note(tiny2d, monkeypatch):
    x = torch.randn(2, 1, 16, 16)
    cases = {
        "TorchScript": torch.jit.script(tiny2d),
        "no BatchNorm": nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval(),
    }
    for why, model in cases.items():
        fast = fast_forward(model, x)
        assert fast.module is model and why in fast.note["forward_passes"]
    training = _conv_bn_net().train()
    assert "training mode" in fast_forward(training, x).note["forward_passes"] and training.training
    hooked = _conv_bn_net()
    hooked[1].register_forward_pre_hook(lambda m, a: None)  # a BatchNorm with a hook of its own is not folded away
    assert fast_forward(hooked, x).module is hooked
    monkeypatch.setattr(inference, "ENABLED", False)
    assert "ENABLED is False" in fast_forward(_conv_bn_net(), x).note["forward_passes"]


def test_a_layer_changed_in_place_before_its_batchnorm_is_not_folded():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            y.relu_()  # between the layer and its BatchNorm: folding would be wrong
            return self.fc(self.bn(y).mean(dim=(2, 3)))

    model = randomise_bn(InPlace(), 2)
    fast = fast_forward(model, torch.randn(2, 1, 12, 12))
    assert fast.module is model and "no BatchNorm reads" in fast.note["forward_passes"]


def test_a_rewrite_that_disagrees_is_not_used(monkeypatch):
    monkeypatch.setattr(inference, "AGREEMENT", 0.0)  # any rounding difference now counts as disagreement
    model = randomise_bn(torchvision_model("resnet18", num_classes=4, seed=2), 2)
    fast = fast_forward(model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    assert fast.module is model and "differed" in fast.note["forward_passes"]


# ------------------------------------------------------------------------------ precomputed first convolution
def _StemNet(conv: nn.Module) -> nn.Sequential:
    """The input goes straight into `conv`, then ReLU, pooling and a linear head (all torch.nn: traceable)."""
    n = 2 if isinstance(conv, nn.Conv2d) else 3
    pool = (nn.AdaptiveAvgPool2d if n == 2 else nn.AdaptiveAvgPool3d)(2)
    return nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), nn.Linear(conv.out_channels * 2**n, 3))


STEMS = {  # the first convolution, input size, grid of the masks
    "resnet-like 7x7 stride 2": (lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3), (40, 40), (5, 5)),
    "dilated, unpadded": (lambda: nn.Conv2d(2, 4, 5, padding=0, dilation=2), (33, 29), (4, 3)),
    "grouped, no bias, anisotropic": (lambda: nn.Conv2d(8, 6, (3, 5), stride=(2, 3), padding=(1, 4), groups=2, bias=False), (31, 37), (3, 6)),
    "3-D": (lambda: nn.Conv3d(2, 4, 5, stride=2, padding=2), (20, 24, 18), (3, 4, 2)),
}


@pytest.mark.parametrize("case", list(STEMS))
def test_precomputed_first_convolution_equals_the_convolution_of_the_masked_input(case):
    torch.manual_seed(0)
    make, size, grid = STEMS[case]
    conv = make()
    model = _StemNet(conv).double().eval()
    x = torch.randn(1, conv.in_channels, *size, dtype=torch.float64)
    before = _state(model)
    stem, why = build_masked_stem(fast_forward(model, x), x, grid)
    assert stem is not None, why
    assert _same_state(model, before)  # the swap happens in a copy
    w = torch.rand(6, int(torch.tensor(grid).prod()), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    masked = x * upsample_to(w.view(1, 6, *grid), size).transpose(0, 1)
    with torch.inference_mode():
        torch.testing.assert_close(stem.outputs(w), conv(masked), rtol=1e-12, atol=1e-12)
        logits, used, gap = stem.logits(w, masked, check=True)
        assert used and gap < 1e-12
        torch.testing.assert_close(logits, model(masked), rtol=1e-12, atol=1e-12)
        assert stem.outputs(w[:2]).shape[0] == 2  # a smaller chunk reuses the buffer


def test_tiles_combine_few_grid_points_each():
    make, size, grid = STEMS["resnet-like 7x7 stride 2"]
    model = _StemNet(make()).eval()
    x = torch.randn(1, 3, *size)
    stem, _ = build_masked_stem(fast_forward(model, x), x, grid)
    # each tile combines at most 3 grid points per axis (plus the bias row): 10 terms, not 26
    assert max(t.grid_index.numel() for t in stem.tiles) <= masked_stem.MAX_TERMS_PER_AXIS**2 + 1


def test_the_shortcut_declines_when_it_cannot_help_or_apply():
    x = torch.randn(1, 1, 32, 32)
    cheap = _StemNet(nn.Conv2d(1, 4, 3, padding=1)).eval()
    assert "cheap" in build_masked_stem(fast_forward(cheap, x), x, (4, 4))[1]
    assert "not upsampled" in build_masked_stem(fast_forward(cheap, x), x, (32, 32))[1]

    pooled_first = nn.Sequential(nn.AvgPool2d(1), *_StemNet(nn.Conv2d(1, 8, 7, stride=2, padding=3))).eval()
    assert "receives the model's input unchanged" in build_masked_stem(fast_forward(pooled_first, x), x, (4, 4))[1]
    hooked = _StemNet(nn.Conv2d(1, 8, 7, stride=2, padding=3)).eval()
    hooked[0].register_forward_hook(lambda m, i, o: None)  # a hook on it must keep firing: no swap
    assert "receives the model's input unchanged" in build_masked_stem(fast_forward(hooked, x), x, (4, 4))[1]


# ----------------------------------------------------------------------------------------- Score-CAM
def _textbook_scorecam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """One image, one target, one masked forward per channel, straight from the paper (float64)."""
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.setdefault("a", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    a = captured["a"]
    scores = []
    for ch in range(a.shape[1]):
        mask = F.interpolate(a[:, ch : ch + 1], size=x.shape[2:], mode="bilinear", align_corners=False)
        span = mask.max() - mask.min()
        mask = (mask - mask.min()) / span if span > 0 else torch.zeros_like(mask)
        with torch.no_grad():
            scores.append(model(x * mask)[0, target])
    w = torch.softmax(torch.stack(scores), dim=0)
    return F.interpolate((w[:, None, None] * a[0]).sum(0)[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]


@pytest.fixture(scope="module")
def resnet64():
    return randomise_bn(torchvision_model("resnet18", num_classes=4, seed=7), 7).double()


def test_scorecam_with_folding_and_precomputed_stem_matches_the_textbook(resnet64):
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = _state(resnet64)
    r = medlens.explain(resnet64, x, "scorecam", targets=2, layer="layer2", batch_size=5)
    notes = r.provenance["methods"]["scorecam"]
    assert "20 BatchNorm layer(s) folded" in notes["forward_passes"]
    assert notes["first_convolution_precomputed"].startswith("used")
    expected = _textbook_scorecam(resnet64, resnet64.layer2, x, 2)
    torch.testing.assert_close(r["scorecam"][0, 0].double(), expected, rtol=1e-5, atol=1e-7)
    assert _same_state(resnet64, before)


def test_scorecam_drops_a_shortcut_that_disagrees_and_still_matches(resnet64, monkeypatch):
    real = masked_stem.MaskedStem.outputs
    monkeypatch.setattr(masked_stem.MaskedStem, "outputs", lambda self, w: real(self, w) * 1.01)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = medlens.explain(resnet64, x, "scorecam", targets=1, layer="layer2")
    assert r.provenance["methods"]["scorecam"]["first_convolution_precomputed"].startswith("not used: it differed from the convolution")
    expected = _textbook_scorecam(resnet64, resnet64.layer2, x, 1)
    torch.testing.assert_close(r["scorecam"][0, 0].double(), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ perturbation family
@pytest.mark.parametrize("method, options", [
    ("occlusion", {"window": 16, "stride": 16}),
    ("rise", {"n_masks": 24, "cell_size": 16}),
    ("kernelshap", {"num_samples": 40, "n_segments": 12}),
])
def test_perturbation_methods_give_the_same_maps_through_the_folded_copy(method, options, monkeypatch):
    model = randomise_bn(torchvision_model("resnet18", num_classes=4, seed=9), 9)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    fast = medlens.explain(model, x, method, targets=1, seed=0, **options)
    assert "20 BatchNorm layer(s) folded" in fast.provenance["methods"][method]["forward_passes"]
    monkeypatch.setattr(inference, "ENABLED", False)  # the model runs as given
    plain = medlens.explain(model, x, method, targets=1, seed=0, **options)
    assert "as given" in plain.provenance["methods"][method]["forward_passes"]
    scale = plain[method].abs().max()
    torch.testing.assert_close(fast[method], plain[method], rtol=0, atol=float(scale) * 1e-4)


class _ViewNet(nn.Module):
    """A .view() after the first convolution: channels-last outputs make it fail; the plain path retries."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 2)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(y.view(y.shape[0], -1))


def test_scorecam_falls_back_when_the_model_rejects_channels_last_outputs():
    torch.manual_seed(0)
    model = _ViewNet().double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    r = medlens.explain(model, x, "scorecam", targets=1, layer="conv2")
    assert r.provenance["methods"]["scorecam"]["first_convolution_precomputed"].startswith("not used")
    torch.testing.assert_close(r["scorecam"][0, 0].double(), _textbook_scorecam(model, model.conv2, x, 1), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- odd models a review found (the copy must be exact or unused)
class _Gated(nn.Module):
    """The convolution's output is used twice: by its BatchNorm and by a gate (folding would change the gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.BatchNorm2d(8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(y.mean(dim=(1, 2, 3), keepdim=True))
        return self.fc((torch.relu(self.bn(y)) * gate).mean(dim=(2, 3)))


class _Aliased(nn.Module):
    """One encoder registered at two paths; the head reads what the encoder cached on itself."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Module()
        self.head.enc = self.enc
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.head.enc(x).mean(dim=(2, 3)))


class _InPlaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x.sub_(0.5)  # changes the caller's tensor: the first convolution no longer sees the masked input itself
        return self.fc(self.net(x).mean(dim=(2, 3)))


class _LinearThenBatchNormOnAnotherAxis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.lin, self.bn, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(16 * 16, 4), nn.BatchNorm1d(6), nn.Linear(24, 3)

    def forward(self, x):
        t = self.lin(self.conv(x).flatten(2))  # (B, 6, 4): BatchNorm1d normalises the 6 channels, not the 4 features
        return self.fc(self.bn(t).flatten(1))


def _weight_normed() -> nn.Module:
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 7, stride=2, padding=3))
    return nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("make", [_Gated, _Aliased, _InPlaceInput, _LinearThenBatchNormOnAnotherAxis, _weight_normed])
@pytest.mark.parametrize("method, layer", [("scorecam", None), ("occlusion", None)])
def test_odd_models_give_the_same_maps_as_the_model_as_given(make, method, layer, monkeypatch):
    torch.manual_seed(0)
    model = randomise_bn(make(), 4).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    options = {"window": 4, "stride": 4} if method == "occlusion" else {}
    spec = {"layer": next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))} if method == "scorecam" else {}
    before = _state(model)
    fast = medlens.explain(model, x.clone(), method, targets=1, seed=0, **spec, **options)
    assert _same_state(model, before)
    monkeypatch.setattr(inference, "ENABLED", False)
    plain = medlens.explain(model, x.clone(), method, targets=1, seed=0, **spec, **options)
    torch.testing.assert_close(fast[method], plain[method], rtol=1e-5, atol=1e-6 * float(plain[method].abs().max()))
