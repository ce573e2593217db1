"""The `medlens methods`, `medlens models` and `medlens explain` commands (click), exported as `COMMANDS`.

They only parse options and hand a request to `medlens.pipeline`; every user mistake is a `MedlensError` (exit 2).
"""
from __future__ import annotations

import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import click
import torch

from tqdm import tqdm

import medlens
from medlens.core.explain import check_methods
from medlens.core.model_description import describe
from medlens.core.registry import all_specs
from medlens.errors import InputError, MedlensError, MethodError, ModelError
from medlens.io.files import ensure_writable, safe_name
from medlens.io.scan import image_stem
from medlens.models.loading import BUNDLED_PROBLEM, XRV_KNOWN_FILES, _info_get, bundled_models
from medlens.io.regions import read_region
from medlens.pipeline.segmentation import is_segmentation, region_option, segmentation_plan
from medlens.pipeline import ExplainRequest, Plan, explain_file, plan_for, write_outcome

EPILOG_MODELS = """\
Model sources for --model:
  a bundled name      see the table above
  FILE.pt / FILE.pth  TorchScript (torch.jit.save), a torch.export program (FILE.pt2), or a
                      pickled module (torch.save(model); loading it runs code, so only with
                      --allow-pickle). Labels and input spec come from the model, a sidecar JSON
                      beside the file (FILE.pt.json or FILE.json with InputSpec fields: labels,
                      size, channels, scale, mean, std, multi_label, resample: bilinear or area),
                      or --labels/--input-size/--multi-label; defaults: labels "class 0".."class
                      K-1", softmax, the scan's own size, min-max intensities.
  torchvision:ARCH    a torchvision architecture with a local state_dict or .safetensors:
                      --weights FILE (num_classes and input channels are read from the weights);
                      or give the weights file as the model with "architecture":
                      "torchvision:ARCH" in its sidecar JSON
  timm:ARCH           the same for timm architectures (needs `pip install timm`)
  monai:NAME          a MONAI network (UNet, SegResNet, SwinUNETR, ...) with --weights FILE and its
                      constructor "arguments" in the sidecar JSON (needs `pip install monai`)
  xrv:NAME            a TorchXRayVision model (needs `pip install torchxrayvision` and its weights
                      file already in ~/.torchxrayvision/models_data/); e.g.
                      xrv:densenet121-res224-all. Nothing is downloaded.
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
    rows = [
        (s.name, s.family, _yes(s.needs_gradients), _yes(s.needs_layer), _yes(s.supports_3d), _yes(s.stochastic), s.cost, s.summary)
        for s in all_specs().values()
    ]
    click.echo(_table(rows, ("name", "family", "gradients", "layer", "3-D", "stochastic", "cost", "summary")))


WIDTH = 100  # `medlens models` fits a terminal this wide


def _fit(text: str, width: int) -> str:
    """`text` on one line of at most `width` characters (cut at a word, with "...")."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    cut = text[: width - 3].rsplit(" ", 1)[0] if " " in text[: width - 3] else text[: width - 3]
    return cut.rstrip(" ,;") + "..."


def _wrap_markdown(text: str, width: int = WIDTH) -> str:
    """A model card for the terminal: prose and list items wrapped at `width`, tables and code blocks as written."""
    out: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code or line.lstrip().startswith(("|", "```", "#")) or len(line) <= width:
            out.append(line)
            continue
        bullet = re.match(r"^(\s*(?:[-*]|\d+\.)\s+)", line)
        indent = " " * len(bullet.group(1)) if bullet else re.match(r"^\s*", line).group(0)
        out.extend(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(out)


@click.command("models", epilog=EPILOG_MODELS)
@click.argument("name", required=False)
@click.option("--long", "long_", is_flag=True, default=False, help="Each bundled model's whole description.")
def models_command(name: Optional[str], long_: bool) -> None:
    """List bundled models (labels, input spec) and the other model sources medlens can load; NAME prints its card."""
    bundled = bundled_models()
    if name is not None:
        _echo_card(name, bundled)
        return
    if bundled:
        rows, summaries = [], []
        for model_name, info in bundled.items():
            spec = _info_get(info, "input_spec")
            labels = _info_get(info, "labels") or (spec.labels if spec is not None else None) or ()
            size = getattr(spec, "size", None) if spec is not None else _info_get(info, "size")
            channels = getattr(spec, "channels", "") if spec is not None else _info_get(info, "channels", "")
            summary = _info_get(info, "summary") or _info_get(info, "description") or ""
            accuracy = _info_get(info, "test_accuracy")
            multi = _info_get(info, "multi_label", spec.multi_label if spec is not None else False)
            rows.append([model_name, " x ".join(map(str, size)) if size else "any", str(channels), "multi" if multi else "single",
                         f"{accuracy:.3f}" if isinstance(accuracy, (int, float)) else "-", ", ".join(map(str, labels))])
            summaries.append(str(summary))
        header = ("name", "input size", "ch", "labels are", "test acc.", "labels")
        fixed = sum(max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header) - 1))
        for row in rows:
            row[-1] = _fit(row[-1], max(12, WIDTH - fixed))
        lines = _table(rows, header).splitlines()
        click.echo("Bundled models (`medlens models NAME` prints a model's card; --long every whole description):")
        click.echo("\n".join(lines[:2]))
        for line, summary in zip(lines[2:], summaries):
            click.echo(line)
            if long_:
                click.echo("\n".join(textwrap.wrap(summary, WIDTH, initial_indent="    ", subsequent_indent="    ")))
            elif summary:
                click.echo("    " + _fit(summary.split("; ")[0].split(". ")[0], WIDTH - 4))
    else:
        click.echo("Bundled models: " + (f"unavailable ({BUNDLED_PROBLEM[0]})" if BUNDLED_PROBLEM else "none in this installation."))
    click.echo("")
    try:
        import torchxrayvision  # type: ignore[import-not-found]  # noqa: F401

        xrv_state = "installed"
    except ImportError:
        xrv_state = "not installed"
    click.echo("\n".join(textwrap.wrap(f"TorchXRayVision ({xrv_state}): xrv:NAME, e.g. {', '.join(sorted(XRV_KNOWN_FILES))}.",
                                       WIDTH, subsequent_indent="  ", break_on_hyphens=False)))
    click.echo("  Weights must already be in ~/.torchxrayvision/models_data/; medlens never downloads.")
    click.echo("")
    click.echo(EPILOG_MODELS.rstrip())


def _echo_card(name: str, bundled: Mapping[str, Any]) -> None:
    """Print the model card of bundled model `name`, wrapped for the terminal; an unknown name is a ModelError."""
    if name not in bundled:
        known = ", ".join(sorted(bundled)) or "none"
        raise ModelError(f"no bundled model is called {name!r}; the bundled models are: {known}. "
                         f"`medlens models` lists them with the other model sources.")
    card = _info_get(bundled[name], "card")
    if not card or not Path(card).is_file():
        raise ModelError(f"the model card of {name!r} ({card}) is missing; the medlens install looks incomplete.")
    click.echo(_wrap_markdown(Path(card).read_text(encoding="utf-8")))


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


def parse_options(items: Sequence[str], explain_output: Optional[str] = None,
                  window: Optional[str] = None) -> dict[str, Any]:
    """--option key=value items (and --explain-output, the call's `output`; --window, `sliding_window`) as explain()'s
    options."""
    options = _parse_options(items)
    if window is not None:
        options["sliding_window"] = window
    if explain_output is not None:
        if options.get("output", explain_output) != explain_output:
            raise MethodError(f"--explain-output {explain_output} and --option output={options['output']} disagree; "
                              f"give one of them.")
        options["output"] = explain_output
    return options


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MethodError(f"--option {item!r} must look like key=value (e.g. --option eigen_smooth=true).")
        options[key.strip()] = _parse_value(value)
    return options


def _image_folder_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = image_stem(p.name)
        if stem.startswith("."):  # "...png" would name the folder "..": outside --out; hidden names are made plain
            stem = safe_name(stem)
        base, candidate, n = stem or "image", stem or "image", 2
        while candidate in names:
            candidate, n = f"{base}-{n}", n + 1
        names.append(candidate)
    return names


def load_model_for_cli(source: str, **options: Any) -> Any:
    """`medlens.load_model`, its warnings (a pickled module runs code) printed as one line each, not Python's form."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = medlens.load_model(source, **options)
    for w in caught:
        if issubclass(w.category, UserWarning) and not issubclass(w.category, (DeprecationWarning, FutureWarning)):
            click.echo(f"medlens: warning: {w.message}", err=True)
    return model


@click.command("explain")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", "model_source", required=True, help="A bundled name, a model file, a local HuggingFace folder, torchvision:ARCH, timm:ARCH or monai:NAME (with --weights) or xrv:NAME.")
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
@click.option("--region", type=click.Path(path_type=Path), default=None,
              help="Where the finding is: a YOLO box .txt, a PNG mask or a NIfTI mask; outlined on every overlay, with the "
                   "pointing game and energy in the region in provenance.json. Default: a .txt box file beside the image. "
                   "A segmentation model: the region whose class logits are explained: 'predicted' (the default: the "
                   "model's own mask), a box x0,y0,x1,y1 in input pixels, or a mask file; outlined the same way.")
@click.option("--no-region", is_flag=True, default=False, help="Do not pick up a box file beside the image.")
@click.option("--allow-pickle", is_flag=True, default=False, help="Load a pickled model file (torch.save(model)); loading it runs the code it holds, so only for files you trust.")
@click.option("--formats", default="png,npz", show_default=True, help="Comma-separated: png, npz, nifti, dicom (provenance.json always).")
@click.option("--signed", is_flag=True, default=False,
              help="Draw every map's raw signed values (default: each method as defined, e.g. Grad-CAM's positive part).")
@click.option("--explain-output", default=None,
              help="The score every method explains: logit (default), log-probability or contrast (the logit minus the "
                   "mean of the other classes' logits).")
@click.option("--window", default=None,
              help="A 3-D segmentation model's window D,H,W (e.g. 96,96,96): the volume is explained at its own size, run "
                   "window by window (default: the model's declared patch_size; 'none' for the whole volume at once).")
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
    region: Optional[Path],
    no_region: bool,
    allow_pickle: bool,
    formats: str,
    signed: bool,
    explain_output: Optional[str],
    window: Optional[str],
) -> None:
    """Explain a model's findings on IMAGE... (PNG, JPEG, TIFF, DICOM, NIfTI, or a folder holding one DICOM series).

    Writes OUT/<image>/<method>_<target>.png, panel.png, maps.npz and provenance.json per image.
    """
    # Cheap checks first, so that no work is wasted: output folder, method names and options, image files.
    created = not Path(out_dir).exists()
    out = ensure_writable(out_dir)
    try:
        request = ExplainRequest.build(methods, targets=targets, layer=layer, seed=seed,
                                       options=parse_options(option_items, explain_output, window),
                                       slice_index=slice_index, frame=frame,
                                       formats=formats, signed=signed)
        if not request.methods:
            raise MethodError("--methods is empty; give one or more names, e.g. --methods gradcam,layercam.")
        check_methods(list(request.methods), dict(request.options))
        for p in images:
            if not p.exists():
                raise InputError(f"{p}: no such file. Check the path (relative paths start from {Path.cwd()}).")
        if region is not None and len(images) > 1:
            raise InputError("--region names one region file, so it takes one image; for several images put a box "
                             "file with each image's name beside it (scan.png -> scan.txt).")
        model = _model_on_device(model_source, device, labels=labels, input_size=input_size, channels=channels,
                                 multi_label=multi_label, weights=weights,
                                 allow_pickle=allow_pickle or None)
        plan = plan_for(model, request)
        if is_segmentation(plan):  # --region is the region explained: predicted, a box or a mask file
            plan, chosen_region = segmentation_plan(plan, region_option(region)), None
        else:
            chosen_region = read_region(region) if region is not None else (None if no_region else "auto")
        _explain_each(plan, images, out, chosen_region, describe(model).provenance())
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a run that wrote nothing leaves no empty folder
            out.rmdir()
        raise


def _model_on_device(source: str, device: str, **options: Any) -> Any:
    model = load_model_for_cli(source, **{k: v for k, v in options.items() if v is not None})
    for note in describe(model).notes:  # how labels, size and outputs were read
        click.echo(f"medlens: note: {note}", err=True)
    try:
        if torch.device(device).type == "meta":  # holds no values: every forward pass would fail
            raise RuntimeError("a meta device holds no data")
        return model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise MedlensError(f"cannot use device {device!r} ({exc}); try --device cpu.") from None


def _explain_each(plan: Plan, images: Sequence[Path], out: Path, region: Any, model_source: Any) -> None:
    failures: list[str] = []
    folder_names = _image_folder_names(list(images))
    progress = tqdm(list(zip(images, folder_names)), desc="explaining", unit="image", disable=len(images) < 2, file=sys.stderr)
    for path, folder_name in progress:
        try:
            outcome = explain_file(plan, path, region=region)
            write_outcome(outcome, out / folder_name, model_source=model_source)
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
