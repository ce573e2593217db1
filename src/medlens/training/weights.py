"""A training run's weights: the network a recipe names, its starting weights, the weight average and checkpoints.

Owns building the recipe's network, finding and loading the starting weights (a bundled model, an earlier stage's
output, a file), the exponential weight average, BatchNorm statistics kept for fine-tuning, and writing a state dict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from medlens.errors import InputError
from medlens.io.files import atomic_write
from medlens.models.networks import PhantomCNN, PhantomUNet, SmallResNet
from medlens.models.zoo import bundled_models, load_state_dict_checked
from medlens.training.recipes import BRAIN_RECIPES, Network, ViTNetwork


def save_state(model: nn.Module, path: Path) -> None:
    """Write the model's state dict to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(model.state_dict(), fh))


def build_network(network: Union[Network, ViTNetwork], num_classes: int, size: int = 160) -> nn.Module:
    """A freshly initialised network as the recipe describes it (one grayscale channel in, a ViT for `size` px
    inputs), from the global RNG."""
    if isinstance(network, ViTNetwork):
        from medlens.models.hybrid_vit import HybridViT  # torchvision's ViT: imported for a ViT recipe only

        return HybridViT(num_classes=num_classes, in_channels=1, image_size=size, stem_widths=network.stem_widths,
                         hidden_dim=network.hidden_dim, depth=network.depth, heads=network.heads, mlp_dim=network.mlp_dim)
    if network.architecture == "PhantomCNN":
        return PhantomCNN(num_classes=num_classes, in_channels=1, widths=network.widths)
    if network.architecture == "PhantomUNet":
        return PhantomUNet(num_classes=num_classes, in_channels=1, widths=network.widths)
    return SmallResNet(num_classes=num_classes, in_channels=1, widths=network.widths, last_stride=network.last_stride)


def init_path(init: Optional[str], out_dir: Optional[Path]) -> Optional[Path]:
    """Where the starting weights are: a bundled model's, a recipe's trained earlier into the same out folder (a stage
    of a two-stage recipe), or a state-dict file; None: random weights.

    Raises:
        InputError: a first stage whose weights are not in `out_dir`, with the command that writes them.
    """
    if not init:
        return None
    if init in bundled_models():
        return Path(bundled_models()[init]["weights"])
    if init in BRAIN_RECIPES:
        path = out_dir / f"{init}.pt" if out_dir is not None else None
        if path is None or not path.is_file():
            raise InputError(f"this recipe starts from {init}'s weights, which are not bundled and not in {out_dir}: run "
                             f"`medlens train {init}` with the same --out first, or give --init FILE.")
        return path
    return Path(init)


def init_weights(model: nn.Module, init: Optional[str], out_dir: Optional[Path]) -> None:
    """Load the starting weights named by `init` (see init_path) into model; a hybrid ViT takes a CNN's
    (SmallResNet's) convolutional stem from them and starts the rest fresh."""
    path = init_path(init, out_dir)
    if path is not None and hasattr(model, "load_cnn_stem"):  # a HybridViT starts its stem from a CNN
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "conv1.weight" in state:
            model.load_cnn_stem(state)
            return
    if path is not None:
        load_state_dict_checked(model, path, f"the starting weights {init!r}")


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it keeps its statistics, so the maps a guided loss shapes in training
    are the maps the model shows in use (eval mode)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            module.eval()


class WeightAverage:
    """Exponential moving average of a model's parameters and float buffers (BatchNorm statistics included).

    Evaluating and checkpointing the average rather than the last step gives a steadier model on small data."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current weights (integer buffers are copied). A tensor that has not
        moved from the average is left exactly as it is (the multiply-add would round a frozen weight)."""
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                if not torch.equal(self.state[k], v):
                    self.state[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Load the average into `model` (a network of the same architecture)."""
        model.load_state_dict(self.state)


def shared_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every weight but the last linear layer's (`model.fc`) and return it: the parameters of a run that trains
    only the component its classes share (see `share_head_gradient`).

    Raises:
        InputError: the model has no linear `fc` head.
    """
    head = getattr(model, "fc", None)
    if not isinstance(head, nn.Linear):
        raise InputError(f"tune 'shared-head' needs a model whose last layer is a linear `fc`; {type(model).__name__} "
                         f"has none.")
    for p in model.parameters():
        p.requires_grad_(False)
    head.weight.requires_grad_(True)
    return [head.weight]


def share_head_gradient(model: nn.Module) -> None:
    """Replace the head's weight gradient by its mean over the classes (each row gets the same): Adam then moves every
    class's weights by the same vector u, every logit by u . features, so the softmax and the predictions stay the
    same while the class activation maps (and every map of a logit) change by u . A."""
    grad = model.fc.weight.grad
    if grad is not None:
        grad.copy_(grad.mean(0, keepdim=True).expand_as(grad))
