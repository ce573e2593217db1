"""Similarity targets: an encoder's embedding explained by its cosine similarity to a reference embedding.

References: the score against torch.nn.functional.cosine_similarity computed here; saliency against the autograd
gradient of that similarity; integrated-gradient completeness against sim(x) - sim(baseline) (within 1 %); Grad-CAM
on a HuggingFace ViTModel's token grid against the same map of a hand-written one-output wrapper.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.functional import cosine_similarity

import medlens
from medlens.errors import MedlensError, ModelError, TargetError


class TinyEncoder(nn.Module):
    """A CNN with no classifier head: a 12-wide embedding per image of its features' layout (each channel's 2 x 2
    pooled map less its mean, so embeddings of different images point different ways)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(32, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.proj((pooled - pooled.mean(dim=(2, 3), keepdim=True)).flatten(1))


class CosineOf(nn.Module):
    """The reference: a one-output model, the cosine similarity of `encode(x)` to `ref`, written independently."""

    def __init__(self, model: nn.Module, ref: torch.Tensor, encode) -> None:
        super().__init__()
        self.model, self.ref, self.encode = model, ref, encode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encode(self.model(x))
        return ((e @ self.ref) / (e.norm(dim=1) * self.ref.norm()))[:, None]


def _images(n: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4), size=16, mode="bilinear", align_corners=False)


def _encoder() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    x = _images(2)
    with torch.no_grad():
        ref = model(_images(1))[0]  # another image's embedding
    return model, x, ref


def test_score_is_the_cosine_similarity():
    model, x, ref = _encoder()
    result = medlens.explain(model, x, methods=["saliency"], targets=medlens.SimilarityTarget(ref))
    as_list = medlens.explain(model, x, methods=["saliency"], targets=[medlens.SimilarityTarget(ref.tolist())])
    with torch.no_grad():
        expected = cosine_similarity(model(x), ref[None], dim=1)
    assert torch.allclose(as_list.logits[:, 0], expected, atol=1e-6)
    assert torch.allclose(result.logits[:, 0], expected, atol=1e-6)
    assert expected.abs().max() < 0.9 and (expected[0] - expected[1]).abs() > 0.05  # not all alike
    assert result.target_names()[0] == ["similarity"]
    record = result.provenance["region_targets"]
    assert record["kind"] == "similarity" and record["targets"][0]["width"] == 12
    assert record["targets"][0]["embedding"] == "output"


def test_saliency_is_the_gradient_of_the_similarity():
    model, x, ref = _encoder()
    result = medlens.explain(model, x, methods=["saliency"], targets=medlens.SimilarityTarget(ref))
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cosine_similarity(model(xr), ref[None], dim=1).sum(), xr)
    assert torch.allclose(result["saliency"][:, 0], grad.sum(1), atol=1e-7)  # signed, summed over channels
    assert grad.abs().sum() > 0


def test_integrated_gradients_complete_against_the_similarity():
    model, x, ref = _encoder()
    result = medlens.explain(model, x, methods=["integratedgradients"], targets=medlens.SimilarityTarget(ref),
                             n_steps=128)
    baseline = torch.zeros_like(x)
    with torch.no_grad():
        delta = cosine_similarity(model(x), ref[None], dim=1) - cosine_similarity(model(baseline), ref[None], dim=1)
    total = result["integratedgradients"][:, 0].flatten(1).sum(1)
    assert delta.abs().min() > 0.3
    assert torch.allclose(total, delta, rtol=0.01, atol=1e-4), (total, delta)


def test_one_reference_per_image_and_several_targets():
    model, x, ref = _encoder()
    per_image = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    result = medlens.explain(model, x, methods=["saliency"], targets=[
        medlens.SimilarityTarget(ref, name="other"), medlens.SimilarityTarget(per_image, name="pair")])
    with torch.no_grad():
        e = model(x)
    assert torch.allclose(result.logits[:, 0], cosine_similarity(e, ref[None], dim=1), atol=1e-6)
    assert torch.allclose(result.logits[:, 1], cosine_similarity(e, per_image, dim=1), atol=1e-6)
    # a perturbation method scores image b's copies against image b's reference whatever batch they run in
    occ = medlens.explain(model, x, methods=["occlusion"], targets=medlens.SimilarityTarget(per_image),
                           window=6, stride=4)
    single = medlens.explain(model, x[1:], methods=["occlusion"], targets=medlens.SimilarityTarget(per_image[1]),
                              window=6, stride=4)
    assert torch.allclose(occ["occlusion"][1], single["occlusion"][0], atol=1e-5)


def test_a_reference_of_the_wrong_width_is_refused():
    model, x, _ = _encoder()
    with pytest.raises(TargetError, match=r"width 7.*width 12"):
        medlens.explain(model, x, methods=["saliency"], targets=medlens.SimilarityTarget(torch.ones(7)))
    with pytest.raises(TargetError, match="mixed"):
        medlens.explain(model, x, methods=["saliency"], targets=[medlens.SimilarityTarget(torch.ones(12)), 0])
    with pytest.raises(TargetError, match=r"shape \(3, 12\)"):  # neither one reference nor one per image
        medlens.explain(model, x, methods=["saliency"], targets=medlens.SimilarityTarget(torch.ones(3, 12)))
    tokens = nn.Sequential(nn.Conv2d(1, 12, 4, stride=4), nn.Flatten(2))  # (B, 12, 16): not one vector per image
    with pytest.raises(ModelError, match=r"\(batch, width\).*\(2, 12, 16\)"):
        medlens.explain(tokens, x, methods=["saliency"], targets=medlens.SimilarityTarget(torch.ones(12)))
    with pytest.raises(MedlensError, match="probability"):
        medlens.explain(model, x, methods=["occlusion"], targets=medlens.SimilarityTarget(torch.ones(12)),
                        output="probability")


def test_gradcam_on_a_huggingface_encoders_token_grid():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.ViTModel(transformers.ViTConfig(
            image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
            intermediate_size=64)).eval()
    x, other = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(other).pooler_output[0]
    result = medlens.explain(model, x, methods=["gradcam"], targets=medlens.SimilarityTarget(ref))
    with torch.no_grad():
        expected = cosine_similarity(model(x).pooler_output, ref[None], dim=1)
    assert torch.allclose(result.logits[:, 0], expected, atol=1e-5)
    assert result.provenance["region_targets"]["targets"][0]["embedding"] == "pooler_output"
    layer = result.provenance["layer"]
    assert layer["chosen_automatically"] and "layernorm_before" in layer["name"] and not layer["name"].startswith("model.")
    assert "layout" in layer  # the token sequence read as its 4 x 4 patch grid
    # the same map from an independent one-output wrapper on the same layer
    reference = CosineOf(model, ref, lambda out: out.pooler_output).eval()
    inner = dict(model.named_modules())[layer["name"]]
    expected_map = medlens.explain(reference, x, methods=["gradcam"], targets=0, layer=inner)["gradcam"]
    assert torch.allclose(result["gradcam"], expected_map, atol=1e-6)
    assert result["gradcam"].abs().sum() > 0


def test_an_encoder_without_pooler_is_read_at_its_class_token():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.ViTModel(transformers.ViTConfig(
            image_size=32, patch_size=8, num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
            intermediate_size=32), add_pooling_layer=False).eval()
    x, ref = torch.rand(2, 3, 32, 32), torch.randn(16)
    result = medlens.explain(model, x, methods=["saliency"], targets=medlens.SimilarityTarget(ref))
    with torch.no_grad():
        expected = cosine_similarity(model(x).last_hidden_state[:, 0], ref[None], dim=1)
    assert torch.allclose(result.logits[:, 0], expected, atol=1e-5)
    assert result.provenance["region_targets"]["targets"][0]["embedding"] == "last_hidden_state[:, 0]"
    with pytest.raises(TargetError, match=r"width 32.*width 16"):
        medlens.explain(model, x, methods=["saliency"], targets=medlens.SimilarityTarget(torch.ones(32)))


def test_the_relevance_entering_the_encoder_sums_to_zero():
    """Why LRP does not conserve a similarity (the documented note): embedding x gradient of the cosine is 0."""
    model, x, ref = _encoder()
    e = model(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(cosine_similarity(e, ref[None], dim=1).sum(), e)
    assert torch.allclose((e * grad).sum(1), torch.zeros(2), atol=1e-6)
    record = medlens.explain(model, x, methods=["lrp"], targets=medlens.SimilarityTarget(ref)).provenance
    assert "does not conserve" in record["region_targets"]["note"]
