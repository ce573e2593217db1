"""The `medlens methods`, `medlens models` and `medlens explain` commands (click), exported as `COMMANDS`.

They only parse options and call the library: the registry, `io.models.load_model`, `io.images`, `explain`
and `io.output.write_explanation`; every user mistake surfaces as a `MedlensError` (exit status 2 in cli.py).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from medlens.errors import InputError, MedlensError, MethodError, ModelError, TargetError

EPILOG_MODELS = """\
Model sources for --model:
  a bundled name      see the table above
  FILE.pt / FILE.pth  TorchScript (torch.jit.save) or a pickled module (torch.save(model); loading runs code, so
                      medlens warns). Labels and input spec come from the model, a sidecar JSON beside the file
                      (FILE.pt.json or FILE.json with InputSpec fields: labels, size, channels, scale, mean, std,
                      multi_label, resample: bilinear or area), or --labels/--input-size/--multi-label; defaults: labels "class 0".."class K-1",
                      softmax, the scan's own size, min-max intensities.
  torchvision:ARCH    a torchvision architecture with a local state_dict: --weights FILE (num_classes and input
                      channels are read from the weights)
  timm:ARCH           the same for timm architectures (needs `pip install timm`)
  xrv:NAME            a TorchXRayVision model (needs `pip install torchxrayvision` and its weights file already in
                      ~/.torchxrayvision/models_data/); e.g. xrv:densenet121-res224-all. Nothing is downloaded.
"""


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


@click.command("methods")
def methods_command() -> None:
    """List every explanation method with what it needs (from the one method registry)."""
    from medlens.core.registry import all_specs

    rows = [
        (s.name, s.family, _yes(s.needs_gradients), _yes(s.needs_layer), _yes(s.supports_3d), _yes(s.stochastic), s.cost, s.summary)
        for s in all_specs().values()
    ]
    click.echo(_table(rows, ("name", "family", "gradients", "layer", "3-D", "stochastic", "cost", "summary")))


@click.command("models", epilog=EPILOG_MODELS)
def models_command() -> None:
    """List bundled models (labels, input spec) and the other model sources medlens can load."""
    from medlens.io.models import XRV_KNOWN_FILES, _info_get, bundled_models

    bundled = bundled_models()
    if bundled:
        rows = []
        for name, info in bundled.items():
            spec = _info_get(info, "input_spec")
            labels = _info_get(info, "labels") or (getattr(spec, "labels", None) if spec is not None else None) or ()
            size = getattr(spec, "size", None) if spec is not None else _info_get(info, "size")
            channels = getattr(spec, "channels", "") if spec is not None else _info_get(info, "channels", "")
            summary = _info_get(info, "summary") or _info_get(info, "description") or ""
            accuracy = _info_get(info, "test_accuracy")
            multi = _info_get(info, "multi_label", getattr(spec, "multi_label", False))
            rows.append((name, " x ".join(map(str, size)) if size else "any", str(channels), "multi" if multi else "single",
                         f"{accuracy:.3f}" if isinstance(accuracy, (int, float)) else "-", ", ".join(map(str, labels)), str(summary)))
        click.echo("Bundled models:")
        click.echo(_table(rows, ("name", "input size", "channels", "labels are", "test acc.", "labels", "summary")))
    else:
        from medlens.io.models import BUNDLED_PROBLEM

        click.echo("Bundled models: " + (f"unavailable ({BUNDLED_PROBLEM[0]})" if BUNDLED_PROBLEM else "none in this installation."))
    click.echo("")
    try:
        import torchxrayvision  # type: ignore[import-not-found]  # noqa: F401

        xrv_state = "installed"
    except ImportError:
        xrv_state = "not installed"
    click.echo(f"TorchXRayVision ({xrv_state}): xrv:NAME, e.g. {', '.join(sorted(XRV_KNOWN_FILES))}.")
    click.echo("  Weights must already be in ~/.torchxrayvision/models_data/; medlens never downloads.")
    click.echo("")
    click.echo(EPILOG_MODELS.rstrip())


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MethodError(f"--option {item!r} must look like key=value (e.g. --option eigen_smooth=true).")
        options[key.strip()] = _parse_value(value)
    return options


def _parse_targets(text: Optional[str]) -> Any:
    if text is None or not text.strip():
        return None
    items: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        items.append(int(part) if part.lstrip("-").isdigit() else part)
    if not items:
        return None
    return items


def check_targets(targets: Any, labels: Sequence[str]) -> None:
    """Fail early (before any image is processed) on a target index out of range or an unknown class name."""
    if targets is None:
        return
    from medlens.core.targets import _index

    for t in targets:
        if isinstance(t, int) and t < 0:
            raise TargetError(f"target index {t} is out of range: this model has {len(labels)} classes (0..{len(labels) - 1}).")
        _index(t, labels, len(labels))


def _image_folder_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = p.name
        for ext in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
            if stem.lower().endswith(ext):
                stem = stem[: -len(ext)]
                break
        else:
            stem = p.stem
        base, candidate, n = stem or "image", stem or "image", 2
        while candidate in names:
            candidate, n = f"{base}-{n}", n + 1
        names.append(candidate)
    return names


def load_model_for_cli(source: str, **options: Any) -> Any:
    """`medlens.load_model`, its warnings (a pickled module runs code) printed as one line each, not Python's form."""
    import medlens

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = medlens.load_model(source, **options)
    for w in caught:
        if issubclass(w.category, UserWarning) and not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            click.echo(f"medlens: warning: {w.message}", err=True)
    return model


@click.command("explain")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", "model_source", required=True, help="A bundled name, a model file, torchvision:ARCH (with --weights) or xrv:NAME.")
@click.option("--methods", default="gradcam", show_default=True, help="Comma-separated method names (see `medlens methods`).")
@click.option("--targets", default=None, help="Comma-separated class indices or names, or 'all'; default: top-1 (multi-label: p >= 0.5).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder (created if needed).")
@click.option("--layer", default=None, help="Target layer by dotted name (default: chosen automatically).")
@click.option("--seed", type=int, default=None, help="Seed for stochastic methods (recorded in provenance).")
@click.option("--labels", default=None, help="Comma-separated class names, when the model carries none.")
@click.option("--input-size", default=None, help="Model input size: 224, 224,224 or 64,64,64 (3-D).")
@click.option("--channels", type=click.IntRange(1, 3), default=None, help="Input channels the model takes (1 or 3).")
@click.option("--multi-label/--single-label", "multi_label", default=None, help="Sigmoid (multi-label) or softmax outputs.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Local weights file for an architecture name.")
@click.option("--slice", "slice_index", type=int, default=None, help="For a 2-D model and a volume: the axial slice (default: middle).")
@click.option("--frame", type=int, default=None, help="For a multi-frame file: the frame to read.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--option", "option_items", multiple=True, help="A method option key=value (repeatable), e.g. --option eigen_smooth=true.")
def explain_command(
    images: Sequence[Path],
    model_source: str,
    methods: str,
    targets: Optional[str],
    out_dir: Path,
    layer: Optional[str],
    seed: Optional[int],
    labels: Optional[str],
    input_size: Optional[str],
    channels: Optional[int],
    multi_label: Optional[bool],
    weights: Optional[Path],
    slice_index: Optional[int],
    frame: Optional[int],
    device: str,
    option_items: Sequence[str],
) -> None:
    """Explain a model's findings on IMAGE... (PNG, JPEG, TIFF, DICOM, NIfTI, or a folder holding one DICOM series).

    Writes OUT/<image>/<method>_<target>.png, panel.png, maps.npz and provenance.json per image.
    """
    from medlens.io.files import ensure_writable

    # Cheap checks first, so that no work is wasted: output folder, method names and options, image files.
    created = not Path(out_dir).exists()
    out = ensure_writable(out_dir)
    try:
        _explain_into(out, images, model_source, methods, targets, layer, seed, labels, input_size, channels,
                      multi_label, weights, slice_index, frame, device, option_items)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a run that wrote nothing leaves no empty folder
            out.rmdir()
        raise


def _explain_into(out: Path, images: Sequence[Path], model_source: str, methods: str, targets: Optional[str],
                  layer: Optional[str], seed: Optional[int], labels: Optional[str], input_size: Optional[str],
                  channels: Optional[int], multi_label: Optional[bool], weights: Optional[Path],
                  slice_index: Optional[int], frame: Optional[int], device: str, option_items: Sequence[str]) -> None:
    from tqdm import tqdm

    from medlens.core.explain import check_torchscript_support, explain
    from medlens.io.images import model_dims, prepare, read_image
    from medlens.io.output import write_explanation
    from medlens.core.registry import get_spec

    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_names:
        raise MethodError("--methods is empty; give one or more names, e.g. --methods gradcam,layercam.")
    specs = [get_spec(m) for m in method_names]
    options = _parse_options(option_items)
    accepted = {k for s in specs for k in s.options}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise MethodError(f"option(s) {', '.join(unknown)} are not used by {', '.join(s.name for s in specs)}; they accept: {', '.join(sorted(accepted)) or '(none)'}.")
    for p in images:
        if not p.exists():
            raise InputError(f"{p}: no such file. Check the path (relative paths start from {Path.cwd()}).")

    model_options: dict[str, Any] = {}
    if labels is not None:
        model_options["labels"] = labels
    if input_size is not None:
        model_options["input_size"] = input_size
    if channels is not None:
        model_options["channels"] = channels
    if multi_label is not None:
        model_options["multi_label"] = multi_label
    if weights is not None:
        model_options["weights"] = weights
    model = load_model_for_cli(model_source, **model_options)
    for note in (getattr(model, "medlens_source", None) or {}).get("notes", []):  # how labels, size and outputs were read
        click.echo(f"medlens: note: {note}", err=True)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise MedlensError(f"cannot use device {device!r} ({exc}); try --device cpu.") from None
    check_torchscript_support(model, specs)
    if targets is not None and targets.strip().lower() == "all":
        target_list: Any = list(range(len(model.labels)))
    else:
        target_list = _parse_targets(targets)
    check_targets(target_list, model.labels)
    dims = model_dims(model)
    flat = [s.name for s in specs if dims == 3 and not s.supports_3d]
    if flat:
        raise MethodError(f"method(s) {', '.join(flat)} support 2-D inputs only, and this model takes 3-D volumes.")

    failures: list[str] = []
    folder_names = _image_folder_names(list(images))
    progress = tqdm(list(zip(images, folder_names)), desc="explaining", unit="image", disable=len(images) < 2, file=sys.stderr)
    for path, folder_name in progress:
        try:
            scan = read_image(path, frame=frame)
            prepared = prepare(scan, model.input_spec, dims=dims, slice_index=slice_index)
            x = prepared.tensor.to(device)
            result = explain(model, x, methods=method_names, targets=target_list, layer=layer, seed=seed, **options)
            write_explanation(
                result,
                out / folder_name,
                display=prepared.display,
                input_file=path,
                loading_notes=prepared.notes,
                model_source=getattr(model, "medlens_source", None),
            )
        except (InputError, ModelError) as exc:  # this image's file, or the model on this image: go on with the rest
            # (a bad option, target or output folder would fail every image alike: those end the run at once)
            if len(images) == 1:
                raise
            message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
            failures.append(message)
            progress.write(f"medlens: skipped {message}", file=sys.stderr)
    if failures:
        n_ok = len(images) - len(failures)
        raise InputError(
            f"{len(failures)} of {len(images)} image(s) could not be explained (the other {n_ok} were written to {out}): "
            + " | ".join(failures))
    click.echo(f"wrote results for {len(images)} image(s) to {out}")


COMMANDS = [methods_command, models_command, explain_command]
