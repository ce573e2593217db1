"""`medlens train MODEL`: reproduce a bundled model from data with a fixed seed, with augmentation and guidance options.

Owns the click command: it turns the options into a typed recipe and runs it through `medlens.training.loop.train`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from medlens.errors import InputError
from medlens.training.guided import GUIDES
from medlens.training.loop import train
from medlens.training.recipes import AUGMENTS, BRAIN_RECIPES, PHANTOM_RECIPES, SEGMENTATION_RECIPES, with_overrides
from medlens.training.splits import DATA_HINT

__all__ = ["train_command", "COMMANDS"]


@click.command("train")
@click.argument("model_name", type=click.Choice([*BRAIN_RECIPES, *PHANTOM_RECIPES, *SEGMENTATION_RECIPES, "all-phantoms"]))
@click.option("--data", "data_root", type=click.Path(), default=None,
              help="Brain models: the figshare brain tumour set (Cheng et al., doi:10.6084/m9.figshare.1512427), one "
                   "folder per class, N.jpg with an N.txt YOLO box beside it.")
@click.option("--out", "out_dir", type=click.Path(), default="trained", show_default=True, help="Where weights, metrics and the log go.")
@click.option("--epochs", type=int, default=None, help="Override the recipe's number of epochs.")
@click.option("--size", type=int, default=None, help="Brain models only: override the recipe's input size in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--augment", type=click.Choice(AUGMENTS), default=None,
              help="affine: flips, small rotations, scale, shift, intensity; lesion-crop: random resized crops that keep "
                   "the whole box in view, plus flips, small rotations and intensity changes (needs boxes).")
@click.option("--guide", type=click.Choice(GUIDES), default=None,
              help="Explanation-guided loss on the training boxes: cam = share of the class activation map (Grad-CAM at the "
                   "last stage) outside the box (GAIN-style); rrr = squared input gradients outside the box (Ross et al. "
                   "2017, 'right for the right reasons'; about 3x slower); input = the same attention loss as cam on the "
                   "gradient x input map (what LRP-epsilon and integrated gradients show; about 3x slower); cam+rrr, "
                   "cam+input = cam plus the other. On a vision transformer cam is Grad-CAM at its default layer; "
                   "attention = the same loss on its attention rollout and transformer attribution; cam+attention = "
                   "both (about 1.5x slower).")
@click.option("--input-alpha", type=click.Choice(["image", "path"]), default=None,
              help="--guide input / cam+input: take the gradient at the image (gradient x input, LRP-epsilon's map; the "
                   "default) or at a random point alpha * image of the integrated-gradients path (its mean over alpha is "
                   "the integrated-gradients map from the zero baseline).")
@click.option("--guide-weight", type=float, default=None, help="Weight of the guided loss beside the cross-entropy.")
@click.option("--last-stride", type=click.Choice(["1", "2"]), default=None,
              help="Brain models: stride of the last stage (1: a 10 x 10 grid at 160 px instead of 5 x 5).")
@click.option("--inpaint-region", is_flag=True, default=False,
              help="Brain models: a control model trained, validated and tested on slices whose region (box) is in-painted "
                   "from its surroundings: the accuracy it still reaches comes from outside the region.")
@click.option("--freeze-batchnorm", is_flag=True, default=False,
              help="Brain models, fine-tuning: BatchNorm keeps the starting statistics, so a guided loss shapes the maps "
                   "the model shows in use (eval mode).")
@click.option("--init", "init", type=str, default=None,
              help="Brain models: start from a bundled model's weights (e.g. brain-tumor-mri-v1) or a state-dict file; "
                   "'none' starts from random weights.")
def train_command(model_name: str, data_root: Optional[str], out_dir: str, epochs: Optional[int], size: Optional[int],
                  seed: int, threads: int, augment: Optional[str], guide: Optional[str], guide_weight: Optional[float],
                  last_stride: Optional[str], init: Optional[str], inpaint_region: bool, freeze_batchnorm: bool,
                  input_alpha: Optional[str]) -> None:
    """Reproduce a bundled model from data with a fixed seed (progress bar, epoch log, best-by-validation).

    Boxes are read from the training split only; a guided option or lesion crops without boxes are refused
    before training starts."""
    overrides: dict[str, Any] = {"augment": augment, "guide": guide, "guide_weight": guide_weight,
                                 "input_alpha": input_alpha, "epochs": epochs, "seed": seed}
    if model_name in BRAIN_RECIPES:
        if data_root is None:
            raise InputError(f"{model_name} needs --data {DATA_HINT}.")
        overrides.update(size=size, last_stride=int(last_stride) if last_stride else None,
                         init="" if init == "none" else init, inpaint_region=inpaint_region or None,
                         freeze_batchnorm=freeze_batchnorm or None)
        summary = train(with_overrides(BRAIN_RECIPES[model_name], **overrides), out_dir, data_root=data_root,
                        threads=threads, cache_dir=Path(out_dir) / "cache")
        click.echo(f"wrote {Path(out_dir) / (model_name + '.pt')} (test accuracy {summary['test']['accuracy']:.4f})")
        return
    if last_stride or init or inpaint_region or freeze_batchnorm:
        raise InputError("--last-stride, --init, --inpaint-region and --freeze-batchnorm apply to the brain models only; the phantom models "
                         "use PhantomCNN and generated data.")
    names = list(PHANTOM_RECIPES) if model_name == "all-phantoms" else [model_name]
    recipes = {**PHANTOM_RECIPES, **SEGMENTATION_RECIPES}
    for name in names:
        summary = train(with_overrides(recipes[name], **overrides), out_dir, threads=threads)
        test = summary["test"]
        figure = f"test Dice {test['dice_mean']:.4f}" if "dice_mean" in test else f"test accuracy {test['accuracy']:.4f}"
        click.echo(f"wrote {Path(out_dir) / (name + '.pt')} ({figure})")


COMMANDS = [train_command]
