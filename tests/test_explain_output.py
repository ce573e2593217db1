"""`explain(output=...)` / `--explain-output`: every method explains the chosen score (logit, log-probability,
contrast), each checked against the score written here independently."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import medlens
from helpers import make_tiny2d, run
from medlens.errors import MethodError

OUTPUTS = ["logit", "log-probability", "contrast"]


def net(seed: int = 0, bias: bool = True) -> nn.Module:
    """A tiny seeded CNN whose CAM layer ("2") keeps the input's 8 x 8 size, so no map is resized."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, bias=bias),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3, bias=bias)).eval()


def score(z: torch.Tensor, k: torch.Tensor, output: str) -> torch.Tensor:
    """The explained score of class k[b] for each image, written from its definition (B,)."""
    picked = z.gather(1, k[:, None])[:, 0]
    if output == "logit":
        return picked
    if output == "log-probability":
        return picked - torch.logsumexp(z, dim=1)
    others = torch.stack([torch.cat([z[b, :k[b]], z[b, k[b] + 1:]]).mean() for b in range(z.shape[0])])
    return picked - others


def data() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 1, 8, 8)


@pytest.mark.parametrize("output", OUTPUTS)
def test_gradient_maps_are_gradients_of_the_chosen_score(output):
    model, x = net(), data()
    targets = [2]
    result = medlens.explain(model, x, methods=["saliency", "inputxgradient", "gradcam"], targets=targets, layer="2",
                             output=output)
    k = torch.tensor([2, 2])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(model(xg), k, output).sum(), xg)
    torch.testing.assert_close(result["inputxgradient"][:, 0], (grad * x)[:, 0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(result["saliency"][:, 0], grad[:, 0], atol=1e-6, rtol=1e-4)
    activation = model[:3](x).detach().requires_grad_(True)
    (agrad,) = torch.autograd.grad(score(model[3:](activation), k, output).sum(), activation)
    cam = (agrad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)
    torch.testing.assert_close(result["gradcam"][:, 0], cam.detach(), atol=1e-6, rtol=1e-4)
    assert result.provenance["output"]["explained"] == output
    torch.testing.assert_close(torch.tensor(result.provenance["output"]["scores"])[:, 0], score(model(x), k, output).detach())
    torch.testing.assert_close(result.logits, model(x).detach())  # the model's logits, whatever is explained


def test_the_default_targets_are_chosen_on_the_models_logits():
    model, x = net(), data()
    expected = model(x).argmax(dim=1)
    for output in OUTPUTS:
        result = medlens.explain(model, x, methods="saliency", output=output)
        assert result.targets[:, 0].tolist() == expected.tolist()


def test_multi_label_log_probability_is_log_sigmoid():
    model, x = net(), data()
    model.multi_label = True
    result = medlens.explain(model, x, methods="inputxgradient", targets=[1], output="log-probability")
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.logsigmoid(model(xg)[:, 1]).sum(), xg)
    torch.testing.assert_close(result["inputxgradient"][:, 0], (grad * x)[:, 0], atol=1e-6, rtol=1e-4)
    assert result.provenance["output"]["definition"] == "log sigmoid(z_k)"


@pytest.mark.parametrize("output", OUTPUTS)
def test_integrated_gradients_completeness_against_the_chosen_score(output):
    model, x = net(), data()
    result = medlens.explain(model, x, methods="integratedgradients", targets=[0], output=output, n_steps=256,
                             baseline="zero")
    k = torch.tensor([0, 0])
    with torch.no_grad():
        gap = score(model(x), k, output) - score(model(torch.zeros_like(x)), k, output)
    torch.testing.assert_close(result["integratedgradients"].flatten(1).sum(dim=1), gap, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("output", OUTPUTS)
def test_lrp_conserves_the_chosen_score(output):
    """Bias-free ReLU network, LRP-epsilon: the relevance reaching the input is sum_j z_j dF/dz_j at the logits, which
    is F itself for the logit and the contrast (linear in z); for the log-probability (not homogeneous) it is
    z_k - sum_j p_j z_j, log p_k plus the entropy of p."""
    model, x = net(bias=False), data()
    result = medlens.explain(model, x, methods="lrp", targets=[1], output=output, composite="epsilon", epsilon=1e-9)
    z = model(x).detach()
    k = torch.tensor([1, 1])
    expected = score(z, k, output) if output != "log-probability" else z[:, 1] - (z.softmax(dim=1) * z).sum(dim=1)
    torch.testing.assert_close(result["lrp"].flatten(1).sum(dim=1), expected, atol=1e-5, rtol=1e-4)
    conservation = result.provenance["methods"]["lrp"]["conservation"]
    torch.testing.assert_close(torch.tensor(conservation["logit"])[:, 0], score(z, k, output))


@pytest.mark.parametrize("output", OUTPUTS)
def test_occlusion_is_the_drop_of_the_chosen_score(output):
    model, x = net(), data()
    result = medlens.explain(model, x, methods="occlusion", targets=[2], output=output, window=4, stride=4,
                             baseline="zero")
    k = torch.tensor([2, 2])
    with torch.no_grad():
        for y0, x0 in [(0, 0), (4, 4), (0, 4)]:
            occluded = x.clone()
            occluded[:, :, y0:y0 + 4, x0:x0 + 4] = 0
            drop = score(model(x), k, output) - score(model(occluded), k, output)
            torch.testing.assert_close(result["occlusion"][:, 0, y0 + 1, x0 + 2], drop.float(), atol=1e-5, rtol=1e-4)


def test_a_bad_output_names_the_choices():
    with pytest.raises(MethodError, match="logit, log-probability, contrast"):
        medlens.explain(net(), data(), methods="gradcam", output="softmax")


def test_contrast_of_a_one_output_model_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1)).eval()
    with pytest.raises(MethodError, match="one output"):
        medlens.explain(model, data(), methods="saliency", output="contrast")


def test_region_targets_refuse_another_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1)).eval()
    with pytest.raises(MethodError, match="region"):
        medlens.explain(model, data(), methods="saliency", output="contrast",
                        targets=[medlens.SegmentationTarget(1, region=None)])


def test_probability_stays_the_perturbation_methods_option():
    model, x = net(), data()
    result = medlens.explain(model, x, methods="occlusion", targets=[0], output="probability", window=8)
    with torch.no_grad():
        p = model(x).softmax(dim=1)[:, 0] - model(torch.zeros_like(x)).softmax(dim=1)[:, 0]
    torch.testing.assert_close(result["occlusion"][:, 0, 0, 0], p, atol=1e-5, rtol=1e-4)
    assert result.provenance["output"]["explained"] == "logit"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    torch.save(make_tiny2d(0), root / "tiny.pt")
    (root / "tiny.pt.json").write_text(json.dumps({"labels": ["a", "b", "c"], "size": [32, 32]}))
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32)).astype(np.uint8)).save(root / "scan.png")
    return root


def test_cli_explain_output_is_recorded(capsys, files, tmp_path):
    code, _, err = run(capsys, "explain", files / "scan.png", "--model", files / "tiny.pt", "--allow-pickle",
                       "--methods", "inputxgradient", "--explain-output", "contrast", "--out", tmp_path / "o",
                       "--formats", "npz")
    assert code == 0, err
    provenance = json.loads((tmp_path / "o" / "scan" / "provenance.json").read_text())
    assert provenance["output"]["explained"] == "contrast"


def test_cli_bad_explain_output_exits_2(capsys, files, tmp_path):
    for command in ("explain", "batch"):
        code, _, err = run(capsys, command, files / "scan.png", "--model", files / "tiny.pt", "--allow-pickle",
                           "--explain-output", "odds", "--out", tmp_path / command)
        assert code == 2 and "logit, log-probability, contrast" in err and "Traceback" not in err


def test_cli_batch_explains_the_chosen_output(capsys, files, tmp_path):
    code, _, err = run(capsys, "batch", files / "scan.png", "--model", files / "tiny.pt", "--allow-pickle", "-q",
                       "--methods", "saliency", "--explain-output", "log-probability", "--out", tmp_path / "b",
                       "--formats", "npz")
    assert code == 0, err
    (provenance,) = (tmp_path / "b" / "maps").rglob("provenance.json")
    assert json.loads(provenance.read_text())["output"]["explained"] == "log-probability"


def test_cam_reads_the_contrast_of_the_head_weights_and_refuses_the_log_probability():
    model, x = net(), data()
    for output in ("logit", "contrast"):  # on a GAP + linear head CAM is Grad-CAM of the same score
        result = medlens.explain(model, x, methods=["cam", "gradcam"], targets=[1], layer="3", output=output)
        torch.testing.assert_close(result["cam"], result["gradcam"], atol=1e-6, rtol=1e-4)
    with pytest.raises(MethodError, match="not linear"):
        medlens.explain(model, x, methods="cam", layer="3", output="log-probability")


@pytest.mark.parametrize("method", ["ablationcam", "scorecam", "gradcam", "lrp"])
def test_the_contrast_map_is_the_class_map_minus_the_mean_of_the_others(method):
    """The contrast is linear in the logits and these maps are linear in the score explained."""
    model, x = net(bias=False), data()
    every = [0, 1, 2]
    logit = medlens.explain(model, x, methods=method, targets=every, layer="3", output="logit")[method]
    contrast = medlens.explain(model, x, methods=method, targets=every, layer="3", output="contrast")[method]
    expected = logit - (logit.sum(dim=1, keepdim=True) - logit) / 2
    if method == "scorecam":  # Score-CAM's channel weights are a softmax of the scores: not linear, only checked to run
        assert torch.isfinite(contrast).all() and not torch.allclose(contrast, logit)
    else:
        torch.testing.assert_close(contrast, expected, atol=1e-5, rtol=1e-4)


def test_a_vision_transformer_explains_the_contrast_too():
    """AttnLRP and Grad-CAM on token grids run through the same wrapper: the contrast map is linear in the classes'."""
    from transformer_models import HandViT

    torch.manual_seed(0)
    model, x = HandViT().eval(), torch.rand(1, 3, 32, 32)
    maps = {output: medlens.explain(model, x, methods=["lrp", "gradcam"], targets=[0, 1, 2], output=output)
            for output in ("logit", "contrast")}
    for method in ("lrp", "gradcam"):
        logit = maps["logit"][method]
        torch.testing.assert_close(maps["contrast"][method], logit - (logit.sum(dim=1, keepdim=True) - logit) / 2,
                                   atol=1e-6, rtol=1e-4)
