"""Training code that reproduces every bundled model from data with a fixed seed (`medlens train MODEL`).

Owns the recipes (data, augmentation, optimiser, epochs), the epoch log, best-by-validation checkpointing and test metrics.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import click
import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import InputError

PathLike = Union[str, Path]

# ----------------------------------------------------------------------------------------------- recipes
BRAIN_RECIPE: dict[str, Any] = {
    "size": 160,
    "widths": (32, 64, 128, 256),
    "epochs": 36,
    "batch_size": 32,
    "lr": 3e-3,
    "weight_decay": 0.05,
    "label_smoothing": 0.1,
    "mean": 0.15,
    "std": 0.2,
    "ema_decay": 0.995,
    "seed": 0,
}


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def confusion_matrix(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    idx = true.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    """Overall accuracy, per-class accuracy (recall) and the confusion matrix as plain JSON-able values."""
    total = int(cm.sum())
    correct = int(cm.diag().sum())
    per_class = {
        name: (float(cm[i, i]) / float(cm[i].sum()) if cm[i].sum() > 0 else float("nan")) for i, name in enumerate(labels)
    }
    return {
        "n": total,
        "accuracy": correct / max(total, 1),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
    }


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 64, prepare: Optional[Callable] = None) -> torch.Tensor:
    """Predicted class per row of x (batched, eval mode)."""
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        if prepare is not None:
            xb = prepare(xb)
        out.append(model(xb).argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- brain MRI
def brain_prepare(images: torch.Tensor, mean: float = BRAIN_RECIPE["mean"], std: float = BRAIN_RECIPE["std"]) -> torch.Tensor:
    """uint8 slices (N, 1, S, S) -> the model's input: per-image min-max to [0, 1], then (x - mean) / std."""
    from medlens.data.figshare import minmax_scale

    return (minmax_scale(images) - mean) / std


def _augment_2d(x01: torch.Tensor, gen: torch.Generator, rotate_deg: float = 12.0, scale: float = 0.1, shift: float = 0.06) -> torch.Tensor:
    """Batched random flip, rotation, scale, shift (one affine grid) and gamma/contrast jitter on [0, 1] images."""
    n = x01.shape[0]
    u = lambda: torch.rand(n, generator=gen) * 2 - 1  # noqa: E731
    angle = u() * math.radians(rotate_deg)
    s = 1.0 + u() * scale
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * flip, -sin, u() * shift
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * flip, cos, u() * shift
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    out = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(u() * 0.25).view(n, 1, 1, 1)
    contrast = (1.0 + u() * 0.1).view(n, 1, 1, 1)
    return (out.clamp(0, 1) ** gamma * contrast).clamp(0, 1)


class WeightAverage:
    """Exponential moving average of a model's parameters and float buffers (BatchNorm statistics included).

    Evaluating and checkpointing the average rather than the last step gives a steadier model on small data."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)


def train_brain(
    data_root: PathLike,
    out_dir: PathLike,
    epochs: Optional[int] = None,
    size: Optional[int] = None,
    seed: int = 0,
    threads: int = 2,
    cache_dir: Optional[PathLike] = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Train `brain-tumor-mri` on the figshare split; writes the best-by-validation weights and metrics to out_dir."""
    from tqdm import tqdm

    from medlens.data.figshare import CLASSES, CREDIT, load_arrays
    from medlens.models.architectures import SmallResNet

    torch.set_num_threads(threads)
    r = dict(BRAIN_RECIPE, seed=seed)
    if epochs is not None:
        r["epochs"] = int(epochs)
    if size is not None:
        r["size"] = int(size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "brain-tumor-mri.train.log"
    log_file = open(log_path, "a")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        log_file.write(line + "\n")
        log_file.flush()
        (log or tqdm.write)(line)

    t0 = time.time()
    say(f"brain-tumor-mri: recipe {json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in r.items()})}")
    data = {s: load_arrays(data_root, s, r["size"], cache_dir=cache_dir, progress=True) for s in ("train", "val", "test")}
    for s, d in data.items():
        say(f"{s}: {len(d['labels'])} slices, per class {torch.bincount(d['labels'], minlength=3).tolist()}")
    torch.manual_seed(r["seed"])
    gen = torch.Generator().manual_seed(r["seed"])
    model = SmallResNet(num_classes=len(CLASSES), in_channels=1, widths=r["widths"])
    average = WeightAverage(model, r["ema_decay"]) if r.get("ema_decay") else None
    eval_model = SmallResNet(num_classes=len(CLASSES), in_channels=1, widths=r["widths"]) if average else model
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    xtr, ytr = data["train"]["images"], data["train"]["labels"]
    steps_per_epoch = math.ceil(len(ytr) / r["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps_per_epoch, pct_start=0.15)
    mean, std = r["mean"], r["std"]
    xval = brain_prepare(data["val"]["images"], mean, std)
    best = (-1.0, float("inf"))
    history = []
    for epoch in range(1, r["epochs"] + 1):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{r['epochs']}", unit="batch", leave=False)
        for b in bar:
            idx = perm[b * r["batch_size"] : (b + 1) * r["batch_size"]]
            from medlens.data.figshare import minmax_scale

            xb = (_augment_2d(minmax_scale(xtr[idx]), gen) - mean) / std
            yb = ytr[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=r["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if average is not None:
                average.update(model)
            total_loss += float(loss) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if average is not None:  # validate and checkpoint the weight average
            average.copy_to(eval_model)
        eval_model.eval()
        with torch.no_grad():
            vlogits = torch.cat([eval_model(xval[i : i + 64]) for i in range(0, len(xval), 64)])
        vloss = float(F.cross_entropy(vlogits, data["val"]["labels"]))
        vacc = float((vlogits.argmax(1) == data["val"]["labels"]).float().mean())
        improved = (vacc, -vloss) > (best[0], -best[1])
        if improved:
            best = (vacc, vloss)
            _atomic_save(eval_model.state_dict(), out_dir / "brain-tumor-mri.pt")
        history.append({"epoch": epoch, "train_loss": total_loss / seen, "train_acc": correct / seen, "val_loss": vloss, "val_acc": vacc})
        say(
            f"epoch {epoch:3d}/{r['epochs']} train loss {total_loss / seen:.4f} acc {correct / seen:.4f} | "
            f"val loss {vloss:.4f} acc {vacc:.4f}{'  * best, saved' if improved else ''} | {time.time() - t0:.0f} s"
        )
    train_seconds = time.time() - t0
    model.load_state_dict(torch.load(out_dir / "brain-tumor-mri.pt", weights_only=True))
    results = {}
    for s in ("val", "test"):
        pred = predict(model, data[s]["images"], prepare=lambda xb: brain_prepare(xb, mean, std))
        cm = confusion_matrix(pred, data[s]["labels"], len(CLASSES))
        results[s] = metrics_from_confusion(cm, list(CLASSES))
    summary = {
        "model": "brain-tumor-mri",
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()},
        "best_val_accuracy": best[0],
        "train_seconds": train_seconds,
        "threads": threads,
        "history": history,
        "val": results["val"],
        "test": results["test"],
        "data_credit": CREDIT,
        "split_counts": {k: torch.bincount(d["labels"], minlength=3).tolist() for k, d in data.items()},
    }
    _atomic_write_text(json.dumps(summary, indent=2), out_dir / "brain-tumor-mri.metrics.json")
    say(f"done in {train_seconds:.0f} s; best val acc {best[0]:.4f}; test acc {results['test']['accuracy']:.4f} "
        f"per class {results['test']['per_class_accuracy']}; confusion {results['test']['confusion_matrix']}")
    log_file.close()
    return summary


# ----------------------------------------------------------------------------------------------- phantoms
PHANTOM_RECIPES: dict[str, dict[str, Any]] = {
    "phantom-lesion": {"size": 64, "widths": (16, 32, 64), "marker": "none", "n_train": 1600, "n_val": 400,
                       "n_test": 1000, "epochs": 8, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4},
    "phantom-shortcut": {"size": 64, "widths": (16, 32, 64), "marker": "correlated", "n_train": 1600, "n_val": 400,
                         "n_test": 1000, "epochs": 6, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4},
}
#: data seeds: train, validation and the model card's test set are drawn from different seeds
PHANTOM_SEEDS = {"train": 1, "val": 2, "test": 3}


def phantom_data(name: str, split: str, n: Optional[int] = None, seed: Optional[int] = None, marker: Optional[str] = None):
    """The phantom set a bundled phantom model is trained/validated/tested on (marker mode overridable)."""
    from medlens.data.phantom import phantom_2d, shortcut_set

    r = PHANTOM_RECIPES[name]
    n = r[f"n_{split}"] if n is None else n
    seed = PHANTOM_SEEDS[split] if seed is None else seed
    if name == "phantom-shortcut":
        if marker in (None, "correlated"):
            return shortcut_set(n, size=r["size"], seed=seed)
        return phantom_2d(n, size=r["size"], seed=seed, marker=marker, lesion_contrast=(0.06, 0.1))
    return phantom_2d(n, size=r["size"], seed=seed, marker=marker or r["marker"])


def phantom_prepare(images: torch.Tensor) -> torch.Tensor:
    """Phantom images -> model input: per-image min-max to [0, 1] (the spec's "minmax" scale, mean 0, std 1)."""
    from medlens.data.figshare import minmax_scale

    return minmax_scale(images)


def train_phantom(
    name: str,
    out_dir: PathLike,
    epochs: Optional[int] = None,
    seed: int = 0,
    threads: int = 2,
    log: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Train `phantom-lesion` or `phantom-shortcut` on freshly generated phantoms; writes weights and metrics."""
    from tqdm import tqdm

    from medlens.data.phantom import LABELS
    from medlens.models.architectures import PhantomCNN

    if name not in PHANTOM_RECIPES:
        raise InputError(f"unknown phantom model {name!r}; expected one of {sorted(PHANTOM_RECIPES)}.")
    torch.set_num_threads(threads)
    r = dict(PHANTOM_RECIPES[name], seed=seed)
    if epochs is not None:
        r["epochs"] = int(epochs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / f"{name}.train.log", "a")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        log_file.write(line + "\n")
        log_file.flush()
        (log or tqdm.write)(line)

    t0 = time.time()
    say(f"{name}: recipe {json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in r.items()})}")
    train, val = phantom_data(name, "train"), phantom_data(name, "val")
    say(f"generated train {len(train)} / val {len(val)} phantoms in {time.time() - t0:.1f} s")
    torch.manual_seed(r["seed"])
    gen = torch.Generator().manual_seed(r["seed"])
    model = PhantomCNN(num_classes=len(LABELS), in_channels=1, widths=r["widths"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    xtr, ytr = phantom_prepare(train.images), train.labels
    xval, yval = phantom_prepare(val.images), val.labels
    steps = math.ceil(len(ytr) / r["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps, pct_start=0.2)
    best = (-1.0, float("inf"))
    history = []
    for epoch in range(1, r["epochs"] + 1):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for b in tqdm(range(steps), desc=f"{name} epoch {epoch}/{r['epochs']}", unit="batch", leave=False):
            idx = perm[b * r["batch_size"] : (b + 1) * r["batch_size"]]
            logits = model(xtr[idx])
            loss = F.cross_entropy(logits, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss) * len(idx)
            correct += int((logits.argmax(1) == ytr[idx]).sum())
            seen += len(idx)
        model.eval()
        with torch.no_grad():
            vlogits = model(xval)
        vloss = float(F.cross_entropy(vlogits, yval))
        vacc = float((vlogits.argmax(1) == yval).float().mean())
        improved = (vacc, -vloss) > (best[0], -best[1])
        if improved:
            best = (vacc, vloss)
            _atomic_save(model.state_dict(), out_dir / f"{name}.pt")
        history.append({"epoch": epoch, "train_loss": total_loss / seen, "train_acc": correct / seen, "val_loss": vloss, "val_acc": vacc})
        say(f"epoch {epoch}/{r['epochs']} train loss {total_loss / seen:.4f} acc {correct / seen:.4f} | "
            f"val loss {vloss:.4f} acc {vacc:.4f}{'  * best, saved' if improved else ''} | {time.time() - t0:.0f} s")
    train_seconds = time.time() - t0
    model.load_state_dict(torch.load(out_dir / f"{name}.pt", weights_only=True))
    results: dict[str, Any] = {}
    test = phantom_data(name, "test")
    cm = confusion_matrix(predict(model, test.images, prepare=phantom_prepare), test.labels, len(LABELS))
    results["test"] = metrics_from_confusion(cm, list(LABELS))
    if name == "phantom-shortcut":  # how much the model leans on the marker
        for mode in ("random", "never", "always"):
            other = phantom_data(name, "test", marker=mode)
            cm = confusion_matrix(predict(model, other.images, prepare=phantom_prepare), other.labels, len(LABELS))
            results[f"test_marker_{mode}"] = metrics_from_confusion(cm, list(LABELS))
    summary = {"model": name, "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()},
               "data_seeds": PHANTOM_SEEDS, "best_val_accuracy": best[0], "train_seconds": train_seconds,
               "threads": threads, "history": history, **results}
    _atomic_write_text(json.dumps(summary, indent=2), out_dir / f"{name}.metrics.json")
    say(f"done in {train_seconds:.0f} s; test acc {results['test']['accuracy']:.4f}"
        + "".join(f"; {k} acc {v['accuracy']:.4f}" for k, v in results.items() if k != "test"))
    log_file.close()
    return summary


# ----------------------------------------------------------------------------------------------- export
def bundled_entry(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The models.json entry of a bundled model: architecture, kwargs, input spec, description, card, metrics."""
    from medlens.data.figshare import CLASSES
    from medlens.data.phantom import LABELS
    from medlens.core.input_spec import InputSpec

    if name == "brain-tumor-mri":
        r = metrics["recipe"]
        spec = InputSpec(
            size=(r["size"], r["size"]), channels=1, scale="minmax", mean=(r["mean"],), std=(r["std"],),
            labels=CLASSES, multi_label=False, modality="MRI, T1-weighted contrast-enhanced, axial/coronal/sagittal slice",
            notes="Whole slice resized to the input size (area filter), per-image min-max to [0, 1], then (x - mean) / std.",
            resample="area",
            extra={"dataset": "figshare brain tumour (Cheng et al.), doi:10.6084/m9.figshare.1512427, CC BY 4.0",
                   "label_ids": {c: i for i, c in enumerate(CLASSES)}},
        )
        return {"architecture": "SmallResNet", "kwargs": {"num_classes": 3, "in_channels": 1, "widths": list(r["widths"])},
                "weights": f"{name}.pt", "card": f"{name}.md", "input_spec": spec.to_dict(),
                "description": "Brain tumour type (pituitary / meningioma / glioma) from one T1 contrast-enhanced MRI slice; "
                               "ResNet-18 layout at half width, 1 grayscale channel, trained on the figshare set.",
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


def render_card(name: str, metrics: dict[str, Any], entry: dict[str, Any], weights_path: Path, note: str = "") -> str:
    """The Markdown model card of a bundled model, from its training metrics."""
    import hashlib

    size_mb = weights_path.stat().st_size / 1e6
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    spec = entry["input_spec"]
    r = metrics["recipe"]
    test = metrics["test"]
    lines = [f"# Model card: `{name}`", "", entry["description"], "",
             "**Intended use: research and teaching (how explanation methods behave on a model that learned something "
             "real or a known shortcut). Not a medical device; not for diagnosis or any clinical decision.**", "",
             "## Model", "",
             f"- Architecture: `medlens.models.architectures.{entry['architecture']}({', '.join(f'{k}={v}' for k, v in entry['kwargs'].items())})`",
             f"- Weights: `{entry['weights']}`, {size_mb:.2f} MB (float32 state dict), SHA-256 `{digest}`",
             "- Load offline: `medlens.load_model(\"" + name + "\")` (eval mode, with `.labels`, `.multi_label`, `.input_spec`)", "",
             "## Input spec", "", "| field | value |", "|---|---|"]
    for key in ("size", "channels", "scale", "resample", "mean", "std", "labels", "multi_label", "modality", "notes"):
        lines.append(f"| {key} | {spec[key]} |")
    lines += ["", "## Data", ""]
    if name == "brain-tumor-mri":
        from medlens.data.figshare import CREDIT

        lines += [
            f"- Source and licence: {CREDIT}. Papers: Cheng et al., PLoS ONE 10(10), 2015; PLoS ONE 11(6), 2016. "
            "Images from Nanfang Hospital, Guangzhou, and General Hospital, Tianjin Medical University (2005-2010).",
            "- This model is a derivative work of that data set and is credited accordingly (CC BY 4.0).",
            "- Used copy: the 8-bit JPEG export with tumour boxes (2,764 slices; some numbers held back by the "
            "project as an unseen check set).",
            "- Split (fixed, `medlens.data.figshare.split_of`): slice numbers N in blocks of 30 consecutive numbers, "
            "block b = (N - 1) // 30; b % 10 == 0 -> test, b % 10 == 5 -> validation, other blocks -> train. Slices of "
            "one patient have consecutive numbers, so this keeps (most) patients on one side.",
            f"- Sizes: train {sum(metrics['split_counts']['train'])}, validation {sum(metrics['split_counts']['val'])}, "
            f"test {test['n']} slices (per class pituitary/meningioma/glioma: train {metrics['split_counts']['train']}, "
            f"val {metrics['split_counts']['val']}, test {metrics['split_counts']['test']}).",
        ]
    else:
        seeds = metrics["data_seeds"]
        lines += [f"- Synthetic, generated on the fly by `medlens.training.train.phantom_data` (no external data): train "
                  f"{r['n_train']} cases (seed {seeds['train']}), validation {r['n_val']} (seed {seeds['val']}), test "
                  f"{r['n_test']} (seed {seeds['test']}), {r['size']}x{r['size']} pixels, about half with a lesion."]
        if name == "phantom-shortcut":
            lines.append("- Shortcut variant: lesions are faint (contrast 0.06-0.1) and a corner tag is burned in on every "
                         "lesion case and on no normal case, so the tag alone separates the classes in training.")
    lines += ["", "## Training", "",
              f"- Recipe (`medlens.training.train`): {json.dumps(r)}",
              f"- Best epoch chosen by validation accuracy (best validation accuracy {metrics['best_val_accuracy']:.4f}).",
              f"- Wall time: {metrics['train_seconds'] / 60:.1f} min with {metrics['threads']} CPU thread(s). {note}".rstrip(),
              f"- Reproduce: `medlens train {name}"
              + (" --data ../shared/data/brain-tumor-figshare" if name == "brain-tumor-mri" else "")
              + f" --threads {metrics['threads']} --out trained` "
              "(fixed seed; bit-for-bit equality across machines and thread counts is not guaranteed).", "",
              f"## Results on the test split ({test['n']} {'slices' if name == 'brain-tumor-mri' else 'phantoms'})", "",
              f"Overall accuracy: **{test['accuracy']:.2%}** ({round(test['accuracy'] * test['n'])}/{test['n']}).", "",
              _confusion_table(test), ""]
    if name == "brain-tumor-mri":
        met = test["accuracy"] >= 0.92
        lines += [f"Project goal: at least 92% test accuracy: **{'met' if met else 'not met'}** "
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
    if name == "brain-tumor-mri":
        lines += ["## Limitations", "",
                  "- Trained at a small input size on one public data set from two hospitals; slice-level, one tumour per slice, "
                  "no normal class: it always answers one of three tumour types.",
                  "- The split is by blocks of slice numbers, not by the original patient ids, so a patient at a block "
                  "boundary can fall on both sides.",
                  "- The accuracy above is on a few hundred slices; expect a few points of sampling error.", ""]
    return "\n".join(lines)


def export_bundled(name: str, trained_dir: PathLike, note: str = "") -> Path:
    """Copy trained weights into the package (models/weights), update models.json and write the model card."""
    import hashlib
    import shutil

    from medlens.models import zoo

    trained_dir = Path(trained_dir)
    metrics = json.loads((trained_dir / f"{name}.metrics.json").read_text())
    entry = bundled_entry(name, metrics)
    dest = zoo.WEIGHTS_DIR / entry["weights"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(trained_dir / f"{name}.pt", tmp)
    os.replace(tmp, dest)
    entry["sha256"] = hashlib.sha256(dest.read_bytes()).hexdigest()
    specs = json.loads(zoo.SPEC_FILE.read_text()) if zoo.SPEC_FILE.is_file() else {}
    specs[name] = entry
    _atomic_write_text(json.dumps(dict(sorted(specs.items())), indent=2) + "\n", zoo.SPEC_FILE)
    _atomic_write_text(render_card(name, metrics, entry, dest, note) + "\n", zoo.CARDS_DIR / entry["card"])
    for record in (f"{name}.metrics.json", f"{name}.train.log"):  # the run's own record goes beside its card
        if (trained_dir / record).is_file():
            _atomic_write_text((trained_dir / record).read_text(), zoo.CARDS_DIR / record)
    zoo._specs.cache_clear()
    return dest


# ----------------------------------------------------------------------------------------------- CLI
@click.command("train")
@click.argument("model_name", type=click.Choice(["brain-tumor-mri", "phantom-lesion", "phantom-shortcut", "all-phantoms"]))
@click.option("--data", "data_root", type=click.Path(), default=None, help="Dataset folder (brain-tumor-mri: the figshare brain tumour set).")
@click.option("--out", "out_dir", type=click.Path(), default="trained", show_default=True, help="Where weights, metrics and the log go.")
@click.option("--epochs", type=int, default=None, help="Override the recipe's number of epochs.")
@click.option("--size", type=int, default=None, help="brain-tumor-mri only: override the recipe's input size in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
def train_command(model_name: str, data_root: Optional[str], out_dir: str, epochs: Optional[int], size: Optional[int],
                  seed: int, threads: int) -> None:
    """Reproduce a bundled model from data with a fixed seed (progress bar, epoch log, best-by-validation)."""
    if model_name == "brain-tumor-mri":
        if data_root is None:
            raise InputError("brain-tumor-mri needs --data DIR: a copy of the figshare brain tumour set (one folder per class).")
        summary = train_brain(data_root, out_dir, epochs=epochs, size=size, seed=seed, threads=threads,
                              cache_dir=Path(out_dir) / "cache")
        click.echo(f"wrote {Path(out_dir) / 'brain-tumor-mri.pt'} (test accuracy {summary['test']['accuracy']:.4f})")
    else:
        names = ["phantom-lesion", "phantom-shortcut"] if model_name == "all-phantoms" else [model_name]
        for name in names:
            summary = train_phantom(name, out_dir, epochs=epochs, seed=seed, threads=threads)
            click.echo(f"wrote {Path(out_dir) / (name + '.pt')} (test accuracy {summary['test']['accuracy']:.4f})")


COMMANDS = [train_command]
