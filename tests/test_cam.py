"""CAM family values: agreement with pytorch-grad-cam as an oracle, textbook references and axioms.

Covers 2-D torchvision nets (resnet18, densenet121, vgg11), the 3-D path, multi-target sharing, smoothing.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medlens
from medlens.errors import MethodError
from medlens.tensor.spatial import upsample_to

from helpers import correlation, layer_output, torchvision_model

gradcam_lib = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

THEIRS = {
    "gradcam": gradcam_lib.GradCAM,
    "gradcam++": gradcam_lib.GradCAMPlusPlus,
    "xgradcam": gradcam_lib.XGradCAM,
    "hirescam": gradcam_lib.HiResCAM,
    "layercam": gradcam_lib.LayerCAM,
    "eigencam": gradcam_lib.EigenCAM,
    "eigengradcam": gradcam_lib.EigenGradCAM,
    "scorecam": gradcam_lib.ScoreCAM,
    "ablationcam": gradcam_lib.AblationCAM,
}
GRADIENT_CAMS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam"]
EIGEN = {"eigencam", "eigengradcam"}
ALL_CAMS = [n for n in medlens.methods() if medlens.method_info(n)["family"] == "cam"]

# Their target layers (as in the issue) and the layer our automatic choice must match.
THEIR_LAYER = {
    "resnet18": lambda m: m.layer4[-1],
    "densenet121": lambda m: m.features[-1],
    "vgg11": lambda m: m.features[-1],
}
OUR_AUTO_NAME = {"resnet18": "layer4", "densenet121": "features", "vgg11": "features"}
# Score-CAM and Ablation-CAM run one pass per channel in the peer library (1024 full DenseNet passes at the
# last layer): too slow for CI. For those two methods both libraries get the same, cheaper layer instead.
PERTURBATION_LAYER = {
    "resnet18": ("layer1", lambda m: m.layer1),  # 64 channels
    "densenet121": ("features.denseblock4.denselayer16.conv2", lambda m: m.features.denseblock4.denselayer16.conv2),  # 32
    "vgg11": ("features.0", lambda m: m.features[0]),  # 64 channels
}
INPUT_SIZE = {"resnet18": 96, "densenet121": 96, "vgg11": 96}
PERTURBATION_INPUT_SIZE = {"resnet18": 64, "densenet121": 64, "vgg11": 32}


def relu_minmax(maps: torch.Tensor) -> torch.Tensor:
    """The post-processing pytorch-grad-cam applies: ReLU, then min-max per map."""
    m = F.relu(maps.double()).flatten(1)
    m = m - m.min(dim=1, keepdim=True).values
    return m / (m.max(dim=1, keepdim=True).values + 1e-12)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return correlation(a, b, eps=1e-12)


@pytest.fixture(scope="module")
def nets() -> dict:
    return {name: torchvision_model(name, num_classes=5, seed=1) for name in THEIR_LAYER}


def _input(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)


def _blas_one_thread():
    """pytorch-grad-cam's numpy SVDs with OpenBLAS threads next to torch's threads oversubscribe a small CI
    machine (50x slower); one BLAS thread during their calls keeps the oracle tests fast."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _theirs(method: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    kwargs = {"batch_size": 64} if method == "ablationcam" else {}
    with _blas_one_thread(), THEIRS[method](model=model, target_layers=[layer], **kwargs) as cam:
        if method == "scorecam":
            cam.batch_size = 64
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    return torch.from_numpy(out)


def layer_grid_map(maps: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Recover the layer-grid map behind an upsampled map (N, *S) -> (N, *grid).

    Bilinear resizing is linear and, from a coarser grid, injective: least squares against the resize
    operator (built from resized unit impulses) gives the grid map back exactly (up to rounding).
    """
    size = tuple(maps.shape[1:])
    k = 1
    for g in grid:
        k *= g
    impulses = torch.eye(k, dtype=torch.float64).reshape(k, 1, *grid)
    operator = upsample_to(impulses, size).reshape(k, -1).T  # (prod S, prod grid)
    solution = torch.linalg.lstsq(operator, maps.double().reshape(maps.shape[0], -1).T).solution
    return solution.T.reshape(maps.shape[0], *grid)


def _assert_agrees(method: str, ours: torch.Tensor, theirs: torch.Tensor, grid: tuple[int, ...]) -> None:
    """Per image: correlation >= 0.99 after the same ReLU and min-max on both.

    pytorch-grad-cam applies ReLU and min-max on the layer grid and then resizes; we return the raw map at
    input resolution. A ReLU after resizing differs near zero crossings, so we take our map back to the
    layer grid, apply their ReLU, min-max and resize to it, and compare at input resolution.
    """
    size = tuple(ours.shape[1:])
    ours_grid = layer_grid_map(ours, grid)
    for i in range(ours.shape[0]):
        candidates = [ours_grid[i : i + 1]]
        if method in EIGEN:
            # The sign of an SVD component is arbitrary: pytorch-grad-cam keeps whatever numpy returns, we
            # orient the component to agree with the channel sum (tested below). Compare with their orientation.
            candidates.append(-ours_grid[i : i + 1])
        c = max(
            corr(upsample_to(relu_minmax(g).reshape(1, 1, *grid), size), relu_minmax(theirs[i : i + 1]))
            for g in candidates
        )
        assert c >= 0.99, f"{method} image {i}: correlation {c:.4f} with pytorch-grad-cam"


@pytest.mark.parametrize("arch", list(THEIR_LAYER))
def test_gradient_and_eigen_cams_agree_with_pytorch_grad_cam(nets, arch):
    model = nets[arch]
    # Two images with a different class each on resnet18; one image on the heavier nets (CI time).
    batch = 2 if arch == "resnet18" else 1
    x = _input(INPUT_SIZE[arch], batch=batch)
    targets = [1, 3][:batch]
    result = medlens.explain(model, x, GRADIENT_CAMS, targets=[[t] for t in targets])
    # The automatic layer is theirs (or a container whose output is the very same tensor).
    layer_info = {k: result.provenance["layer"][k] for k in ("name", "chosen_automatically", "type")}
    assert layer_info == {"name": OUR_AUTO_NAME[arch], "chosen_automatically": True,
                          "type": type(dict(model.named_modules())[OUR_AUTO_NAME[arch]]).__name__}
    assert result.provenance["layer"]["reason"] == "the last layer with a spatial output before the global pooling"
    ours_layer = dict(model.named_modules())[OUR_AUTO_NAME[arch]]
    activation = layer_output(model, ours_layer, x)
    assert torch.equal(activation, layer_output(model, THEIR_LAYER[arch](model), x))
    for method in GRADIENT_CAMS:
        theirs = _theirs(method, model, THEIR_LAYER[arch](model), x, targets)
        _assert_agrees(method, result[method][:, 0], theirs, tuple(activation.shape[2:]))


@pytest.mark.parametrize("arch", list(THEIR_LAYER))
def test_scorecam_and_ablationcam_agree_with_pytorch_grad_cam(nets, arch):
    model = nets[arch]
    name, their_layer = PERTURBATION_LAYER[arch]
    x = _input(PERTURBATION_INPUT_SIZE[arch], seed=2)
    with torch.no_grad():
        logits = model(x)
    # pytorch-grad-cam divides Ablation-CAM's score drop by the score; on a positive logit that is a positive
    # factor per map, which min-max removes. So compare on each image's top class, whose logit is positive.
    targets = logits.argmax(dim=1).tolist()
    assert all(logits[i, t] > 0 for i, t in enumerate(targets)), "test setup: need positive logits"
    result = medlens.explain(model, x, ["scorecam", "ablationcam"], targets=[[t] for t in targets], layer=name)
    grid = tuple(layer_output(model, their_layer(model), x).shape[2:])
    for method in ("scorecam", "ablationcam"):
        theirs = _theirs(method, model, their_layer(model), x, targets)
        _assert_agrees(method, result[method][:, 0], theirs, grid)


# --------------------------------------------------------------------------------------------- Ablation-CAM
class _TwoChannelNet(nn.Module):
    """Two feature channels; class 0's logit is 2*mean(ch0) - 1*mean(ch1) - 10 (always negative here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 1.0]).view(2, 1, 1, 1))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[2.0, -1.0], [0.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([-10.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_ablationcam_sign_is_right_for_a_negative_logit():
    model = _TwoChannelNet().eval()
    x = torch.rand(1, 1, 8, 8) + 0.5  # both channels equal the (positive) input
    result = medlens.explain(model, x, ["ablationcam", "gradcam"], targets=0)
    assert result.logits[0, 0] < 0
    # Ablating channel 0 lowers the score (it supports the class), ablating channel 1 raises it: the
    # weights are +2*mean and -1*mean, so the map is mean(x)*(2 - 1)*x/mean... i.e. exactly the Grad-CAM map
    # times N (grid size): positive wherever the input is positive. Dividing by the negative score would flip it.
    abl = result["ablationcam"][0, 0]
    assert (abl > 0).all()
    n = x[0, 0].numel()
    mean = x.mean()
    expected = (2.0 * mean) * x[0, 0] - (1.0 * mean) * x[0, 0]
    torch.testing.assert_close(abl, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["gradcam"][0, 0] * n * mean, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ CAM
def test_cam_equals_gradcam_on_a_gap_linear_head(tiny2d):
    x = _input(32, batch=2)[:, :1]
    r = medlens.explain(tiny2d, x, ["cam", "gradcam"], targets=[0, 1, 2])
    torch.testing.assert_close(r["cam"], r["gradcam"], rtol=1e-5, atol=1e-6)
    resnet = torchvision_model("resnet18", num_classes=5, seed=3)
    x = _input(64, batch=2)
    r = medlens.explain(resnet, x, ["cam", "gradcam"], targets=[0, 4])
    torch.testing.assert_close(r["cam"], r["gradcam"], rtol=1e-4, atol=1e-6)


def test_cam_needs_no_backward(tiny2d, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("cam ran a backward pass")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    r = medlens.explain(tiny2d, _input(32, batch=1)[:, :1], "cam", targets=1)
    assert r["cam"].abs().sum() > 0


def test_cam_on_densenet_applies_the_functional_relu(nets):
    model = nets["densenet121"]
    x = _input(64, batch=2)
    r = medlens.explain(model, x, "cam", targets=[2])
    a = layer_output(model, model.features, x)  # (B, C, 2, 2), before DenseNet's functional ReLU
    w = model.classifier.weight.detach()[2]
    textbook = (F.relu(a) * w[None, :, None, None]).sum(dim=1, keepdim=True) / a[0, 0].numel()
    torch.testing.assert_close(r["cam"], upsample_to(textbook, (64, 64)), rtol=1e-4, atol=1e-6)
    # Axiom: on the layer grid, the map's sum plus the bias is the logit.
    torch.testing.assert_close(textbook.sum(dim=(1, 2, 3)) + model.classifier.bias[2], r.logits[:, 2], rtol=1e-4, atol=1e-4)
    assert "ReLU" in r.provenance["methods"]["cam"]["head"]


def test_cam_on_vgg_raises_a_clear_error(nets):
    with pytest.raises(MethodError, match="gradcam"):
        medlens.explain(nets["vgg11"], _input(64, batch=1), "cam")


# ----------------------------------------------------------------------------------------------------- 3-D
def test_every_cam_runs_on_3d_and_gradcam_matches_the_textbook(tiny3d):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 12, 16, 16, generator=gen)
    r = medlens.explain(tiny3d, x, ALL_CAMS, targets=[0, 2])
    for name in ALL_CAMS:
        assert r[name].shape == (2, 2, 12, 16, 16) and r[name].dtype == torch.float32, name
        assert torch.isfinite(r[name]).all() and r[name].abs().sum() > 0, name
    # Textbook Grad-CAM, one image and one class at a time: autograd of the logit w.r.t. the last feature
    # map, channel weights = mean gradient, weighted channel sum, trilinear resize.
    for t_slot, t in enumerate([0, 2]):
        for b in range(2):
            with torch.no_grad():
                act = tiny3d.features(x[b : b + 1])
            act.requires_grad_(True)
            with torch.enable_grad():
                logit = tiny3d.fc(torch.flatten(tiny3d.pool(act), 1))[0, t]
                (g,) = torch.autograd.grad(logit, act)
            textbook = (g.mean(dim=(2, 3, 4), keepdim=True) * act.detach()).sum(dim=1, keepdim=True)
            textbook = F.interpolate(textbook, size=(12, 16, 16), mode="trilinear", align_corners=False)
            torch.testing.assert_close(r["gradcam"][b, t_slot], textbook[0, 0], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- multi-target
def test_several_targets_in_one_call_equal_single_target_calls(tiny2d):
    x = _input(32, batch=2, seed=7)[:, :1]
    targets = [[0, 2, 1], [1, 1, 0]]
    together = medlens.explain(tiny2d, x, ALL_CAMS, targets=targets)
    for slot in range(3):
        single = medlens.explain(tiny2d, x, ALL_CAMS, targets=[[row[slot]] for row in targets])
        for name in ALL_CAMS:
            torch.testing.assert_close(together[name][:, slot], single[name][:, 0], rtol=1e-5, atol=1e-6, msg=name)
    # And the slots really differ where the classes differ (the test could not pass with one map copied).
    assert not torch.allclose(together["gradcam"][0, 0], together["gradcam"][0, 1])


# --------------------------------------------------------------------------------------------- smoothing
def _first_pc(weighted: torch.Tensor) -> torch.Tensor:
    """Textbook first principal component over channels of one (C, *s) array, via numpy."""
    import numpy as np

    arr = weighted.double().numpy().reshape(weighted.shape[0], -1).T
    arr = arr - arr.mean(axis=0)
    _, _, vt = np.linalg.svd(arr, full_matrices=False)
    return torch.from_numpy(arr @ vt[0]).reshape(weighted.shape[1:])


def test_eigen_smooth_gives_the_first_principal_component(tiny2d):
    x = _input(32, batch=1, seed=3)[:, :1]
    layer_out = layer_output(tiny2d, tiny2d.features, x)[0]
    r = medlens.explain(tiny2d, x, ["eigencam", "gradcam"], targets=1, eigen_smooth=True)
    plain = medlens.explain(tiny2d, x, "gradcam", targets=1)
    pc = _first_pc(layer_out)
    # Our orientation convention: the component's sign agrees with the channel sum.
    reference = layer_out.sum(dim=0).double()
    if ((pc - pc.mean()) * (reference - reference.mean())).sum() < 0:
        pc = -pc
    expected = upsample_to(pc[None, None].float(), (32, 32))[0, 0]
    torch.testing.assert_close(r["eigencam"][0, 0], expected, rtol=1e-4, atol=1e-5)
    # Grad-CAM's eigen-smoothed map: the first PC of the weighted activation, oriented to the plain map.
    smoothed = r["gradcam"][0, 0]
    assert corr(smoothed, plain["gradcam"][0, 0]) > 0
    assert not torch.allclose(smoothed, plain["gradcam"][0, 0])


def _asymmetric_input() -> torch.Tensor:
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:20, 3:12] = 2.0  # a bright block on the left only
    return x + 0.05 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def test_aug_smooth_is_the_mean_over_safe_augmentations(tiny2d):
    x = _asymmetric_input()
    r = medlens.explain(tiny2d, x, "gradcam", targets=1, aug_smooth=True)
    assert "flip" not in r.provenance["methods"]["gradcam"]["aug_smooth"]
    maps = [medlens.explain(tiny2d, x, "gradcam", targets=1)["gradcam"]]
    for f in (1.1, 0.9):
        xs = upsample_to(x, [round(32 * f)] * 2)
        maps.append(upsample_to(medlens.explain(tiny2d, xs, "gradcam", targets=1)["gradcam"], (32, 32)))
    for f in (1.1, 0.9):
        maps.append(medlens.explain(tiny2d, x * f, "gradcam", targets=1)["gradcam"])
    torch.testing.assert_close(r["gradcam"], torch.stack(maps).mean(dim=0), rtol=1e-4, atol=1e-6)


def test_aug_smooth_never_mirrors_unless_asked(tiny2d):
    x = _asymmetric_input()
    plain = medlens.explain(tiny2d, x, "gradcam", targets=1)["gradcam"][0, 0]
    smooth = medlens.explain(tiny2d, x, "gradcam", targets=1, aug_smooth=True)["gradcam"][0, 0]
    assert corr(smooth, plain) > 0.95
    assert corr(smooth, plain) > corr(smooth, plain.flip(-1)) + 0.2
    flipped = medlens.explain(tiny2d, x, "gradcam", targets=1, aug_smooth=True, aug_flip=True)
    assert "flip" in flipped.provenance["methods"]["gradcam"]["aug_smooth"]
    # The flipped view's map is flipped back onto the original grid, so it still follows the original.
    assert corr(flipped["gradcam"][0, 0], plain) > corr(flipped["gradcam"][0, 0], plain.flip(-1))


# ------------------------------------------------------------------------------------------------ Score-CAM
def test_scorecam_matches_a_slow_textbook_loop_with_dead_channels(tiny2d):
    with torch.no_grad():
        tiny2d.features[4].bias[:3] = -100.0  # three channels dead after the ReLU: constant, all-zero masks
    x = _input(24, batch=2, seed=11)[:, :1]
    r = medlens.explain(tiny2d, x, "scorecam", targets=[2, 0], batch_size=5)
    assert r.provenance["methods"]["scorecam"]["constant_channels_scored_once"] >= 6  # at least 3 per image
    a = layer_output(tiny2d, tiny2d.features, x)
    for b in range(2):
        for slot, t in enumerate([2, 0]):
            scores = []
            for ch in range(a.shape[1]):
                mask = F.interpolate(a[b : b + 1, ch : ch + 1], size=(24, 24), mode="bilinear", align_corners=False)
                span = mask.max() - mask.min()
                mask = (mask - mask.min()) / span if span > 0 else torch.zeros_like(mask)
                with torch.no_grad():
                    scores.append(tiny2d(x[b : b + 1] * mask)[0, t])
            w = torch.softmax(torch.stack(scores), dim=0)
            textbook = (w[:, None, None] * a[b]).sum(dim=0)
            expected = F.interpolate(textbook[None, None], size=(24, 24), mode="bilinear", align_corners=False)[0, 0]
            torch.testing.assert_close(r["scorecam"][b, slot], expected, rtol=1e-4, atol=1e-6)


def test_gradcam_plus_plus_higher_order_term_agrees_with_pytorch_grad_cam(tiny2d):
    # With random weights the gradients are small and Grad-CAM++'s sum(A) * g^3 term hardly matters; scale
    # the head so it dominates, and check that term against the oracle too.
    with torch.no_grad():
        tiny2d.fc.weight.mul_(200.0)
    x = _input(32, batch=2, seed=4)[:, :1]
    ours = medlens.explain(tiny2d, x, "gradcam++", targets=[[0], [2]])["gradcam++"][:, 0]
    theirs = _theirs("gradcam++", tiny2d, tiny2d.features, x, [0, 2])
    grid = tuple(layer_output(tiny2d, tiny2d.features, x).shape[2:])
    _assert_agrees("gradcam++", ours, theirs, grid)
