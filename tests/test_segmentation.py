"""Segmentation targets: a class's logits summed over a region, explained by every method, 2-D and 3-D.

References: pytorch-grad-cam's `SemanticSegmentationTarget` (Grad-CAM, corr >= 0.999); integrated-gradient
completeness of the region score (within 1 %); and, for every method, equality with the same method explained on a
hand-written classifier whose one output is the region sum (an independent wrapper, not medlens').
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import medlens
from medlens.errors import MethodError, ModelError, TargetError


class TinySeg(nn.Module):
    """Three classes per pixel; class 1 follows the input's brightness, so its predicted region is a real blob."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.c1, self.c2, self.head = conv(1, 6, 3, padding=1), conv(6, 8, 3, padding=1), conv(8, 3, 1)

    def forward(self, x: torch.Tensor) -> dict:
        out = self.head(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return {"out": out + torch.cat([0 * x, 3 * x, 0 * x], dim=1)}  # torchvision's segmentation output form


class RegionSum(nn.Module):
    """The reference: a classifier with one output, class k's logits summed over a fixed mask."""

    def __init__(self, seg: nn.Module, k: int, mask: torch.Tensor) -> None:
        super().__init__()
        self.seg, self.k, self.mask = seg, k, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.seg(x)["out"][:, self.k] * self.mask).flatten(1).sum(1, keepdim=True)


def _model(dims: int = 2) -> TinySeg:
    torch.manual_seed(0)
    model = TinySeg(dims).eval()
    model.labels = ["background", "lesion", "other"]
    return model


def _input(dims: int = 2, batch: int = 1) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 1, *((24, 24) if dims == 2 else (8, 12, 12)))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def test_gradcam_equals_pytorch_grad_cam_semantic_segmentation_target():
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    model, x = _model(), _input()
    result = medlens.explain(model, x, methods="gradcam", targets=[medlens.SegmentationTarget("lesion")], layer="c2")
    mask = (model(x)["out"].argmax(1)[0] == 1).float()

    class Plain(nn.Module):  # pytorch-grad-cam takes a tensor output
        def __init__(self, seg: nn.Module) -> None:
            super().__init__()
            self.seg = seg

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.seg(x)["out"]

    plain = Plain(model)
    with GradCAM(model=plain, target_layers=[model.c2]) as cam:
        reference = cam(input_tensor=x, targets=[SemanticSegmentationTarget(1, mask.numpy())])[0]
    ours = torch.relu(result["gradcam"][0, 0])
    assert _corr(ours, torch.from_numpy(reference)) >= 0.999
    assert result.target_names() == [["lesion@predicted"]]
    assert result.logits[0, 0].item() == pytest.approx(float((model(x)["out"][0, 1] * mask).sum().detach()), rel=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("region", ["predicted", "box", "mask", None])
def test_integrated_gradients_of_a_region_score_are_complete(dims, region):
    model, x = _model(dims), _input(dims)
    spatial = x.shape[2:]
    if region == "box":
        region = (2, 3, 10, 9) if dims == 2 else (2, 3, 1, 10, 9, 6)
    elif region == "mask":
        region = torch.zeros(spatial, dtype=torch.bool)
        region[..., 4:12, 5:11] = True
    result = medlens.explain(model, x, methods="integratedgradients", n_steps=64,
                             targets=[medlens.SegmentationTarget(1, region=region)])
    gap = result.provenance["methods"]["integratedgradients"]["completeness"]
    assert abs(gap["attribution_sum"][0][0] - gap["output_gap"][0][0]) <= 0.01 * abs(gap["output_gap"][0][0])
    with torch.no_grad():
        baseline_score = float(RegionSum(model, 1, _mask_of(model, x, region))(torch.zeros_like(x))[0, 0])
    assert gap["output_gap"][0][0] == pytest.approx(result.logits[0, 0].item() - baseline_score, rel=1e-4, abs=1e-3)


def _mask_of(model: nn.Module, x: torch.Tensor, region) -> torch.Tensor:
    if isinstance(region, str):
        return (model(x)["out"].argmax(1) == 1).float()
    if isinstance(region, torch.Tensor):
        return region.float()
    mask = torch.zeros(x.shape[2:])
    if region is None:
        return mask + 1
    n = len(region) // 2
    index = tuple(slice(int(a), int(b)) for a, b in zip(region[:n][::-1], region[n:][::-1]))
    mask[(Ellipsis, *index)] = 1
    return mask


METHODS_2D = ["gradcam", "layercam", "eigencam", "saliency", "inputxgradient", "guidedbackprop", "integratedgradients",
              "lrp", "occlusion", "rise", "lime", "kernelshap"]
OPTIONS = {"n_masks": 64, "num_samples": 60, "n_segments": 8, "window": 6, "stride": 4, "n_steps": 8}


@pytest.mark.parametrize("dims", [2, 3])
def test_every_method_explains_the_region_score_as_a_one_output_classifier(dims):
    model, x = _model(dims), _input(dims)
    methods = METHODS_2D if dims == 2 else [m for m in METHODS_2D if m not in ("lime", "kernelshap")]
    options = dict(OPTIONS, window=6 if dims == 2 else 4)
    if dims == 3:
        options = {k: v for k, v in options.items() if k not in ("num_samples", "n_segments")}
    box = (2, 3, 10, 9) if dims == 2 else (2, 3, 1, 10, 9, 6)
    ours = medlens.explain(model, x, methods=methods, targets=[medlens.SegmentationTarget("lesion", region=box)],
                           layer="c2", seed=3, **options)
    reference_model = RegionSum(model, 1, _mask_of(model, x, box)).eval()
    reference = medlens.explain(reference_model, x, methods=methods, targets=0, layer=model.c2, seed=3, **options)
    for method in methods:
        assert torch.allclose(ours[method], reference[method], rtol=1e-4, atol=1e-5), method
    assert ours.logits[0, 0].item() == pytest.approx(reference.logits[0, 0].item(), rel=1e-5)


def test_each_image_of_a_batch_is_explained_over_its_own_predicted_region():
    model, x = _model(), _input(batch=2)
    targets = [medlens.SegmentationTarget("lesion"), medlens.SegmentationTarget("other", region=None)]
    together = medlens.explain(model, x, methods=["gradcam", "occlusion"], targets=targets, layer="c2", window=6, stride=4)
    for b in range(2):
        alone = medlens.explain(model, x[b:b + 1], methods=["gradcam", "occlusion"], targets=targets, layer="c2",
                                window=6, stride=4)
        for method in ("gradcam", "occlusion"):
            assert torch.allclose(together[method][b], alone[method][0], rtol=1e-4, atol=1e-4), method
        assert torch.allclose(together.logits[b], alone.logits[0], rtol=1e-5)
    assert together.provenance["region_targets"]["targets"][0]["pixels"] != [576, 576]


def test_the_model_comes_back_as_it_was():
    model, x = _model(), _input()
    model.train()
    medlens.explain(model, x, methods=["gradcam", "saliency"], targets=[medlens.SegmentationTarget(1)])
    assert model.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_bad_targets_say_what_was_wrong():
    model, x = _model(), _input()
    with pytest.raises(TargetError, match="unknown class name 'tumour'"):
        medlens.explain(model, x, targets=[medlens.SegmentationTarget("tumour")])
    with pytest.raises(TargetError, match="out of range"):
        medlens.explain(model, x, targets=[medlens.SegmentationTarget(7)])
    with pytest.raises(TargetError, match="the mask has shape"):
        medlens.explain(model, x, targets=[medlens.SegmentationTarget(1, region=torch.ones(20, 20))])
    with pytest.raises(TargetError, match="not inside the image"):
        medlens.explain(model, x, targets=[medlens.SegmentationTarget(1, region=(4, 4, 30, 10))])
    with pytest.raises(TargetError, match="empty"):
        medlens.explain(model, x, targets=[medlens.SegmentationTarget(1, region=torch.zeros(24, 24))])
    with pytest.raises(MethodError, match="output='logit'"):
        medlens.explain(model, x, methods="occlusion", output="probability", targets=[medlens.SegmentationTarget(1)])
    with pytest.raises(MethodError, match="aug_smooth / aug_flip"):
        medlens.explain(model, x, methods="gradcam", aug_flip=True, targets=[medlens.SegmentationTarget(1)])
    with torch.no_grad():
        model.head.bias[1] -= 100.0  # the model now finds no lesion anywhere
    with pytest.raises(MethodError, match="found nothing for 'lesion' in image 0"):
        medlens.explain(model, x, targets=[medlens.SegmentationTarget("lesion")])


def test_a_segmentation_output_without_a_region_target_says_what_to_give():
    with pytest.raises(ModelError, match="SegmentationTarget"):
        medlens.explain(_model(), _input(), targets=1)


def test_a_classifier_is_refused_for_a_segmentation_target():
    classifier = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(ModelError, match="per-pixel logits"):
        medlens.explain(classifier, _input(), targets=[medlens.SegmentationTarget(1)])
