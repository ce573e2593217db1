"""`medlens demo`: an offline tour on what the package ships: phantom cases, several methods, overlays and a summary.

Owns the demo run (cases, methods, lesion/marker energy scores), its overlays (matplotlib, Agg) and the one-page summary.
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import click
import torch

import medlens  # noqa: E402
from medlens.core.registry import get_spec  # noqa: E402
from medlens.data.phantom import phantom_2d, shortcut_set  # noqa: E402
from medlens.errors import MedlensError, OutputError  # noqa: E402
from medlens.io.files import atomic_write, ensure_writable, save_figure  # noqa: E402
from medlens.models.zoo import load_bundled  # noqa: E402
from medlens.pipeline import ExplainRequest, explain_batch, plan_for  # noqa: E402
from medlens.training.train import phantom_prepare  # noqa: E402

#: methods the demo tries, in display order; only those the registry lists at run time are used
DEMO_METHODS = (
    "gradcam", "gradcam++", "hirescam", "layercam", "scorecam", "ablationcam",
    "saliency", "inputxgradient", "integratedgradients", "lrp", "occlusion", "rise",
)
#: cheap settings for slow methods (applied only when the method accepts the option)
DEMO_OPTIONS: dict[str, dict[str, Any]] = {
    "integratedgradients": {"n_steps": 32},
    "occlusion": {"window": 8, "stride": 4},
    "rise": {"n_masks": 1000},
}
DEMO_SEED = 2024


def energy_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's positive part that falls inside its mask: sum(relu(m) * mask) / sum(relu(m)).

    maps: (N, *s) float; masks: (N, *s) bool. A map with no positive part scores 0.
    """
    pos = maps.float().clamp_min(0).flatten(1)
    inside = (pos * masks.flatten(1).float()).sum(1)
    total = pos.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def peak_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Whether each map's maximum lies inside its mask (the pointing game), (N,) bool."""
    flat = maps.float().flatten(1)
    idx = flat.argmax(1)
    return masks.flatten(1).gather(1, idx[:, None])[:, 0]


def marker_zone(marker_masks: torch.Tensor, margin: int = 4) -> torch.Tensor:
    """The marker's bounding square grown by `margin` pixels (N, H, W) bool: where 'on the marker' is scored.

    The margin (4 px) is one cell of the phantom models' last feature map (stride 4), the resolution of a CAM.
    """
    m = marker_masks.reshape(marker_masks.shape[0], *marker_masks.shape[-2:]).float()
    grown = torch.nn.functional.max_pool2d(m[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
    out = torch.zeros_like(grown)
    for i in range(grown.shape[0]):
        ys, xs = torch.nonzero(grown[i], as_tuple=True)
        if len(ys):
            out[i, int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1] = True
    return out


def _display(m: torch.Tensor) -> torch.Tensor:
    """For display only: positive part scaled to [0, 1] by its 99.5th percentile."""
    pos = m.float().clamp_min(0)
    hi = torch.quantile(pos.flatten(), 0.995) if pos.numel() else torch.tensor(0.0)
    return (pos / hi).clamp(0, 1) if hi > 0 else pos


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, never a window), imported on first use: it takes a
    second or more, and only the demo's figures need it, not the other commands this module is imported with."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _case_figure(image: torch.Tensor, maps: dict[str, torch.Tensor], contour: torch.Tensor, title: str,
                 scores: dict[str, float], score_name: str, path: Path, contour_color: str = "cyan") -> None:
    cols = 1 + len(maps)
    plt = _pyplot()
    fig, axes = plt.subplots(1, cols, figsize=(2.1 * cols, 2.5))
    axes = [axes] if cols == 1 else list(axes)
    axes[0].imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
    if contour.any():
        axes[0].contour(contour.float().numpy(), [0.5], colors=contour_color, linewidths=0.8)
    axes[0].set_title(title, fontsize=8)
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.imshow(_display(m).numpy(), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        if contour.any():
            ax.contour(contour.float().numpy(), [0.5], colors=contour_color, linewidths=0.6)
        ax.set_title(f"{name}\n{score_name} {scores[name]:.0%}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def _explain_each(model: torch.nn.Module, x: torch.Tensor, names: Sequence[str], target: int, seed: int) -> tuple[dict, dict, dict]:
    """Run each method separately (one failing method does not stop the demo): maps (N, H, W), seconds, errors."""
    maps, seconds, errors = {}, {}, {}
    for name in names:
        info = medlens.method_info(name)
        accepted = set((info.get("options") or {}).keys()) if isinstance(info, dict) or hasattr(info, "get") else set()
        opts = {k: v for k, v in DEMO_OPTIONS.get(name, {}).items() if k in accepted}
        t0 = time.perf_counter()
        try:  # through the pipeline, as every front end: the request checked, then the batch explained
            plan = plan_for(model, ExplainRequest.build([name], targets=[target], seed=seed, options=opts))
            result = explain_batch(plan, x)
            maps[name] = result[name][:, 0].detach().float()
        except Exception as exc:  # a method still in development must not sink the demo; it is reported
            errors[name] = f"{type(exc).__name__}: {exc}"
        seconds[name] = time.perf_counter() - t0
    return maps, seconds, errors


def run_demo(out_dir: Optional[Union[str, Path]] = None, n_cases: int = 6, methods: Optional[Sequence[str]] = None,
             seed: int = DEMO_SEED, echo: bool = False) -> Path:
    """Run the offline demo and return the folder it wrote (overlays, summary.html, summary.png, summary.json)."""
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "medlens-demo"
    try:
        ensure_writable(out)
    except OutputError as exc:
        raise OutputError(f"cannot write the demo's results to {out}: {exc}") from None
    names = _demo_methods(methods)
    say = click.echo if echo else (lambda *_a, **_k: None)
    say(f"medlens demo: {len(names)} methods ({', '.join(names)}) on {n_cases} phantom cases per model ...")
    summary = {"seed": seed, "methods": names, "lesion": _lesion_cases(names, n_cases, seed, out),
               "shortcut": _shortcut_cases(names, n_cases, seed, out)}
    summary["seconds_total"] = time.perf_counter() - started
    _write_summary_png(out, summary)
    _write_summary_html(out, summary)
    summary["seconds_total"] = time.perf_counter() - started
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    say(_text_table(summary))
    say(f"wrote {n_cases + summary['shortcut']['n_cases']} overlay pages, summary.html, summary.png and summary.json "
        f"to {out} in {summary['seconds_total']:.1f} s")
    return out


def _demo_methods(methods: Optional[Sequence[str]]) -> list[str]:
    """The demo's methods: the user's names (all must exist; get_spec says which are close), else the default list
    less what a reduced installation lacks."""
    available = set(medlens.methods())
    wanted = [get_spec(m).name for m in methods] if methods is not None else list(DEMO_METHODS)
    names = [m for m in wanted if m in available]
    if not names:
        raise MedlensError(f"none of the demo's methods {wanted} is registered; registered: {sorted(available)}.")
    return names


def _lesion_cases(names: Sequence[str], n_cases: int, seed: int, out: Path) -> dict[str, Any]:
    """Step 1: phantom-lesion on lesion cases: how much of each map lies inside the true lesion (a page per case)."""
    lesion_model = load_bundled("phantom-lesion")
    lesion_idx = lesion_model.labels.index("lesion")
    cases = phantom_2d(n_cases, size=lesion_model.input_spec.size[-1], seed=seed, positive_rate=1.0)
    x = phantom_prepare(cases.images)
    with torch.no_grad():
        probs = torch.softmax(lesion_model(x), 1)[:, lesion_idx]
    maps, seconds, errors = _explain_each(lesion_model, x, names, lesion_idx, seed)
    masks = cases.lesion_masks[:, 0]
    lesion_energy = {n: energy_inside(m, masks) for n, m in maps.items()}
    lesion_peak = {n: peak_inside(m, masks) for n, m in maps.items()}
    area = masks.flatten(1).float().mean(1)
    for i in range(n_cases):
        _case_figure(cases.images[i, 0], {n: m[i] for n, m in maps.items()}, masks[i],
                     f"lesion case {i + 1}\nP(lesion) {probs[i]:.2f}", {n: float(e[i]) for n, e in lesion_energy.items()},
                     "in lesion", out / f"lesion-case-{i + 1:02d}.png")
    return {
        "model": "phantom-lesion", "n_cases": n_cases, "mean_lesion_area_fraction": float(area.mean()),
        "p_lesion": probs.tolist(),
        "energy_in_lesion": {n: {"mean": float(e.mean()), "per_case": e.tolist()} for n, e in lesion_energy.items()},
        "peak_in_lesion": {n: float(p.float().mean()) for n, p in lesion_peak.items()},
        "seconds": seconds, "errors": errors,
    }


def _shortcut_cases(names: Sequence[str], n_cases: int, seed: int, out: Path) -> dict[str, Any]:
    """Step 2: phantom-shortcut on lesion cases carrying the marker: do the maps land on the marker? Then the same
    model when the marker no longer tracks the class."""
    sc_model = load_bundled("phantom-shortcut")
    sc_idx = sc_model.labels.index("lesion")
    sc_cases = shortcut_set(4 * n_cases, size=sc_model.input_spec.size[-1], seed=seed + 1)
    keep = torch.nonzero(sc_cases.labels == sc_idx).flatten()[: max(1, n_cases // 2)]
    sx = phantom_prepare(sc_cases.images[keep])
    with torch.no_grad():
        sc_probs = torch.softmax(sc_model(sx), 1)[:, sc_idx]
    sc_maps, sc_seconds, sc_errors = _explain_each(sc_model, sx, names, sc_idx, seed)
    zone = marker_zone(sc_cases.marker_masks[keep])
    sc_lesion = sc_cases.lesion_masks[keep][:, 0]
    marker_energy = {n: energy_inside(m, zone) for n, m in sc_maps.items()}
    marker_peak = {n: peak_inside(m, zone) for n, m in sc_maps.items()}
    sc_lesion_energy = {n: energy_inside(m, sc_lesion) for n, m in sc_maps.items()}
    for i in range(len(keep)):
        _case_figure(sc_cases.images[keep[i], 0], {n: m[i] for n, m in sc_maps.items()}, zone[i],
                     f"shortcut case {i + 1}\nP(lesion) {sc_probs[i]:.2f}", {n: float(e[i]) for n, e in marker_energy.items()},
                     "on marker", out / f"shortcut-case-{i + 1:02d}.png", contour_color="lime")
    probe_set = phantom_2d(200, size=sc_model.input_spec.size[-1], seed=seed + 2, marker="random", lesion_contrast=(0.06, 0.1))
    with torch.no_grad():
        pred = sc_model(phantom_prepare(probe_set.images)).argmax(1)
    follows_marker = float((pred == probe_set.has_marker.long()).float().mean())
    follows_label = float((pred == probe_set.labels).float().mean())
    return {
        "model": "phantom-shortcut", "n_cases": int(len(keep)), "marker_zone_area_fraction": float(zone.flatten(1).float().mean()),
        "p_lesion": sc_probs.tolist(),
        "energy_on_marker": {n: {"mean": float(e.mean()), "per_case": e.tolist()} for n, e in marker_energy.items()},
        "peak_on_marker": {n: float(p.float().mean()) for n, p in marker_peak.items()},
        "energy_in_lesion": {n: {"mean": float(e.mean()), "per_case": e.tolist()} for n, e in sc_lesion_energy.items()},
        "decorrelated_marker": {"n": 200, "prediction_follows_marker": follows_marker, "accuracy": follows_label},
        "seconds": sc_seconds, "errors": sc_errors,
    }


def _text_table(s: dict[str, Any]) -> str:
    rows = ["energy = share of the map's positive part inside the region; peak = share of cases whose maximum is inside",
            f"{'method':<22}{'energy in lesion':>17}{'peak in lesion':>15}{'energy on marker':>17}{'peak on marker':>15}"]
    for n in s["methods"]:
        le = s["lesion"]["energy_in_lesion"].get(n, {}).get("mean", math.nan)
        lp = s["lesion"]["peak_in_lesion"].get(n, math.nan)
        me = s["shortcut"]["energy_on_marker"].get(n, {}).get("mean", math.nan)
        mp = s["shortcut"]["peak_on_marker"].get(n, math.nan)
        rows.append(f"{n:<22}{le:>17.1%}{lp:>15.0%}{me:>17.1%}{mp:>15.0%}")
    rows.append(f"{'(uniform map)':<22}{s['lesion']['mean_lesion_area_fraction']:>17.1%}{'':>15}"
                f"{s['shortcut']['marker_zone_area_fraction']:>17.1%}")
    errors = {**s["lesion"]["errors"], **s["shortcut"]["errors"]}
    rows += [f"{n}: failed ({e})" for n, e in errors.items()]
    return "\n".join(rows)


def _write_summary_png(out: Path, s: dict[str, Any]) -> None:
    names = [n for n in s["methods"] if n in s["lesion"]["energy_in_lesion"] or n in s["shortcut"]["energy_on_marker"]]
    le = [s["lesion"]["energy_in_lesion"].get(n, {}).get("mean", 0.0) for n in names]
    me = [s["shortcut"]["energy_on_marker"].get(n, {}).get("mean", 0.0) for n in names]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 + 0.38 * max(len(names), 3)))
    for ax, vals, ref, title, color in (
        (axes[0], le, s["lesion"]["mean_lesion_area_fraction"], "phantom-lesion: map energy inside the true lesion", "tab:blue"),
        (axes[1], me, s["shortcut"]["marker_zone_area_fraction"], "phantom-shortcut: map energy on the corner marker", "tab:red"),
    ):
        ax.barh(range(len(names)), vals, color=color)
        ax.axvline(ref, color="k", ls="--", lw=1, label="uniform map (area share)")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    dm = s["shortcut"]["decorrelated_marker"]
    fig.suptitle(f"medlens demo (seed {s['seed']}): with the marker independent of the class, phantom-shortcut follows the "
                 f"marker in {dm['prediction_follows_marker']:.0%} of cases (accuracy {dm['accuracy']:.0%})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "summary.png", dpi=90)
    plt.close(fig)


def _write_summary_html(out: Path, s: dict[str, Any]) -> None:
    esc = html.escape
    le, sc = s["lesion"], s["shortcut"]
    rows = []
    for n in s["methods"]:
        a = le["energy_in_lesion"].get(n)
        b = sc["energy_on_marker"].get(n)
        c = sc["energy_in_lesion"].get(n)
        err = le["errors"].get(n) or sc["errors"].get(n)
        pa, pb = le["peak_in_lesion"].get(n), sc["peak_on_marker"].get(n)
        cells = [f"{a['mean']:.1%}" if a else "-", f"{pa:.0%}" if pa is not None else "-",
                 f"{b['mean']:.1%}" if b else "-", f"{pb:.0%}" if pb is not None else "-", f"{c['mean']:.1%}" if c else "-",
                 f"{le['seconds'].get(n, 0) + sc['seconds'].get(n, 0):.2f} s"]
        rows.append(f"<tr><td><code>{esc(n)}</code></td>" + "".join(f"<td>{v}</td>" for v in cells)
                    + f"<td>{esc(err) if err else ''}</td></tr>")
    lesion_imgs = "".join(f'<img src="lesion-case-{i + 1:02d}.png" alt="lesion case {i + 1}"><br>' for i in range(le["n_cases"]))
    sc_imgs = "".join(f'<img src="shortcut-case-{i + 1:02d}.png" alt="shortcut case {i + 1}"><br>' for i in range(sc["n_cases"]))
    dm = sc["decorrelated_marker"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>medlens demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:1em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,td:last-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>medlens demo</h1>
<p>Synthetic MRI-like phantoms with exact ground truth (seed {s['seed']}), explained with {len(s['methods'])} methods from
the registry. Scores are the share of each map's positive part that falls inside a region (a uniform map scores the
region's area share); "peak" is the share of cases whose map maximum lies inside the region. The marker region is
the tag's square grown by 4 pixels, one cell of the models' last feature map. Run time {s['seconds_total']:.1f} s.</p>
<img src="summary.png" alt="summary chart">
<h2>Scores per method</h2>
<table><tr><th>method</th><th>phantom-lesion: energy in lesion (mean of {le['n_cases']})</th><th>peak in lesion</th>
<th>phantom-shortcut: energy on marker (mean of {sc['n_cases']})</th><th>peak on marker</th><th>phantom-shortcut: energy in lesion</th>
<th>time</th><th>note</th></tr>
{''.join(rows)}
<tr><td>(uniform map)</td><td>{le['mean_lesion_area_fraction']:.1%}</td><td></td><td>{sc['marker_zone_area_fraction']:.1%}</td><td></td><td></td><td></td><td></td></tr>
</table>
<h2>The shortcut model</h2>
<p><code>phantom-shortcut</code> was trained on phantoms where a corner tag appears exactly on the lesion cases and the
lesions are faint. Its explanations should land on the tag (outlined in green). On 200 phantoms where the tag is
independent of the class its prediction follows the tag in {dm['prediction_follows_marker']:.0%} of cases and its
accuracy is {dm['accuracy']:.0%}: it learned the tag, not the lesion.</p>
{sc_imgs}
<h2>The lesion model</h2><p>True lesion outlined in cyan; the title of each map gives its energy inside the lesion.</p>
{lesion_imgs}
<p>Models: <code>phantom-lesion</code>, <code>phantom-shortcut</code> (bundled with medlens; see their model cards).
For research and teaching only, not for diagnosis.</p></body></html>
"""
    atomic_write(out / "summary.html", page)


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the overlays and summary (default: ./medlens-demo).")
@click.option("--cases", "n_cases", type=click.IntRange(1, 64), default=6, show_default=True, help="Phantom cases per model.")
@click.option("--methods", default=None, help="Comma-separated method names (default: the demo's list, as registered).")
@click.option("--seed", type=int, default=DEMO_SEED, show_default=True)
def demo_command(out_dir: Optional[str], n_cases: int, methods: Optional[str], seed: int) -> None:
    """Run offline on bundled phantom models: overlays and a summary of where each method's map lands."""
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    out = run_demo(out_dir, n_cases=n_cases, methods=names, seed=seed, echo=True)
    click.echo(f"open {out / 'summary.html'}")


COMMANDS = [demo_command]
