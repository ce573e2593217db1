"""Exporting a trained model into the package: its weights, its models.json entry and its Markdown model card.

Owns the card's layout (spec, data credit, recipe, wall time, confusion table, marker table for the shortcut model).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union

from medlens.core.input_spec import InputSpec
from medlens.data.figshare import CLASSES, CREDIT
from medlens.data.phantom import LABELS
from medlens.io.files import atomic_write
from medlens.models import zoo
from medlens.training.splits import FIGSHARE_LAYOUT

PathLike = Union[str, Path]


def is_brain(name: str) -> bool:
    """Whether a bundled model name is one of the figshare brain models (brain-tumor-mri, brain-tumor-mri-v1, ...)."""
    return name.startswith("brain-tumor-mri")


VIT_DESCRIPTION = ("Brain tumour type (pituitary / meningioma / glioma) from one T1 contrast-enhanced MRI slice; a small "
                   "hybrid vision transformer (a convolutional stem whose weights started from brain-tumor-mri-v4's first "
                   "stages, then 4 transformer blocks on an 8 x 8 token grid at 128 px), trained on the figshare set.")


def vit_kwargs(recipe: dict[str, Any]) -> dict[str, Any]:
    """`HybridViT`'s keyword arguments from a ViT recipe's flat record."""
    return {"num_classes": 3, "in_channels": 1, "image_size": recipe["size"], "stem_widths": list(recipe["stem_widths"]),
            **{k: recipe[k] for k in ("hidden_dim", "depth", "heads", "mlp_dim")}}


def bundled_entry(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The models.json entry of a bundled model: architecture, kwargs, input spec, description, card, metrics."""
    if is_brain(name):
        r = metrics["recipe"]
        spec = InputSpec(
            size=(r["size"], r["size"]), channels=1, scale="minmax", mean=(r["mean"],), std=(r["std"],),
            labels=CLASSES, multi_label=False, modality="MRI, T1-weighted contrast-enhanced, axial/coronal/sagittal slice",
            notes="Whole slice resized to the input size (area filter), per-image min-max to [0, 1], then (x - mean) / std.",
            resample="area",
            extra={"dataset": "figshare brain tumour (Cheng et al.), doi:10.6084/m9.figshare.1512427, CC BY 4.0",
                   "label_ids": {c: i for i, c in enumerate(CLASSES)}},
        )
        if r.get("architecture") == "HybridViT":
            return {"architecture": "HybridViT", "kwargs": vit_kwargs(r), "weights": f"{name}.pt", "card": f"{name}.md",
                    "input_spec": spec.to_dict(), "test_accuracy": metrics["test"]["accuracy"],
                    "description": VIT_DESCRIPTION + (
                        f" Fine-tuned from {r['init']} to look at the tumour (training boxes, {r['guide']} guidance: an "
                        f"attention loss on its Grad-CAM, attention rollout and transformer attribution; crops that keep "
                        f"the tumour)." if r.get("guide", "none") != "none" else "")}
        kwargs = {"num_classes": 3, "in_channels": 1, "widths": list(r["widths"])}
        guided = r.get("guide", "none") != "none"
        if r.get("last_stride", 2) != 2:
            kwargs["last_stride"] = r["last_stride"]
        return {"architecture": "SmallResNet", "kwargs": kwargs,
                "weights": f"{name}.pt", "card": f"{name}.md", "input_spec": spec.to_dict(),
                "description": "Brain tumour type (pituitary / meningioma / glioma) from one T1 contrast-enhanced MRI slice; "
                               "ResNet-18 layout at half width, 1 grayscale channel, trained on the figshare set"
                               + (f", {kwargs.get('last_stride', 2) == 1 and '10 x 10 last stage, ' or ''}taught to look at "
                                  f"the tumour (training boxes, {r['guide']} guidance, crops that keep the tumour)."
                                  if guided else ".") + (
                                   f" A last stage on {r['init']} trained only the component its classes share in the "
                                   f"last layer, with a term that asks Grad-CAM's peak in the box to be positive: "
                                   f"{r['init']}'s probabilities and predictions, and a Grad-CAM picture (its positive "
                                   f"part) that is no longer blank on a third of the slices (see "
                                   f"docs/case-study-brain.md)." if r.get("tune") == "shared-head" else ""),
                "test_accuracy": metrics["test"]["accuracy"]}
    r = metrics["recipe"]
    spec = InputSpec(
        size=(r["size"], r["size"]), channels=1, scale="minmax", mean=(0.0,), std=(1.0,), labels=LABELS,
        multi_label=False, modality="synthetic MRI-like phantom (medlens.data.phantom)",
        notes="Per-image min-max to [0, 1]; no further normalisation.",
        extra={"generator": "medlens.data.phantom." + ("shortcut_set" if name == "phantom-shortcut" else "phantom_2d")},
    )
    desc = {
        "phantom-lesion": "Lesion present or absent on synthetic MRI-like slices with exact lesion masks (ground truth for localisation).",
        "phantom-shortcut": "Trained on phantoms whose corner marker tracks the class (faint lesions): it learns the marker; "
                            "a faithful explanation points at the top-left corner.",
    }[name]
    return {"architecture": "PhantomCNN", "kwargs": {"num_classes": 2, "in_channels": 1, "widths": list(r["widths"])},
            "weights": f"{name}.pt", "card": f"{name}.md", "input_spec": spec.to_dict(), "description": desc,
            "test_accuracy": metrics["test"]["accuracy"]}


def _confusion_table(m: dict[str, Any]) -> str:
    labels = m["labels"]
    rows = ["| true \\ predicted | " + " | ".join(labels) + " | accuracy |", "|---" * (len(labels) + 2) + "|"]
    for i, name in enumerate(labels):
        acc = m["per_class_accuracy"][name]
        rows.append(f"| **{name}** | " + " | ".join(str(v) for v in m["confusion_matrix"][i]) + f" | {acc:.1%} |")
    return "\n".join(rows)


def _data_lines(name: str, metrics: dict[str, Any], r: dict[str, Any], test: dict[str, Any]) -> list[str]:
    """The card's data section: the figshare source, licence, layout and split, or the phantoms' seeds."""
    lines: list[str] = []
    if is_brain(name):
        lines += [
            f"- Source and licence: {CREDIT}. Papers: Cheng et al., PLoS ONE 10(10), 2015; PLoS ONE 11(6), 2016. "
            "Images from Nanfang Hospital, Guangzhou, and General Hospital, Tianjin Medical University (2005-2010).",
            "- This model is a derivative work of that data set and is credited accordingly (CC BY 4.0).",
            "- Used copy: the 8-bit JPEG export with tumour boxes (2,764 slices; some numbers held back by the "
            "project as an unseen check set).",
            "- Layout that `--data DATA` expects (DATA: the figshare data folder): one folder per class (`pituitary/`, "
            "`meningioma/`, `glioma/`), each slice `N.jpg` with `N.txt` beside it holding its YOLO box "
            "`label xc yc w h`, normalised to [0, 1] by the image size.",
            "- Split (fixed, `medlens.data.figshare.split_of`): slice numbers N in blocks of 30 consecutive numbers, "
            "block b = (N - 1) // 30; b % 10 == 0 -> test, b % 10 == 5 -> validation, other blocks -> train. Slices of "
            "one patient have consecutive numbers, so this keeps (most) patients on one side.",
            f"- Sizes: train {sum(metrics['split_counts']['train'])}, validation {sum(metrics['split_counts']['val'])}, "
            f"test {test['n']} slices (per class pituitary/meningioma/glioma: train {metrics['split_counts']['train']}, "
            f"val {metrics['split_counts']['val']}, test {metrics['split_counts']['test']}).",
        ]
    else:
        seeds = metrics["data_seeds"]
        lines += [f"- Synthetic, generated on the fly by `medlens.training.recipes.phantom_data` (no external data): train "
                  f"{r['n_train']} cases (seed {seeds['train']}), validation {r['n_val']} (seed {seeds['val']}), test "
                  f"{r['n_test']} (seed {seeds['test']}), {r['size']}x{r['size']} pixels, about half with a lesion."]
        if name == "phantom-shortcut":
            lines.append("- Shortcut variant: lesions are faint (contrast 0.06-0.1) and a corner tag is burned in on every "
                         "lesion case and on no normal case, so the tag alone separates the classes in training.")
    return lines


def render_card(name: str, metrics: dict[str, Any], entry: dict[str, Any], weights_path: Path, note: str = "",
                sections: str = "") -> str:
    """The Markdown model card of a bundled model, from its training metrics; `sections` (Markdown, e.g. the
    localisation tables from `medlens evaluate`) goes before the limitations."""
    size_mb = weights_path.stat().st_size / 1e6
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    spec = entry["input_spec"]
    r = metrics["recipe"]
    test = metrics["test"]
    lines = [f"# Model card: `{name}`", "", entry["description"], "",
             "**Intended use: research and teaching (how explanation methods behave on a model that learned something "
             "real or a known shortcut). Not a medical device; not for diagnosis or any clinical decision.**", "",
             "## Model", "",
             f"- Architecture: `medlens.models.{'hybrid_vit' if entry['architecture'] == 'HybridViT' else 'networks'}.{entry['architecture']}({', '.join(f'{k}={v}' for k, v in entry['kwargs'].items())})`",
             f"- Weights: `{entry['weights']}`, {size_mb:.2f} MB (float32 state dict), SHA-256 `{digest}`",
             "- Load offline: `medlens.load_model(\"" + name + "\")` (eval mode, with `.labels`, `.multi_label`, `.input_spec`)", "",
             "## Input spec", "", "| field | value |", "|---|---|"]
    for key in ("size", "channels", "scale", "resample", "mean", "std", "labels", "multi_label", "modality", "notes"):
        lines.append(f"| {key} | {spec[key]} |")
    lines += ["", "## Data", ""] + _data_lines(name, metrics, r, test)
    lines += ["", "## Training", "",
              f"- Recipe (`medlens.training.recipes`): {json.dumps(r)}",
              f"- Epoch kept: {metrics.get('selection', 'the best validation accuracy')} (validation accuracy "
              f"{metrics['best_val_accuracy']:.4f}).",
              f"- Wall time: {metrics['train_seconds'] / 60:.1f} min with {metrics['threads']} CPU thread(s). {note}".rstrip(),
              f"- Reproduce: `medlens train {name}" + (" --data DIR" if is_brain(name) else "")
              + f" --threads {metrics['threads']} --out trained` "
              + (f"where DIR is {FIGSHARE_LAYOUT} " if is_brain(name) else "")
              + "(fixed seed; bit-for-bit equality across machines and thread counts is not guaranteed).", "",
              f"## Results on the test split ({test['n']} {'slices' if is_brain(name) else 'phantoms'})", "",
              f"Overall accuracy: **{test['accuracy']:.2%}** ({round(test['accuracy'] * test['n'])}/{test['n']}).", "",
              _confusion_table(test), ""]
    if is_brain(name):
        goal = 0.88 if entry["architecture"] == "HybridViT" else 0.92
        lines += [f"Project goal: at least {goal:.0%} test accuracy: **{'met' if test['accuracy'] >= goal else 'not met'}** "
                  f"({test['accuracy']:.2%}).", ""]
    if "val" in metrics:
        lines += [f"Validation accuracy of the chosen checkpoint: {metrics['val']['accuracy']:.2%} (n = {metrics['val']['n']}).", ""]
    if name == "phantom-shortcut":
        lines += ["How much the model relies on the marker (same test phantoms, marker mode changed):", "",
                  "| marker on the test phantoms | accuracy |", "|---|---|",
                  f"| tracks the class (as in training) | {test['accuracy']:.2%} |"]
        for mode, text in (("random", "independent of the class"), ("never", "never present"), ("always", "always present")):
            key = f"test_marker_{mode}"
            if key in metrics:
                lines.append(f"| {text} | {metrics[key]['accuracy']:.2%} |")
        lines.append("")
    if is_brain(name):
        if sections:
            lines += [sections.strip(), ""]
        lines += ["## Limitations", "",
                  "- Trained at a small input size on one public data set from two hospitals; slice-level, one tumour per slice, "
                  "no normal class: it always answers one of three tumour types.",
                  "- The split is by blocks of slice numbers, not by the original patient ids, so a patient at a block "
                  "boundary can fall on both sides.",
                  "- The accuracy above is on a few hundred slices; expect a few points of sampling error.", ""]
    return "\n".join(lines)


def export_bundled(name: str, trained_dir: PathLike, note: str = "", sections: str = "") -> Path:
    """Copy trained weights into the package (models/weights), update models.json and write the model card."""
    trained_dir = Path(trained_dir)
    metrics = json.loads((trained_dir / f"{name}.metrics.json").read_text())
    entry = bundled_entry(name, metrics)
    dest = zoo.WEIGHTS_DIR / entry["weights"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, (trained_dir / f"{name}.pt").read_bytes())
    entry["sha256"] = hashlib.sha256(dest.read_bytes()).hexdigest()
    specs = json.loads(zoo.SPEC_FILE.read_text()) if zoo.SPEC_FILE.is_file() else {}
    specs[name] = entry
    atomic_write(zoo.SPEC_FILE, json.dumps(dict(sorted(specs.items())), indent=2) + "\n")
    atomic_write(zoo.CARDS_DIR / entry["card"], render_card(name, metrics, entry, dest, note, sections) + "\n")
    for record in (f"{name}.metrics.json", f"{name}.train.log"):  # the run's own record goes beside its card
        if (trained_dir / record).is_file():
            atomic_write(zoo.CARDS_DIR / record, (trained_dir / record).read_text())
    zoo._specs.cache_clear()
    return dest
