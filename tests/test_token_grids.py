"""Vision transformers in the CAM, gradient and perturbation families: token outputs on their patch grids.

The automatic layer (a ViT's last block's first norm), the grid each layer's output is read on (class and
distillation tokens set aside, non-square inputs, Swin's channels-last maps), Grad-CAM against a hand-written
version on the reshaped tokens and against pytorch-grad-cam with its reshape transform, every method on
torchvision, timm and HuggingFace models, errors for layers that fit no grid, and the model left as found.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medlens
from medlens.core.model_state import hook_count
from medlens.errors import MethodError
from medlens.tensor.spatial import upsample_to

from transformer_models import AUTO_LAYER, NAMES, build

EVERY_METHOD = [n for n in medlens.methods() if n not in ("cam", "lrp", "attention_rollout", "transformer_attribution")]
FAST = dict(n_masks=32, num_samples=24, n_steps=4, n_samples=2, window=8, stride=8)


def _x(size, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _captured_tokens(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: list[int]):
    """The layer's output and the target logits' gradient with respect to it, by hand (a plain hook)."""
    seen = {}

    def hook(_m, _i, out):
        t = out[0] if isinstance(out, tuple) else out
        t.retain_grad()
        seen["a"] = t

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = model(x.clone().requires_grad_(True))
            logits = out.logits if hasattr(out, "logits") else out
            logits[torch.arange(x.shape[0]), target].sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return seen["a"].detach(), seen["a"].grad.detach()


@pytest.mark.parametrize("name", NAMES)
def test_the_automatic_layer_and_its_grid_and_gradcam_by_hand(name):
    model, size = build(name)
    x = _x(size)
    result = medlens.explain(model, x, "gradcam", targets=[[0], [2]])
    layer = result.provenance["layer"]
    pattern, kind, prefix, grid = AUTO_LAYER[name]
    assert re.fullmatch(pattern, layer["name"]) and layer["chosen_automatically"], layer
    if kind == "tokens":
        assert f"{prefix} leading" in layer["layout"] and " x ".join(map(str, grid)) + " grid" in layer["layout"]
    if pattern.endswith("norm1") or "ln_1" in pattern or "layernorm_before" in pattern:
        assert "last transformer block's first norm" in layer["reason"]
    # Grad-CAM written out on the layer's own output: tokens after the prefix laid row by row on the grid
    module = dict(model.named_modules())[layer["name"]]
    a, g = _captured_tokens(model, module, x, [0, 2])
    if kind == "tokens":
        a, g = (t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2) for t in (a, g))
    elif kind == "channels_last":
        a, g = a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)
    expected = upsample_to(cam[:, None], size)
    assert result["gradcam"].abs().amax() > 0
    torch.testing.assert_close(result["gradcam"], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().amax()))


@pytest.mark.parametrize("name", ["tv_vit", "timm_deit", "hf_swin", "timm_swin"])
def test_every_cam_gradient_guided_and_perturbation_method_runs_on_transformers(name):
    model, size = build(name)
    x = _x(size, batch=1)
    options = {k: v for k, v in FAST.items() if any(k in medlens.method_info(m)["options"] for m in EVERY_METHOD)}
    result = medlens.explain(model, x, EVERY_METHOD, targets=[1], seed=0, **options)
    for method in EVERY_METHOD:
        m = result[method]
        assert m.shape == (1, 1, *size) and torch.isfinite(m).all() and m.abs().amax() > 0, method
    assert "plain gradient" in result.provenance["methods"]["guidedbackprop"]["relus"]  # GELU networks
    torch.testing.assert_close(result["guidedbackprop"], result["saliency"])


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "tv_swin"])
def test_perturbation_cams_on_other_libraries(name):
    model, size = build(name)
    result = medlens.explain(model, _x(size), ["scorecam", "ablationcam", "eigencam"], targets=[0, 1])
    for method in ("scorecam", "ablationcam", "eigencam"):
        assert torch.isfinite(result[method]).all() and result[method].abs().amax() > 0, method


def test_ablationcam_on_tokens_is_the_score_drop_of_each_ablated_channel():
    model, size = build("tv_vit")
    x = _x(size, batch=1)
    result = medlens.explain(model, x, "ablationcam", targets=[1])
    layer = model.encoder.layers.encoder_layer_1.ln_1
    with torch.no_grad():
        base = model(x)[0, 1]
        tokens = {}
        h = layer.register_forward_hook(lambda _m, _i, o: tokens.__setitem__("a", o.clone()))
        model(x)
        h.remove()
        a = tokens["a"]
        value = float(a.min()) - 1e7  # a LayerNorm output has negatives: the ablated channel goes far below
        weights = []
        for c in range(a.shape[-1]):
            ablated = a.clone()
            ablated[:, 1:, c] = value  # patch tokens only; the class token stays
            h = layer.register_forward_hook(lambda _m, _i, o: ablated)
            weights.append(base - model(x)[0, 1])
            h.remove()
        w = torch.stack(weights)
        grid = a[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        expected = upsample_to((w[None, :, None, None] * grid).sum(1, keepdim=True), size)
    torch.testing.assert_close(result["ablationcam"], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().amax()))


# ------------------------------------------------------------------------------------ pytorch-grad-cam oracle
gradcam_lib = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

THEIRS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
          "layercam": "LayerCAM", "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM"}


def _vit_reshape(prefix, grid):
    def transform(t):  # pytorch-grad-cam's documented ViT reshape transform
        return t[:, prefix:, :].reshape(t.size(0), *grid, t.size(2)).permute(0, 3, 1, 2)
    return transform


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


def _relu_minmax_on_grid(ours: torch.Tensor, grid, size) -> torch.Tensor:
    """Their post-processing (ReLU and min-max on the layer grid, then resize) applied to our layer-grid map.
    Our maps are bilinear upsamplings of the grid map; the grid map is recovered by least squares."""
    k = grid[0] * grid[1]
    impulses = torch.eye(k, dtype=torch.float64).reshape(k, 1, *grid)
    operator = upsample_to(impulses, size).reshape(k, -1).T
    g = torch.linalg.lstsq(operator, ours.double().reshape(1, -1).T).solution.T.reshape(1, 1, *grid)
    g = F.relu(g)
    g = (g - g.min()) / (g.max() - g.min() + 1e-12)
    return upsample_to(g, size)[0, 0]


@pytest.mark.parametrize("name, layer_of, prefix, grid", [
    ("tv_vit", lambda m: m.encoder.layers[-1].ln_1, 1, (4, 4)),
    ("timm_vit", lambda m: m.blocks[-1].norm1, 1, (4, 6)),
    ("timm_swin", lambda m: m.layers[-1].blocks[-1].norm2, 0, (8, 8)),  # their Swin example's layer: tokens
])
def test_transformer_cams_equal_pytorch_grad_cam_with_its_reshape_transform(name, layer_of, prefix, grid):
    model, size = build(name)
    x = _x(size, batch=1, seed=5)
    layer = layer_of(model)
    layer_name = next(n for n, m in model.named_modules() if m is layer)
    result = medlens.explain(model, x, list(THEIRS), targets=[2], layer=layer_name)
    for method, cls in THEIRS.items():
        with getattr(gradcam_lib, cls)(model=model, target_layers=[layer], reshape_transform=_vit_reshape(prefix, grid)) as cam:
            theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(2)]))[0]
        ours = _relu_minmax_on_grid(result[method][0, 0], grid, size)
        c = max(_corr(ours, theirs), _corr(_relu_minmax_on_grid(-result[method][0, 0], grid, size), theirs)
                if method.startswith("eigen") else -1)
        # On Swin's norm2 tokens their Grad-CAM++ is 0.977 from the float64 textbook formula on the same layer's
        # gradients, ours 1 - 1e-14 (checked by hand on this seed): there the bar is theirs, not ours.
        bar = 0.97 if (name, method) == ("timm_swin", "gradcam++") else 0.999
        assert c >= bar, f"{name} {method}: correlation {c:.5f} with pytorch-grad-cam"


# ----------------------------------------------------------------------------------------------- bad layers
def test_a_token_count_that_fits_no_grid_is_refused_with_the_layer_and_shape():
    class OddTokens(nn.Module):  # a patch embedding of stride 4, then 100 tokens: no grid of a 32 x 32 input
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(1, 8, 4, stride=4)
            self.grow = nn.Linear(64, 100)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            tokens = self.mix(self.grow(self.embed(x).flatten(2)).transpose(1, 2))  # (B, 100, 8)
            return self.head(tokens.mean(1))

    with pytest.raises(MethodError, match=r"mix's output \(1, 100, 8\).*100 tokens fit no patch grid of the input 32 x 32"):
        medlens.explain(OddTokens().eval(), torch.randn(1, 1, 32, 32), "gradcam", layer="mix")


def test_a_layer_neither_spatial_nor_tokens_is_refused_with_what_to_pass():
    model, size = build("tv_vit")
    with pytest.raises(MethodError, match=r"heads.head's output has shape \(1, 3\).*nor a token sequence.*norm"):
        medlens.explain(model, _x(size, batch=1), "gradcam", layer="heads.head")
    with pytest.raises(MethodError, match=r"self_attention returns tuple|does not have the input's batch size"):
        medlens.explain(build("timm_swin")[0], _x((64, 64), batch=1), "gradcam", layer="layers.1.blocks.0.attn")


@pytest.mark.parametrize("name", ["tv_vit", "hf_swin"])
def test_transformers_are_left_as_found(name):
    model, size = build(name)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks, flags = hook_count(model), [p.requires_grad for p in model.parameters()]
    medlens.explain(model, _x(size), ["gradcam", "ablationcam", "scorecam"], targets=[0, 1])
    assert hook_count(model) == hooks and model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_aug_smooth_on_a_fixed_size_vit_leaves_out_the_rescaled_copies_and_says_so():
    model, size = build("tv_vit")
    x = _x(size, batch=1)
    result = medlens.explain(model, x, "gradcam", targets=[1], aug_smooth=True)
    notes = result.provenance["methods"]["gradcam"]
    assert notes["aug_smooth"] == ["identity", "intensity_1.1", "intensity_0.9"]
    assert "takes only its own input size" in notes["aug_smooth_scales_left_out"]
    # the average of the three maps it kept (Grad-CAM is linear in the input's intensity only through the model)
    maps = [medlens.explain(model, x * f, "gradcam", targets=[1])["gradcam"] for f in (1.0, 1.1, 0.9)]
    torch.testing.assert_close(result["gradcam"], sum(maps) / 3, rtol=1e-4, atol=1e-6)


def test_a_huggingface_vit_goes_through_the_pipeline_from_a_file_to_written_results(tmp_path):
    from PIL import Image

    from medlens.core.input_spec import InputSpec
    from medlens.pipeline import ExplainRequest, explain_file, plan_for, write_outcome

    model, size = build("hf_vit")
    model.input_spec = InputSpec(size=size, channels=3, labels=("a", "b", "c"))
    model.labels, model.multi_label = ["a", "b", "c"], False
    image = (torch.rand(40, 40, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "scan.png")
    plan = plan_for(model, ExplainRequest.build("gradcam,attention_rollout,lrp", targets="all"))
    outcome = explain_file(plan, tmp_path / "scan.png")
    assert set(outcome.prediction()) == {"a", "b", "c"} and abs(sum(outcome.prediction().values()) - 1) < 1e-5
    for method in ("gradcam", "attention_rollout", "lrp"):
        assert outcome.result[method].shape == (1, 3, *size) and outcome.result[method].abs().amax() > 0
    write_outcome(outcome, tmp_path / "out")
    assert list((tmp_path / "out").rglob("provenance.json")) and list((tmp_path / "out").rglob("*.png"))


def test_a_cnn_with_channel_attention_keeps_its_last_spatial_layer():
    class ChannelAttention(nn.Module):  # squeeze-and-excitation, named as many CNN papers name it
        def __init__(self, c: int) -> None:
            super().__init__()
            self.fc = nn.Linear(c, c)

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3))))[:, :, None, None]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.attention = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), ChannelAttention(8)

        def forward(self, x):
            return self.attention(torch.relu(self.bn(self.conv(x))))

    model = nn.Sequential(Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    result = medlens.explain(model, torch.randn(1, 1, 16, 16), "gradcam", targets=[0])
    assert result.provenance["layer"]["name"] == "0"
    assert result.provenance["layer"]["reason"] == "the last layer with a spatial output before the global pooling"
