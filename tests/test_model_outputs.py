"""Model outputs as they come: `.logits` objects (HuggingFace), dicts with "logits" or "out", tuples and lists.

Each form is explained without a wrapper and gives exactly the maps of the same model returning a plain tensor,
for every family that calls the model (CAM, gradients, guided, LRP, integrated gradients, perturbation).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import medlens
from medlens.errors import ModelError
from medlens.tensor.autograd import logits_of

from helpers import TinyCNN2d, randomise_bn

METHODS = ["gradcam", "scorecam", "ablationcam", "saliency", "guidedbackprop", "guidedgradcam", "integratedgradients",
           "lrp", "occlusion", "rise", "lime"]


@dataclass
class _HFOutput:  # what a HuggingFace classifier returns, in the parts that matter: .logits, plus more
    loss: object
    logits: torch.Tensor
    hidden_states: tuple


class _HFOutputDict(OrderedDict):  # transformers' ModelOutput is also an ordered dict with attributes
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Wrapped(nn.Module):
    """The same tiny CNN, its logits handed back in one of the forms models use."""

    def __init__(self, form: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = randomise_bn(TinyCNN2d(num_classes=3), 0)
        self.form = form

    def forward(self, x):
        logits = self.net(x)
        features = torch.zeros(x.shape[0], 2)
        return {
            "tensor": lambda: logits,
            "object": lambda: _HFOutput(None, logits, (features,)),
            "model_output": lambda: _HFOutputDict(logits=logits, hidden=features),
            "dict_logits": lambda: {"aux": features, "logits": logits},
            "dict_out": lambda: {"out": logits, "aux": features},
            "tuple": lambda: (logits, features),
            "list": lambda: [logits, features],
        }[self.form]()


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 24, 24, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("form", ["object", "model_output", "dict_logits", "dict_out", "tuple", "list"])
def test_every_output_form_gives_the_plain_tensor_maps(form):
    x = _x()
    options = dict(seed=0, num_samples=32, n_masks=64, n_steps=8)
    plain = medlens.explain(_Wrapped("tensor").eval(), x, METHODS, targets=[0, 2], **options)
    other = medlens.explain(_Wrapped(form).eval(), x, METHODS, targets=[0, 2], **options)
    assert torch.equal(plain.logits, other.logits)
    for method in METHODS:
        assert plain[method].abs().amax() > 0, method
        torch.testing.assert_close(other[method], plain[method], rtol=0, atol=0, msg=method)
    assert plain.provenance["layer"] == other.provenance["layer"]


def test_logits_of_takes_logits_first_and_leaves_the_rest_for_the_caller():
    t = torch.ones(1, 2)
    assert logits_of(_HFOutputDict(loss=torch.zeros(1), logits=t)) is t
    assert logits_of({"out": t, "aux": torch.zeros(1)}) is t
    assert logits_of((t, None)) is t
    assert logits_of({"scores": t}) == {"scores": t}


@pytest.mark.parametrize("output, message", [
    (lambda x: {"scores": x}, "no tensor of logits"),
    (lambda x: None, "NoneType, with no tensor of logits"),
    (lambda x: {"out": x[:, :, None]}, r"must return logits of shape \(batch, classes\)"),
])
def test_outputs_without_logits_are_refused_with_what_to_return(output, message):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return output(self.fc(x.mean(dim=(2, 3)).expand(-1, 4)))

    with pytest.raises(ModelError, match=message):
        medlens.explain(Odd().eval(), torch.randn(1, 1, 8, 8), "saliency")
