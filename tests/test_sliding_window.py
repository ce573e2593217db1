"""Sliding-window explanations (`explain(sliding_window=...)`): a volume larger than the model's window.

References: the blended logits equal MONAI's `sliding_window_inference` (when MONAI is installed); every windowed map
equals the same method on a hand-written one-graph blend of the windows (written here, independent of medlens'
window code) within 1e-5; integrated gradients complete within 1 %; the other methods are refused by name.
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import medlens
from medlens.core.sliding_window import SlidingWindow, WindowedModel
from medlens.errors import MethodError, ModelError

METHODS = ["saliency", "inputxgradient", "integratedgradients", "smoothgrad"]


class TinySeg3d(nn.Module):
    """Two classes per voxel; class 1 follows the input's brightness, so its predicted region is a real blob."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> dict:
        out = self.head(torch.tanh(self.c2(torch.relu(self.c1(x)))))
        return {"out": out + torch.cat([0 * x, 2 * x, ], dim=1)}


def _starts(n: int, w: int, step: int) -> list[int]:
    """Textbook window positions: every `step` while the window fits, then one flush with the end."""
    starts = list(range(0, n - w + 1, step))
    return starts if starts[-1] == n - w else starts + [n - w]


class OneGraphBlend(nn.Module):
    """The reference: every window's logits in one autograd graph, averaged where windows overlap (constant blend)."""

    def __init__(self, seg: nn.Module, window: int, overlap: float) -> None:
        super().__init__()
        self.seg, self.window, self.step = seg, window, int(window * (1 - overlap))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.window
        total, count = 0, torch.zeros(x.shape[2:])
        for z in _starts(x.shape[2], w, self.step):
            for y in _starts(x.shape[3], w, self.step):
                for x0 in _starts(x.shape[4], w, self.step):
                    out = self.seg(x[:, :, z:z + w, y:y + w, x0:x0 + w])["out"]
                    total = total + nn.functional.pad(out, (x0, x.shape[4] - x0 - w, y, x.shape[3] - y - w,
                                                            z, x.shape[2] - z - w))
                    count[z:z + w, y:y + w, x0:x0 + w] += 1
        return total / count


@pytest.fixture(scope="module")
def seg() -> nn.Module:
    torch.manual_seed(0)
    return TinySeg3d().eval()


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(1, 1, 32, 32, 32) * 0.3
    x[:, :, 8:20, 10:24, 12:22] += 1.0  # a bright block: class 1's predicted region
    return x


@pytest.mark.parametrize("region", [None, "predicted", (4, 6, 2, 30, 20, 26)])
def test_windowed_maps_equal_one_graph_blend(seg: nn.Module, volume: torch.Tensor, region) -> None:
    target = medlens.SegmentationTarget(1, region=region)
    options = dict(n_steps=8, n_samples=2, noise=0.1)
    windowed = medlens.explain(seg, volume, METHODS, targets=[target], seed=3, sliding_window=(16, 16, 16), **options)
    reference = medlens.explain(OneGraphBlend(seg, 16, 0.25), volume, METHODS, targets=[target], seed=3, **options)
    assert torch.allclose(windowed.logits, reference.logits, rtol=1e-5, atol=1e-4)
    for name in METHODS:
        peak = reference[name].abs().max()
        assert peak > 0
        assert (windowed[name] - reference[name]).abs().max() <= 1e-5 * max(1.0, float(peak)), name
    gap = windowed.provenance["methods"]["integratedgradients"]["completeness"]["relative_gap"][0][0]
    assert gap < 0.01
    assert windowed.provenance["sliding_window"] == {"size": [16, 16, 16], "overlap": 0.25, "blend": "constant",
                                                     "sigma_scale": None}


def test_logits_equal_monai(seg: nn.Module, volume: torch.Tensor) -> None:
    inferers = pytest.importorskip("monai.inferers")
    x = volume[:, :, :, :28, :20]  # uneven axes, and one smaller than a window (padded as MONAI pads)
    for blend, size in [("constant", (16, 16, 16)), ("gaussian", (16, 16, 16)), ("gaussian", (16, 12, 24))]:
        mine = WindowedModel(seg, SlidingWindow(size, 0.4, blend))(x)
        theirs = inferers.sliding_window_inference(x, size, 1, lambda p: seg(p)["out"], overlap=0.4, mode=blend)
        assert torch.allclose(mine, theirs, atol=1e-6), (blend, size)


class _LiveSaved:
    """Bytes of the tensors autograd's graphs hold, now and at most (saved-tensor hooks; freed with the graph)."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor) -> object:
        size = t.numel() * t.element_size()
        self.now += size
        self.peak = max(self.peak, self.now)
        holder = _Holder(t)
        weakref.finalize(holder, self._free, size)
        return holder

    def _free(self, size: int) -> None:
        self.now -= size

    @staticmethod
    def unpack(holder: "_Holder") -> torch.Tensor:
        return holder.t


class _Holder:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def _peak_saved(model: nn.Module, x: torch.Tensor) -> int:
    live = _LiveSaved()
    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        torch.autograd.grad(out[:, 1].sum(), x)
    return live.peak


def test_gradient_holds_one_window_graph_at_a_time(seg: nn.Module, volume: torch.Tensor) -> None:
    """The windowed gradient's graphs never hold more than about one window's; the one-graph blend holds all 27."""
    one_window = _peak_saved(seg, volume[:, :, :16, :16, :16])
    windowed = _peak_saved(WindowedModel(seg, SlidingWindow((16, 16, 16))), volume)
    whole = _peak_saved(OneGraphBlend(seg, 16, 0.25), volume)
    assert windowed <= 1.1 * (one_window + volume.numel() * 4)  # one window's graph, plus the input kept
    batch = volume.repeat(3, 1, 1, 1, 1)  # IG's path points, SmoothGrad's copies: one image's window at a time
    assert _peak_saved(WindowedModel(seg, SlidingWindow((16, 16, 16))), batch) <= 1.1 * (one_window + batch.numel() * 4)
    assert whole >= 20 * one_window


def test_refusals(seg: nn.Module, volume: torch.Tensor) -> None:
    target = medlens.SegmentationTarget(1, region=None)
    with pytest.raises(MethodError, match="gradcam.*sliding_window"):
        medlens.explain(seg, volume, ["saliency", "gradcam"], targets=[target], sliding_window=(16, 16, 16))
    with pytest.raises(MethodError, match="2 or 3 positive integers"):
        medlens.explain(seg, volume, "saliency", targets=[target], sliding_window=(16, 0, 16))
    with pytest.raises(MethodError, match="one size per axis"):
        medlens.explain(seg, volume, "saliency", targets=[target], sliding_window=(16, 16))
    with pytest.raises(MethodError, match="overlap"):
        medlens.explain(seg, volume, "saliency", targets=[target], sliding_window=(16, 16, 16), sliding_window_overlap=1)
    with pytest.raises(MethodError, match="need sliding_window"):
        medlens.explain(seg, volume, "saliency", targets=[target], sliding_window_blend="gaussian")
    with pytest.raises(MethodError, match="sliding_window_blend"):
        medlens.explain(seg, volume, "saliency", targets=[target], sliding_window=(16, 16, 16),
                        sliding_window_blend="mean")
    classifier = nn.Sequential(nn.Conv3d(1, 2, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten()).eval()
    with pytest.raises(ModelError, match="per-voxel logits of the window's size"):
        medlens.explain(classifier, volume, "saliency", targets=0, sliding_window=(16, 16, 16))


def test_model_left_as_found(seg: nn.Module, volume: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    medlens.explain(seg, volume, "saliency", targets=[medlens.SegmentationTarget(1, None)], sliding_window="16,16,16",
                    sliding_window_blend="gaussian")
    assert all(p.grad is None for p in seg.parameters())
    assert all(torch.equal(before[k], v) for k, v in seg.state_dict().items())
    assert not seg._forward_hooks and not seg.training
