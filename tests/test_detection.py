"""Box targets on a torchvision Faster R-CNN (tiny, random seeded weights, nothing downloaded), against
pytorch-grad-cam's `FasterRCNNBoxScoreTarget`: the same score, Grad-CAM equal (corr >= 0.999) and EigenCAM equal
up to the sign of its singular vector (pytorch-grad-cam keeps numpy's sign, medlens orients it to the channel sum,
so both are compared after pytorch-grad-cam's ReLU and min-max with either sign of ours). The layer is one at the
image's resolution, so neither library resizes the map and the comparison is of the maps themselves. The box is one
of the detector's own detections, which no other detection of its label overlaps at IoU >= 0.5, where
pytorch-grad-cam's best-overlap rule and medlens' sum over matching detections agree.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import medlens
from medlens.errors import MethodError, ModelError, TargetError

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def detector():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                             nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    backbone.out_channels = 16
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64,
                       rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
                       box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_score_thresh=0.0,
                       box_detections_per_img=10).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        detections = model(x)[0]
    return model, x, detections


def _first_box(detections):
    box, label = detections["boxes"][0], int(detections["labels"][0])
    same = detections["labels"] == label
    iou = torchvision.ops.box_iou(box[None], detections["boxes"][same])[0]
    assert int((iou >= 0.5).sum()) == 1  # only itself: the two rules agree here
    return label, box.tolist()


def _relu_minmax(m) -> torch.Tensor:
    m = torch.relu(torch.as_tensor(m).double()).flatten()
    m = m - m.min()
    return m / (m.max() + 1e-12)


def _corr(a, b) -> float:
    return float(np.corrcoef(torch.as_tensor(a).double().flatten().numpy(), torch.as_tensor(b).double().flatten().numpy())[0, 1])


def test_box_target_gradcam_and_eigencam_equal_pytorch_grad_cam(detector):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import EigenCAM, GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    model, x, detections = detector
    label, box = _first_box(detections)
    result = medlens.explain(model, x, methods=["gradcam", "eigencam"], targets=[medlens.BoxTarget(label, box)],
                             layer=model.backbone[1])
    theirs_target = [FasterRCNNBoxScoreTarget(labels=[label], bounding_boxes=np.array([box]))]
    assert result.logits[0, 0].item() == pytest.approx(float(theirs_target[0](detections)[0]), rel=1e-6)
    with GradCAM(model=model, target_layers=[model.backbone[1]]) as cam:
        grad_cam = cam(input_tensor=x, targets=theirs_target)[0]
    with EigenCAM(model=model, target_layers=[model.backbone[1]]) as cam:
        eigen_cam = cam(input_tensor=x, targets=theirs_target)[0]
    assert _corr(torch.relu(result["gradcam"][0, 0]), grad_cam) >= 0.999
    ours = result["eigencam"][0, 0]
    assert max(_corr(_relu_minmax(s * ours), _relu_minmax(eigen_cam)) for s in (1, -1)) >= 0.999
    assert result.provenance["region_targets"]["kind"] == "detection"
    assert all(not m._forward_hooks for m in model.modules())


def test_the_layer_is_chosen_in_the_backbone(detector):
    model, x, detections = detector
    label, box = _first_box(detections)
    result = medlens.explain(model, x, methods="eigencam", targets=[medlens.BoxTarget(label, box)])
    assert result.provenance["layer"]["name"].startswith("backbone")
    assert result.provenance["layer"]["chosen_automatically"]


def test_no_matching_detection_is_a_clear_error(detector):
    model, x, detections = detector
    label, box = _first_box(detections)
    with pytest.raises(MethodError, match="found no '.*' detection with IoU >= 0.5"):
        medlens.explain(model, x, methods="gradcam", targets=[medlens.BoxTarget(label, (50, 0, 52, 2))])
    with pytest.raises(MethodError, match="found no"):
        medlens.explain(model, x, methods="gradcam", targets=[medlens.BoxTarget(label + 5, box)])
    with pytest.raises(TargetError, match="x0 < x1"):
        medlens.explain(model, x, methods="gradcam", targets=[medlens.BoxTarget(label, (10, 10, 5, 20))])
    with pytest.raises(TargetError, match="detector is explained for boxes"):
        medlens.explain(model, x, methods="gradcam", targets=[medlens.BoxTarget(label, box), medlens.SegmentationTarget(1)])


def test_a_box_target_on_a_classifier_is_refused():
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(ModelError, match="one dict per image"):
        medlens.explain(classifier, torch.rand(1, 3, 16, 16), targets=[medlens.BoxTarget(1, (0, 0, 4, 4))])
