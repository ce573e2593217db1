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
