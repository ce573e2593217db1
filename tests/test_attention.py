"""The attention family: `attention_rollout` and `transformer_attribution` against formulas written out here on a
hand-written ViT whose attention is explicit, the logits unchanged by the recomputation on torchvision, timm and
HuggingFace ViTs, the model left as found, and the refusals (no attention, Swin windows, bad options)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medlens
from medlens.core.model_state import hook_count
from medlens.errors import MethodError

from conftest import TinyCNN2d
from transformer_models import HandViT, build


@pytest.fixture
def vit() -> HandViT:
    torch.manual_seed(0)
    return HandViT().eval()


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _on_input(grid_rows: torch.Tensor) -> torch.Tensor:
    """(B, T, 16) class-token rows over the 4 x 4 patches -> maps at 32 x 32 (bilinear, as any grid map)."""
    return F.interpolate(grid_rows.reshape(*grid_rows.shape[:2], 4, 4), size=(32, 32), mode="bilinear",
                         align_corners=False)


@pytest.mark.parametrize("fusion, discard", [("mean", 0.0), ("max", 0.0), ("min", 0.5), ("mean", 0.9)])
def test_rollout_equals_the_formula_on_explicit_attention(vit, fusion, discard):
    x = _x()
    result = medlens.explain(vit, x, "attention_rollout", targets=[0, 2], head_fusion=fusion, discard_ratio=discard)
    vit.forget()
    with torch.no_grad():
        vit(x)
    expected = []
    for i in range(x.shape[0]):
        joint = torch.eye(17)
        for attn in vit.attention():
            a = {"mean": attn[i].mean(0), "max": attn[i].max(0).values, "min": attn[i].min(0).values}[fusion]
            if discard:
                flat = a.flatten().clone()
                order = flat.argsort()[: int(flat.numel() * discard)]
                flat[order[order != 0]] = 0  # the class token's attention to itself is never dropped
                a = flat.reshape(17, 17)
            a = (a + torch.eye(17)) / 2
            a = a / a.sum(dim=1, keepdim=True)
            joint = a @ joint
        expected.append(joint[0, 1:])
    expected = _on_input(torch.stack(expected)[:, None].expand(-1, 2, -1))
    torch.testing.assert_close(result["attention_rollout"], expected, rtol=1e-5, atol=1e-6)
    assert result.provenance["methods"]["attention_rollout"]["class_agnostic"]


def test_transformer_attribution_equals_gradient_weighted_relevance_by_hand(vit):
    x = _x()
    targets = [[0, 1], [2, 0]]
    result = medlens.explain(vit, x, "transformer_attribution", targets=targets)
    expected = torch.zeros(2, 2, 16)
    for i in range(2):
        for t in range(2):
            vit.forget()
            vit.zero_grad()
            with torch.enable_grad():
                vit(x[i : i + 1].clone().requires_grad_(True))[0, targets[i][t]].backward()
            relevance = torch.eye(17)
            for attn in vit.attention():
                cam = (attn.grad[0] * attn[0].detach()).clamp(min=0).mean(0)
                relevance = relevance + cam @ relevance
            expected[i, t] = relevance[0, 1:]
    vit.zero_grad(set_to_none=True)
    torch.testing.assert_close(result["transformer_attribution"], _on_input(expected), rtol=1e-4, atol=1e-6)
    # Different targets, different maps (it is class-specific, unlike rollout)
    assert not torch.allclose(result["transformer_attribution"][0, 0], result["transformer_attribution"][0, 1])


@pytest.mark.parametrize("name", ["tv_vit", "timm_vit", "timm_deit", "hf_vit", "hf_deit"])
def test_recomputed_attention_leaves_logits_and_model_unchanged(name):
    model, size = build(name)
    model.train()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_count(model)
    with torch.no_grad():
        model.eval()
        out = model(x)
        plain = out.logits if hasattr(out, "logits") else out
        model.train()
    result = medlens.explain(model, x, ["attention_rollout", "transformer_attribution"], targets=[[0], [1]])
    for method in ("attention_rollout", "transformer_attribution"):
        assert torch.isfinite(result[method]).all() and result[method].abs().amax() > 0
        note = result.provenance["methods"][method]["attention"]
        assert "2 attention module(s) recomputed" in note and float(note.rsplit("to ", 1)[1].split()[0]) <= 1e-5
    torch.testing.assert_close(result.logits, plain, rtol=1e-5, atol=1e-6)
    assert hook_count(model) == hooks and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_attention_methods_refuse_models_without_global_attention():
    torch.manual_seed(0)
    with pytest.raises(MethodError, match="TinyCNN2d has no attention blocks"):
        medlens.explain(TinyCNN2d().eval(), torch.randn(1, 1, 16, 16), "attention_rollout")
    swin, size = build("timm_swin")
    with pytest.raises(MethodError, match="windowed"):
        medlens.explain(swin, torch.randn(1, 3, *size), "transformer_attribution")


@pytest.mark.parametrize("options, message", [({"head_fusion": "median"}, "head_fusion must be one of"),
                                              ({"discard_ratio": 1.0}, r"discard_ratio must be a number in \[0, 1\)")])
def test_bad_rollout_options_are_refused(vit, options, message):
    with pytest.raises(MethodError, match=message):
        medlens.explain(vit, _x(1), "attention_rollout", **options)


def test_attention_maps_do_not_depend_on_the_callers_grad_mode(vit):
    x = _x()
    methods = ["attention_rollout", "transformer_attribution"]
    reference = medlens.explain(vit, x, methods, targets=[1])
    with torch.no_grad():
        quiet = medlens.explain(vit, x, methods, targets=[1])
    with torch.inference_mode():
        inference = medlens.explain(vit, x, methods, targets=[1])
    for method in methods:
        torch.testing.assert_close(quiet[method], reference[method])
        torch.testing.assert_close(inference[method], reference[method])
