"""The typed recipes of the bundled models: data, input size, network, optimiser, epochs, augmentation, guidance,
selection and starting weights, each a frozen dataclass that checks its own values; and the tables of the recipes.

Owns `Recipe` and its parts, the brain and phantom recipe tables, overriding a recipe by flat option names (as the
CLI and the metrics record spell them), the region check before training, and the phantom data and input preparation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from medlens.data.figshare import minmax_scale
from medlens.data.phantom import PhantomSet, phantom_2d, shortcut_set
from medlens.errors import InputError
from medlens.training.guided import GUIDES

AUGMENTS = ("affine", "lesion-crop", "none")
SELECTIONS = ("accuracy", "pixel", "picture")
#: what a run trains: every weight, or only the component all classes share in the last linear layer's weights (which
#: moves every logit by the same amount, so the softmax, the probabilities and the predictions stay as they were)
TUNES = ("all", "shared-head")


@dataclass(frozen=True)
class FigshareData:
    """The figshare brain tumour slices (a folder given at run time): input size and the normalisation after the
    per-image min-max; `inpaint_region`: the control model's slices, each region (box) in-painted, in every split."""

    size: int = 160
    mean: float = 0.15
    std: float = 0.2
    inpaint_region: bool = False


@dataclass(frozen=True)
class PhantomData:
    """Generated phantoms (`medlens.data.phantom`): size, marker mode, split sizes, an optional lesion contrast range
    (the shortcut set with a visible lesion); the input is the per-image min-max (mean 0, std 1)."""

    size: int = 64
    marker: str = "none"
    n_train: int = 1600
    n_val: int = 400
    n_test: int = 1000
    lesion_contrast: Optional[tuple[float, float]] = None
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class Network:
    """The architecture (`medlens.models.networks`) and its widths; `last_stride` for SmallResNet only."""

    architecture: str = "SmallResNet"
    widths: tuple[int, ...] = (32, 64, 128, 256)
    last_stride: Optional[int] = 2

    def __post_init__(self) -> None:
        if self.architecture not in ("SmallResNet", "PhantomCNN", "PhantomUNet"):
            raise InputError(f"unknown architecture {self.architecture!r}; expected SmallResNet, PhantomCNN or PhantomUNet.")
        if self.last_stride not in (None, 1, 2):
            raise InputError(f"--last-stride {self.last_stride!r}: expected 1 or 2.")


@dataclass(frozen=True)
class ViTNetwork:
    """The hybrid vision transformer (`medlens.models.hybrid_vit.HybridViT`): the convolutional stem's widths, the
    token width, the number of encoder blocks, attention heads and the MLP width."""

    architecture: str = "HybridViT"
    stem_widths: tuple[int, ...] = (32, 64, 128)
    hidden_dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 192

    def __post_init__(self) -> None:
        if self.architecture != "HybridViT" or not 1 <= len(self.stem_widths) <= 3:
            raise InputError(f"a ViT network is HybridViT with one to three stem widths; got {self.architecture!r} with "
                             f"{list(self.stem_widths)}.")
        if self.depth < 1 or self.heads < 1 or self.hidden_dim % self.heads:
            raise InputError(f"--depth {self.depth} and --heads {self.heads}: both at least 1, and the token width "
                             f"{self.hidden_dim} a multiple of the heads.")


@dataclass(frozen=True)
class Optimiser:
    """AdamW with a one-cycle rate (`warmup`: the share of steps rising to `lr`), the epochs and batch size, label
    smoothing, an optional exponential weight average (`ema_decay`) and BatchNorm statistics kept (fine-tuning)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float = 0.0
    warmup: float = 0.15
    ema_decay: Optional[float] = None
    freeze_batchnorm: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"--epochs {self.epochs} and a batch size of {self.batch_size}: both must be at least 1.")


@dataclass(frozen=True)
class Guidance:
    """The explanation-guided loss (see `guided_step`): the guide, its weight beside the cross-entropy, the CAM
    term's energy weight, and for a pixel-level term ("rrr", "input") its weight and image count under "cam+",
    the input term's temperature and where it takes the gradient (`input_alpha`: "image" or "path"); for a vision
    transformer, the weight of the attention rollout and transformer attribution terms and the temperature of its
    Grad-CAM term (see `token_guidance_loss`)."""

    guide: str = "none"
    weight: float = 0.0
    energy_weight: float = 1.0
    input_weight: float = 1.0
    rrr_weight: float = 1.0
    input_images: Optional[int] = None
    rrr_images: Optional[int] = None
    input_temperature: float = 1.0
    input_alpha: str = "image"
    attention_weight: float = 1.0
    token_temperature: float = 3.0
    sign_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.guide not in GUIDES:
            raise InputError(f"unknown --guide {self.guide!r}; expected one of {list(GUIDES)}.")
        if self.input_alpha not in ("image", "path") or (self.input_alpha == "path" and "input" not in self.guide):
            raise InputError(f"--input-alpha {self.input_alpha!r}: expected 'image' or 'path', and 'path' only with --guide "
                             f"input or cam+input (it chooses where that guide takes the gradient); the guide is "
                             f"{self.guide!r}.")

    @property
    def active(self) -> bool:
        """Whether the guided loss takes part at all."""
        return self.guide != "none" and self.weight != 0.0


@dataclass(frozen=True)
class Selection:
    """The rule an epoch is kept by (see `validation.selection_key`): "accuracy", "pixel" (the pixel-level maps'
    pointing game among the epochs at or above `val_accuracy_floor`) or "picture" (Grad-CAM's positive part's, then
    the pixel-level maps')."""

    rule: str = "accuracy"
    val_accuracy_floor: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in SELECTIONS:
            raise InputError(f"unknown selection rule {self.rule!r}; expected one of {list(SELECTIONS)}.")


@dataclass(frozen=True)
class Recipe:
    """One training run's recipe: its name, data, network, optimiser, augmentation, guidance, selection, starting
    weights (`init`: a bundled model, an earlier stage's recipe name, a state-dict file; None or "": random) and seed."""

    name: str
    data: Union[FigshareData, PhantomData]
    network: Union[Network, ViTNetwork]
    optimiser: Optimiser
    augment: str = "none"
    guidance: Guidance = field(default_factory=Guidance)
    selection: Selection = field(default_factory=Selection)
    init: Optional[str] = None
    seed: int = 0
    tune: str = "all"

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise InputError(f"unknown --augment {self.augment!r}; expected one of {list(AUGMENTS)}.")
        if self.tune not in TUNES:
            raise InputError(f"unknown tune {self.tune!r}; expected one of {list(TUNES)}.")
        if self.tune == "shared-head" and (self.optimiser.weight_decay or not self.optimiser.freeze_batchnorm):
            raise InputError(f"recipe {self.name}: tune 'shared-head' needs weight_decay 0 and freeze_batchnorm (decay "
                             f"shrinks each class's weights by its own amount and new BatchNorm statistics change the "
                             f"features, either of which would change the predictions); they are "
                             f"{self.optimiser.weight_decay} and {self.optimiser.freeze_batchnorm}.")

    @property
    def is_segmentation(self) -> bool:
        """Whether the recipe trains a segmentation network (per-pixel classes; `medlens.training.segmentation`)."""
        return self.network.architecture == "PhantomUNet"

    @property
    def is_brain(self) -> bool:
        """Whether the recipe trains on the figshare brain slices (else on generated phantoms)."""
        return isinstance(self.data, FigshareData)


#: flat option name (as the CLI and the metrics record spell it) -> (part of the recipe, field)
FLAT_NAMES: dict[str, tuple[str, str]] = {
    **{name: ("data", name) for name in ("size", "mean", "std", "inpaint_region", "marker", "n_train", "n_val",
                                         "n_test", "lesion_contrast")},
    **{name: ("network", name) for name in ("architecture", "widths", "last_stride", "stem_widths", "hidden_dim", "depth",
                                            "heads", "mlp_dim")},
    **{name: ("optimiser", name) for name in ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing",
                                              "warmup", "ema_decay", "freeze_batchnorm")},
    "guide": ("guidance", "guide"), "guide_weight": ("guidance", "weight"),
    **{name: ("guidance", name) for name in ("energy_weight", "input_weight", "rrr_weight", "input_images",
                                             "rrr_images", "input_temperature", "input_alpha", "attention_weight",
                                             "token_temperature", "sign_weight")},
    "select": ("selection", "rule"), "val_accuracy_floor": ("selection", "val_accuracy_floor"),
    "augment": ("", "augment"), "init": ("", "init"), "seed": ("", "seed"), "tune": ("", "tune"),
}


def with_overrides(recipe: Recipe, **overrides: Any) -> Recipe:
    """The recipe with options changed by their flat names (e.g. guide="cam", guide_weight=1, n_train=400, size=64);
    None leaves an option as it is.

    Raises:
        InputError: an option the recipe does not have, or a value its part refuses.
    """
    parts: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in FLAT_NAMES or (FLAT_NAMES[name][0] and not hasattr(getattr(recipe, FLAT_NAMES[name][0]),
                                                                            FLAT_NAMES[name][1])):
            raise InputError(f"recipe {recipe.name} has no option {name!r}; it has {sorted(recipe_record(recipe))}.")
        part, attr = FLAT_NAMES[name]
        parts.setdefault(part, {})[attr] = tuple(value) if isinstance(value, list) else value
    top = parts.pop("", {})
    return dataclasses.replace(recipe, **top, **{p: dataclasses.replace(getattr(recipe, p), **v) for p, v in parts.items()})


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as one flat dictionary of JSON-able values under the flat option names (tuples as lists): the form
    the log, the metrics file and the model card show, and the one `with_overrides` reads."""
    record: dict[str, Any] = {}
    for name, (part, attr) in FLAT_NAMES.items():
        holder = getattr(recipe, part) if part else recipe
        if hasattr(holder, attr):
            value = getattr(holder, attr)
            record[name] = list(value) if isinstance(value, tuple) else value
    return record


#: the first bundled brain model (now `brain-tumor-mri-v1`): whole slices, affine augmentation, 5 x 5 last grid
BRAIN_V1_RECIPE = Recipe(
    name="brain-tumor-mri-v1", data=FigshareData(), network=Network("SmallResNet", (32, 64, 128, 256), last_stride=2),
    optimiser=Optimiser(epochs=36, batch_size=32, lr=3e-3, weight_decay=0.05, label_smoothing=0.1, ema_decay=0.995),
    augment="affine")

#: `brain-tumor-mri-v2`: v1's network with a 10 x 10 last grid, crops that keep the tumour, and an attention loss on
#: Grad-CAM (= CAM for this network) that asks for the class evidence inside the training boxes
BRAIN_V2_RECIPE = dataclasses.replace(
    BRAIN_V1_RECIPE, name="brain-tumor-mri-v2", network=dataclasses.replace(BRAIN_V1_RECIPE.network, last_stride=1),
    optimiser=dataclasses.replace(BRAIN_V1_RECIPE.optimiser, epochs=12, lr=1e-3, ema_decay=0.99),
    augment="lesion-crop", guidance=Guidance("cam", weight=0.5, energy_weight=2.0), init="brain-tumor-mri-v1")

#: `brain-tumor-mri-v3`: v2 fine-tuned with the same attention loss on the gradient x input map as well (the
#: pixel-level evidence LRP and integrated gradients show), BatchNorm statistics kept from v2
BRAIN_V3_RECIPE = dataclasses.replace(
    BRAIN_V2_RECIPE, name="brain-tumor-mri-v3",
    optimiser=dataclasses.replace(BRAIN_V2_RECIPE.optimiser, epochs=6, lr=5e-4, freeze_batchnorm=True),
    guidance=dataclasses.replace(BRAIN_V2_RECIPE.guidance, guide="cam+input", input_weight=2.0), init="brain-tumor-mri-v2")

#: `brain-tumor-mri-v4` (the default until 7 Dec 2026), a second stage on v3: the same losses for 4 more epochs at a
#: lower rate, keeping the epoch whose gradient x input or integrated gradients points at the tumour most often on
#: validation among those that keep the Grad-CAM goals and at least 92% validation accuracy. v3's weights are not
#: bundled: `medlens train brain-tumor-mri-v3` writes them into the --out folder this recipe starts from
BRAIN_V4_RECIPE = dataclasses.replace(
    BRAIN_V3_RECIPE, name="brain-tumor-mri-v4", optimiser=dataclasses.replace(BRAIN_V3_RECIPE.optimiser, epochs=4, lr=3e-4),
    selection=Selection("pixel", val_accuracy_floor=0.92), init="brain-tumor-mri-v3")

#: the bundled `brain-tumor-mri`, a third stage on v4 that trains only the component its three classes share in the
#: last layer's weights (invisible to the softmax: v4's probabilities and predictions are kept) under v4's losses plus
#: the peak sign term (the class activation map's highest value in the box must be positive, so that Grad-CAM's picture,
#: its positive part, is not blank), keeping the epoch whose Grad-CAM picture peaks in the box most often on validation
BRAIN_RECIPE = dataclasses.replace(
    BRAIN_V4_RECIPE, name="brain-tumor-mri",
    optimiser=dataclasses.replace(BRAIN_V4_RECIPE.optimiser, epochs=3, lr=0.02, weight_decay=0.0),
    guidance=dataclasses.replace(BRAIN_V4_RECIPE.guidance, sign_weight=4.0),
    selection=Selection("picture", val_accuracy_floor=0.92), init="brain-tumor-mri-v4", tune="shared-head")

#: `brain-tumor-mri-vit-v1`: a small hybrid vision transformer (4 blocks of width 128 on an 8 x 8 token grid at 128 px)
#: whose convolutional stem (conv1 to layer3) starts from the bundled CNN's; v1's affine augmentation. Accurate, but its
#: maps did not point at the tumour
BRAIN_VIT_V1_RECIPE = Recipe(
    name="brain-tumor-mri-vit-v1", data=FigshareData(size=128), network=ViTNetwork(),
    optimiser=Optimiser(epochs=6, batch_size=32, lr=5e-4, weight_decay=0.05, label_smoothing=0.1, warmup=0.2,
                        ema_decay=0.98),
    augment="affine", init="brain-tumor-mri-v4")

#: the bundled `brain-tumor-mri-vit`: v1 fine-tuned on crops that keep the tumour with the attention loss on its
#: Grad-CAM at the default layer and on its attention rollout and transformer attribution (all three in the boxes),
#: BatchNorm statistics of the stem kept from v1
BRAIN_VIT_RECIPE = dataclasses.replace(
    BRAIN_VIT_V1_RECIPE, name="brain-tumor-mri-vit",
    optimiser=dataclasses.replace(BRAIN_VIT_V1_RECIPE.optimiser, epochs=4, lr=2e-4, warmup=0.15, freeze_batchnorm=True),
    augment="lesion-crop", guidance=Guidance("cam+attention", weight=0.5, energy_weight=2.0, attention_weight=1.0),
    init="brain-tumor-mri-vit-v1")

BRAIN_RECIPES: dict[str, Recipe] = {r.name: r for r in (BRAIN_RECIPE, BRAIN_V4_RECIPE, BRAIN_V3_RECIPE, BRAIN_V2_RECIPE, BRAIN_V1_RECIPE,
                                                        BRAIN_VIT_RECIPE, BRAIN_VIT_V1_RECIPE)}

_PHANTOM_OPTIMISER = Optimiser(epochs=8, batch_size=64, lr=3e-3, weight_decay=1e-4, warmup=0.2)
PHANTOM_RECIPES: dict[str, Recipe] = {
    "phantom-lesion": Recipe("phantom-lesion", PhantomData(marker="none"), Network("PhantomCNN", (16, 32, 64), None),
                             _PHANTOM_OPTIMISER),
    "phantom-shortcut": Recipe("phantom-shortcut", PhantomData(marker="correlated"),
                               Network("PhantomCNN", (16, 32, 64), None), dataclasses.replace(_PHANTOM_OPTIMISER, epochs=6)),
}
#: `phantom-lesion-unet`: a small U-Net that segments the phantoms' lesions (background / lesion per pixel), trained
#: on the exact lesion masks with cross-entropy plus soft Dice (`medlens.training.segmentation`)
SEGMENTATION_RECIPES: dict[str, Recipe] = {
    "phantom-lesion-unet": Recipe("phantom-lesion-unet", PhantomData(marker="none", n_train=1200, n_val=200, n_test=400),
                                  Network("PhantomUNet", (8, 16, 32), None),
                                  Optimiser(epochs=6, batch_size=32, lr=1e-2, weight_decay=1e-4, warmup=0.2)),
}
#: data seeds: train, validation and the model card's test set are drawn from different seeds
PHANTOM_SEEDS = {"train": 1, "val": 2, "test": 3}


def brain_prepare(images: torch.Tensor, mean: float = BRAIN_V1_RECIPE.data.mean,
                  std: float = BRAIN_V1_RECIPE.data.std) -> torch.Tensor:
    """uint8 slices (N, 1, S, S) -> the model's input: per-image min-max to [0, 1], then (x - mean) / std."""
    return (minmax_scale(images) - mean) / std


def phantom_data(name: str, split: str, n: Optional[int] = None, seed: Optional[int] = None,
                 marker: Optional[str] = None, lesion_contrast: Optional[tuple[float, float]] = None,
                 data: Optional[PhantomData] = None) -> PhantomSet:
    """The phantom set a bundled phantom model is trained/validated/tested on (marker mode and, for the shortcut
    set, the lesion contrast overridable: a visible lesion beside the marker); `data`: the recipe's own data part
    (size, marker, split sizes) instead of the bundled recipe's."""
    d = data if data is not None else {**PHANTOM_RECIPES, **SEGMENTATION_RECIPES}[name].data
    assert isinstance(d, PhantomData)
    n = getattr(d, f"n_{split}") if n is None else n
    seed = PHANTOM_SEEDS[split] if seed is None else seed
    if name == "phantom-shortcut" and lesion_contrast is not None:
        return phantom_2d(n, size=d.size, seed=seed, marker=marker or "correlated", lesion_contrast=tuple(lesion_contrast))
    if name == "phantom-shortcut":
        if marker in (None, "correlated"):
            return shortcut_set(n, size=d.size, seed=seed)
        return phantom_2d(n, size=d.size, seed=seed, marker=marker, lesion_contrast=(0.06, 0.1))
    return phantom_2d(n, size=d.size, seed=seed, marker=marker or d.marker)


def phantom_prepare(images: torch.Tensor) -> torch.Tensor:
    """Phantom images -> model input: per-image min-max to [0, 1] (the spec's "minmax" scale, mean 0, std 1)."""
    return minmax_scale(images)


def check_guidance(recipe: Recipe, has_region: torch.Tensor, where: str) -> None:
    """Refuse, before any training, a guided option, lesion crops or region in-painting without regions in the
    training data (the options themselves were checked when the recipe was built).

    Raises:
        InputError: naming the option, the data (`where`) and what to give instead.
    """
    guide = recipe.guidance.guide
    if "attention" in guide and not isinstance(recipe.network, ViTNetwork):
        raise InputError(f"--guide {guide} guides a vision transformer's attention rollout and transformer attribution, "
                         f"and {recipe.name} is a {recipe.network.architecture} without attention; use --guide cam, "
                         f"input or rrr.")
    wants = [opt for opt, on in ((f"--guide {guide}", guide != "none"),
                                 ("--augment lesion-crop", recipe.augment == "lesion-crop")) if on]
    if getattr(recipe.data, "inpaint_region", False) and not bool(has_region.all()):
        missing = int((~has_region).sum())
        raise InputError(f"--inpaint-region removes each image's region, and {missing} image(s) of {where} have none (their "
                         f"lesion would stay in view). Give every image a box file (N.txt) or train without it.")
    if wants and not bool(has_region.any()):
        raise InputError(f"{' and '.join(wants)} need(s) a region (box or mask) for the training images, and {where} "
                         f"has none. Give each image a box file (N.txt: 'label x_center y_center width height') or "
                         f"train without these options.")
