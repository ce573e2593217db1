"""Small seeded vision transformers for tests (torchvision, timm, HuggingFace, built from configs; nothing downloaded)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn


def _seeded_head(model: nn.Module, seed: int) -> nn.Module:
    """torchvision zero-initialises the ViT head (constant logits, zero gradients): give every head random weights."""
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == 3:
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, int]]:
    """(model with 3 classes, input size) for one of NAMES."""
    torch.manual_seed(seed)
    if name.startswith("tv_"):
        torchvision = pytest.importorskip("torchvision")
        if name == "tv_vit":
            model, size = torchvision.models.VisionTransformer(
                image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3), (32, 32)
        else:
            model, size = torchvision.models.SwinTransformer(
                patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=3), (64, 64)
    elif name.startswith("timm_"):
        timm = pytest.importorskip("timm")
        small = dict(pretrained=False, num_classes=3, patch_size=8, depth=2, embed_dim=32, num_heads=2)
        if name == "timm_vit":  # a non-square input: a 4 x 6 patch grid
            model, size = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), **small), (32, 48)
        elif name == "timm_deit":
            model, size = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, **small), (32, 32)
        else:
            model, size = timm.create_model(
                "swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=64, patch_size=4,
                window_size=4, depths=(1, 1), num_heads=(2, 2), embed_dim=16), (64, 64)
    else:
        transformers = pytest.importorskip("transformers")
        vit = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                   intermediate_size=64, num_labels=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "hf_vit":
                model, size = transformers.ViTForImageClassification(transformers.ViTConfig(**vit)), (32, 32)
            elif name == "hf_deit":
                model, size = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**vit)), (32, 32)
            else:
                model, size = transformers.SwinForImageClassification(transformers.SwinConfig(
                    image_size=64, patch_size=4, window_size=4, depths=[1, 1], num_heads=[2, 2], embed_dim=16,
                    num_labels=3)), (64, 64)
    return _seeded_head(model, seed + 1), size


NAMES = ["tv_vit", "tv_swin", "timm_vit", "timm_deit", "timm_swin", "hf_vit", "hf_deit", "hf_swin"]
# The automatic CAM layer of each (a regular expression: transformers 4 says `encoder.layer`, 5 `layers`) and how
# its output lies: (name, layout kind, leading tokens, grid)
AUTO_LAYER = {
    "tv_vit": (r"encoder\.layers\.encoder_layer_1\.ln_1", "tokens", 1, (4, 4)),
    "tv_swin": ("permute", "channels_first", 0, (8, 8)),
    "timm_vit": (r"blocks\.1\.norm1", "tokens", 1, (4, 6)),
    "timm_deit": (r"blocks\.1\.norm1", "tokens", 2, (4, 4)),
    "timm_swin": ("norm", "channels_last", 0, (8, 8)),
    "hf_vit": (r"vit\.(encoder\.layer|layers)\.1\.layernorm_before", "tokens", 1, (4, 4)),
    "hf_deit": (r"deit\.(encoder\.layer|layers)\.1\.layernorm_before", "tokens", 2, (4, 4)),
    "hf_swin": (r"swin\.encoder\.layers\.1\.blocks\.0\.layernorm_before", "tokens", 0, (8, 8)),
}


# ------------------------------------------------------------------------- a hand-written ViT with explicit attention
class ExplicitAttention(nn.Module):
    """Self-attention written out (timm's attribute names); keeps its probabilities (with their gradient when asked).
    With `lrp_rules` the softmax weights enter the value product detached (LRP for transformers, by hand)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=bias), nn.Linear(dim, dim, bias=bias)
        self.kept: list[torch.Tensor] = []
        self.lrp_rules = False

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if attn.requires_grad:
            attn.retain_grad()
        self.kept.append(attn)
        weights = attn.detach() if self.lrp_rules else attn
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class HandNorm(nn.LayerNorm):
    """LayerNorm written out; with `lrp_rules` its standard deviation is a constant."""

    lrp_rules = False

    def forward(self, x):
        std = (x.var(dim=-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        y = (x - x.mean(dim=-1, keepdim=True)) / (std.detach() if self.lrp_rules else std)
        y = y * self.weight
        return y + self.bias if self.bias is not None else y


class HandGELU(nn.GELU):
    """GELU; with `lrp_rules` the identity rule: x times its (constant) ratio gelu(x) / x."""

    lrp_rules = False

    def forward(self, x):
        y = super().forward(x)
        return x * (y / x).detach() if self.lrp_rules else y


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.norm1, self.attn = HandNorm(dim, bias=bias), ExplicitAttention(dim, heads, bias)
        self.norm2 = HandNorm(dim, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=bias), HandGELU(), nn.Linear(2 * dim, dim, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandViT(nn.Module):
    """A small ViT: 8-pixel patches, a class token, three blocks, the class token's norm into a linear head. With
    `bias=False` no layer has a bias and the class token and position embeddings are zero (nothing absorbs relevance)."""

    def __init__(self, dim: int = 24, heads: int = 3, depth: int = 3, size: int = 32, bias: bool = True) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8, bias=bias)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5 * bias)
        self.pos = nn.Parameter(torch.randn(1, (size // 8) ** 2 + 1, dim) * 0.5 * bias)
        self.blocks = nn.Sequential(*[Block(dim, heads, bias) for _ in range(depth)])
        self.norm, self.head = HandNorm(dim, bias=bias), nn.Linear(dim, 3, bias=bias)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])

    def attention(self) -> list[torch.Tensor]:
        return [b.attn.kept[-1] for b in self.blocks]

    def forget(self) -> None:
        for b in self.blocks:
            b.attn.kept.clear()

    def with_lrp_rules(self, on: bool) -> "HandViT":
        for m in self.modules():
            if hasattr(m, "lrp_rules"):
                m.lrp_rules = on
        return self
