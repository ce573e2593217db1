"""`lrp` on vision transformers (AttnLRP's rules): equal to input x gradient of a hand-written ViT whose LayerNorm,
attention and GELU apply the rules in their own code, conservation to its documented tolerance where nothing absorbs
relevance, and what the provenance reports on torchvision, timm and HuggingFace ViTs."""
from __future__ import annotations

import pytest
import torch

import medlens
from medlens.core.model_state import hook_count
from medlens.errors import MethodError
from medlens.families.lrp.transformer import CONSERVATION_TOLERANCE

from transformer_models import HandViT, build


def _x(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("bias", [True, False])
def test_lrp_equals_input_times_gradient_of_the_rules_written_into_the_model(bias):
    torch.manual_seed(1)
    vit = HandViT(bias=bias).eval()
    x, targets = _x(), [[0, 2], [1, 0]]
    result = medlens.explain(vit, x, "lrp", targets=targets)
    vit.with_lrp_rules(True)
    expected = torch.zeros(2, 2, 32, 32)
    for i in range(2):
        for t in range(2):
            leaf = x[i : i + 1].clone().requires_grad_(True)
            vit(leaf)[0, targets[i][t]].backward()
            expected[i, t] = (leaf.grad * leaf.detach()).sum(dim=1)[0]
    vit.with_lrp_rules(False).zero_grad(set_to_none=True)
    torch.testing.assert_close(result["lrp"], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    conservation = result.provenance["methods"]["lrp"]["conservation"]
    fractions = torch.tensor(conservation["fraction_reaching_input"])
    if not bias:  # nothing absorbs relevance: the input's relevance sums to the logit
        assert (fractions - 1).abs().max() <= CONSERVATION_TOLERANCE, fractions
    else:
        assert (fractions - 1).abs().max() > 1e-2  # biases, class token and positions absorb some: reported, not hidden
    assert "tolerance" in conservation


@pytest.mark.parametrize("name", ["tv_vit", "timm_deit", "hf_vit"])
def test_lrp_on_library_vits_reports_rules_and_leaves_the_model_as_found(name):
    model, size = build(name)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    hooks = hook_count(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = medlens.explain(model, x, "lrp", targets=[1])
    notes = result.provenance["methods"]["lrp"]
    assert torch.isfinite(result["lrp"]).all() and result["lrp"].abs().amax() > 0
    assert notes["layers"]["attention"] == 2 and notes["layers"]["LayerNorm"] >= 5 and notes["layers"]["identity_rule"] == 2
    assert "held constant" in notes["rules"]["LayerNorm"] and "relevance_sum" in notes["conservation"]
    assert hook_count(model) == hooks and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


def test_cnn_composites_are_refused_on_transformers_and_swin_is_refused():
    model, size = build("tv_vit")
    with pytest.raises(MethodError, match="AttnLRP's rules .* composite='epsilon_plus_flat' is a preset for CNNs"):
        medlens.explain(model, torch.rand(1, 3, *size), "lrp", composite="epsilon_plus_flat")
    swin, size = build("timm_swin")
    with pytest.raises(MethodError, match="windowed"):
        medlens.explain(swin, torch.rand(1, 3, *size), "lrp")
