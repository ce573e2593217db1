"""AttnLRP's own softmax rule (`lrp` with softmax="attnlrp", Achtibat et al. 2024) against relevance propagated by
hand through one attention module: LRP-0 on the linear maps, the uniform rule (half to each factor) on the query-key
and value products, R_s = s (R_p - p sum R_p) on the softmax; and the conservation it gives (the softmax's
linearisation absorbs a share, which the hand computation says exactly).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medlens
from medlens.errors import MethodError
from medlens.families.lrp.transformer import transformer_relevance

from helpers import make_tiny2d


class Attention(nn.Module):
    """timm's attribute names (qkv, num_heads, scale, proj), one head, no biases."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_heads, self.scale = 1, dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1) @ v)


class OneBlock(nn.Module):
    """4x4 patches (a linear patch embedding), one attention module, the first token's output into a linear head."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.patch = nn.Conv2d(2, dim, 4, stride=4, bias=False)
        self.attn = Attention(dim)
        self.norm = nn.LayerNorm(dim)  # unused: makes `lrp` take the transformer rules
        self.head = nn.Linear(dim, 3, bias=False)

    def forward(self, x):
        return self.head(self.attn(self.patch(x).flatten(2).transpose(1, 2))[:, 0])


def _linear(x: torch.Tensor, w: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """LRP-0 through z = x w^T: R_x = x * (r_out / z) w."""
    return x * ((r_out / (x @ w.T)) @ w)


@torch.no_grad()
def _hand(model: OneBlock, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The relevance of one image and its logit, propagated layer by layer in float64 with the rules written out."""
    m = model.double()
    x = x.double()
    patches = nn.functional.unfold(x, 4, stride=4)[0].T  # (N, 2*4*4): the patch embedding as a linear map
    w_patch = m.patch.weight.reshape(m.patch.weight.shape[0], -1)
    t = patches @ w_patch.T  # tokens (N, d)
    w_q, w_k, w_v = m.attn.qkv.weight.chunk(3, dim=0)
    q, k, v = t @ w_q.T, t @ w_k.T, t @ w_v.T
    s = (q * m.attn.scale) @ k.T
    p = torch.softmax(s, dim=-1)
    o = p @ v
    y = o @ m.attn.proj.weight.T
    logit = y[0] @ m.head.weight[target]
    r_y = torch.zeros_like(y)
    r_y[0] = y[0] * m.head.weight[target]  # LRP-0 into the head's input; the other tokens are not read
    r_o = _linear(o, m.attn.proj.weight, r_y)
    share = r_o / o  # o_ic = sum_j p_ij v_jc: the uniform rule gives each factor half of every term's share
    r_p = 0.5 * p * (share @ v.T)
    r_v = 0.5 * v * (p.T @ share)
    r_s = s * (r_p - p * r_p.sum(dim=-1, keepdim=True))  # AttnLRP's softmax rule
    share_s = r_s / s * m.attn.scale  # s_ij = scale sum_c q_ic k_jc
    r_q = 0.5 * q * (share_s @ k)
    r_k = 0.5 * k * (share_s.T @ q)
    r_t = _linear(t, w_q, r_q) + _linear(t, w_k, r_k) + _linear(t, w_v, r_v)
    r_patches = _linear(patches, w_patch, r_t)  # (N, 2*4*4)
    relevance = nn.functional.fold(r_patches.T[None], x.shape[2:], 4, stride=4)[0]
    m.float()
    return relevance, logit


@pytest.fixture
def block() -> OneBlock:
    torch.manual_seed(0)
    return OneBlock().eval()


def test_attnlrp_softmax_rule_equals_the_relevance_propagated_by_hand(block):
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[2], [0]])
    with torch.no_grad():
        logits = block(x)
    ours = transformer_relevance(block, x, targets, logits, softmax="attnlrp")
    assert ours.notes["softmax"] == "attnlrp" and "R_s = s (R_p - p sum R_p)" in ours.notes["rules"]["attention"]
    for b in range(2):
        expected, logit = _hand(block, x[b:b + 1], int(targets[b, 0]))
        torch.testing.assert_close(ours.relevance[0, b].double(), expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))
        # what it conserves: the hand computation's sum, which is not the logit (the softmax absorbs a share)
        assert float(ours.relevance[0, b].sum()) == pytest.approx(float(expected.sum()), rel=1e-4)
        assert abs(float(expected.sum()) - float(logit)) > 1e-3 * abs(float(logit))


def test_constant_softmax_conserves_and_the_option_reaches_the_provenance(block):
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    held = medlens.explain(block, x, "lrp", targets=1)
    own = medlens.explain(block, x, "lrp", targets=1, softmax="attnlrp")
    logit = float(held.logits[0, 1])
    assert float(held["lrp"].sum()) == pytest.approx(logit, rel=1e-4)  # no biases: everything reaches the input
    notes = own.provenance["methods"]["lrp"]
    assert notes["softmax"] == "attnlrp" and "linearisation absorbs" in notes["conservation"]["tolerance"]
    assert notes["conservation"]["relevance_sum"][0][0] == pytest.approx(float(own["lrp"].sum()), rel=1e-5)
    assert not torch.allclose(own["lrp"], held["lrp"])


def test_a_bad_softmax_choice_and_softmax_on_a_cnn_are_refused(block):
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(MethodError, match="softmax of lrp must be one of constant, attnlrp"):
        medlens.explain(block, x, "lrp", softmax="exact")
    cnn = make_tiny2d(0, in_channels=1, num_classes=2)
    with pytest.raises(MethodError, match="attention of vision transformers"):
        medlens.explain(cnn, torch.randn(1, 1, 16, 16), "lrp", softmax="attnlrp")


@pytest.mark.parametrize("name", ["tv_vit", "timm_vit"])
def test_the_softmax_rule_runs_on_library_vits_and_leaves_them_as_found(name):
    from transformer_models import build

    model, size = build(name)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = medlens.explain(model, x, "lrp", targets=0, softmax="attnlrp")
    held = medlens.explain(model, x, "lrp", targets=0)
    assert torch.isfinite(own["lrp"]).all() and own["lrp"].abs().amax() > 0
    assert not torch.allclose(own["lrp"], held["lrp"])  # relevance now also flows through queries and keys
    assert own.provenance["methods"]["lrp"]["softmax"] == "attnlrp"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
