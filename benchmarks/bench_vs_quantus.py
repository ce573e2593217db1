"""medlens's evaluation metrics against Quantus 0.6 (the reference library for them): same maps, same
parameters, values compared where the definitions agree, speed as interleaved medians on one thread.

    pip install quantus==0.6.0 cachetools   # only for this script (`pip install medlens[quantus]`)
    python benchmarks/bench_vs_quantus.py --data ../shared/data/brain-tumor-figshare --slices 8 --repeats 3

Inputs: `--slices` slices of the figshare *test* split (never trained on), prepared for the bundled
brain-tumor-mri model; maps: integrated gradients (exactly 0, hence tied, only where the scan is black),
max-sensitivity re-explains with Grad-CAM; exact ties in the maps are broken in raster order first (see
`_without_ties`). Each (metric, library) is timed `--repeats` times, the two libraries alternating, and the median
is reported with the ratio Quantus time / medlens time (above 1: medlens faster), in wall-clock time and in the
process's CPU time (on a shared machine the CPU-time ratio is the steadier one: waiting for a core is not
counted). Each side is called once untimed before the timed calls (medlens's first call on a model builds
the folded copy it reuses: docs/benchmarks.md gives that cost). Deletion, insertion and completeness get the
model's logits on the unperturbed slices from the explanation's result (`logits=`, as `medlens evaluate` passes
them): medlens then runs no pass of the unperturbed slices, which Quantus runs for completeness and not for the
curves; those rows also time medlens without them (the column "without the logits", interleaved too). The load average is printed at the start, after
each metric and at the end. `--short`: 4 slices, 2 repeats (a quick look: with 4 slices completeness scores 5
inputs and runs the model as given, below the 8 inputs from which the folded copy is built). Prints a markdown
table (docs/benchmarks.md keeps one).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def _inputs(data: str, n: int):
    import medlens
    from medlens.data.figshare import box_to_mask, scan_folder

    model = medlens.load_model("brain-tumor-mri")
    test = scan_folder(data, splits=["test"])
    picked = test[:: max(1, len(test) // n)][:n]
    x = torch.cat([medlens.load_input(str(s.image_path), model) for s in picked])
    masks = torch.stack([box_to_mask(s.box, tuple(x.shape[2:])) for s in picked])
    res = medlens.explain(model, x, methods="integratedgradients", seed=0)
    return model, x, masks, _without_ties(res["integratedgradients"]), res.targets, res.logits


def _without_ties(maps: torch.Tensor) -> torch.Tensor:
    """The maps with their exact ties broken in raster order, as medlens's stable sort breaks them: integrated
    gradients is exactly 0 wherever the scan is black (1-30 % of these slices), and Quantus's unstable argsort orders
    those pixels differently, so the curves would differ by tie order alone (3e-2 and 1e-1 on these slices). Each 0
    becomes -tiny * (1 + index / P), tiny a thousandth of the image's smallest nonzero |value|: both libraries then
    rank every pixel the same way, and the maps change by less than that."""
    flat = maps.flatten(2).clone()
    P = flat.shape[2]
    for b in range(flat.shape[0]):
        for t in range(flat.shape[1]):
            row = flat[b, t]
            nonzero = row[row != 0].abs()
            tiny = float(nonzero.min()) * 1e-3 if nonzero.numel() else 1e-12
            ramp = 1 + torch.arange(P, dtype=row.dtype) / P
            flat[b, t] = torch.where(row == 0, -tiny * ramp, row)
    return flat.view_as(maps)


def _cases(model, x, masks, maps, targets, logits, steps: int, samples: int, radius: float):
    """(name, medlens call, Quantus call, compare(medlens result, Quantus result) -> str, medlens call without the
    explanation's logits or None). Deletion, insertion and completeness get the model's logits on the slices from
    the explanation's result, as `medlens evaluate` passes them (Quantus has no way to take them)."""
    import quantus

    import medlens
    import medlens.evaluation.faithfulness as F
    import medlens.evaluation.localisation as L
    import medlens.evaluation.trust as TR
    from medlens.evaluation.noise import uniform_per_image

    B = x.shape[0]
    P = int(np.prod(x.shape[2:]))
    xn, an, yn, sn = x.numpy(), maps.numpy(), targets[:, 0].numpy(), masks[:, None].numpy()
    common = dict(model=model, x_batch=xn, y_batch=yn, a_batch=an, device="cpu", batch_size=B, channel_first=True)
    quiet = dict(disable_warnings=True, display_progressbar=False)
    blurred, _ = F.make_baseline(x, "blur")

    def put_back(arr, indices, original=None, **_):  # Quantus pixel flipping run backwards: insertion
        out = arr.copy()
        np.put_along_axis(out, indices, np.take_along_axis(original, indices, axis=1), axis=1)
        return out

    # max-sensitivity: both libraries get the same noisy copies (uniform in +-radius * span, drawn as medlens draws
    # them: each image's from its own generator, seeded from the seed, 0, and the image's values)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))
    u = uniform_per_image(x, samples, 0)
    noisy = [x + (u[k] * 2 - 1) * radius * span for k in range(samples)]
    feed = {"i": 0}

    def next_copy(arr, indices, indexed_axes=None, **_):
        out = noisy[feed["i"] % samples].reshape(B, -1).numpy()
        feed["i"] += 1
        return out

    def gradcam(model, inputs, targets, **_):
        t = torch.as_tensor(targets).long().view(-1, 1)
        return medlens.explain(model, torch.as_tensor(inputs), methods="gradcam", targets=t.tolist())["gradcam"].numpy()

    cams = gradcam(model, x, targets[:, 0])  # max-sensitivity compares Grad-CAM maps with Grad-CAM maps

    def curves_gap(ours, theirs):
        return f"max |curve gap| {np.abs(ours.curves[:, 0, 1:].numpy() - np.asarray(theirs)).max():.1e}"

    q_del = quantus.PixelFlipping(features_in_step=P // steps, perturb_baseline=0.0, normalise=False, abs=False, **quiet)
    q_ins = quantus.PixelFlipping(features_in_step=P // steps, perturb_func=put_back, normalise=False, abs=False,
                                  perturb_func_kwargs={"original": xn.reshape(B, -1)}, **quiet)
    q_road = quantus.ROAD(percentages=list(range(10, 100, 10)), noise=0.01, normalise=False, abs=False, **quiet)
    q_sens = quantus.MaxSensitivity(nr_samples=samples, perturb_func=next_copy, normalise=False, abs=False, **quiet)
    q_point = quantus.PointingGame(**quiet)
    q_sparse = quantus.Sparseness(normalise=False, abs=True, **quiet)
    q_compl = quantus.Completeness(perturb_baseline=0.0, normalise=False, abs=False, **quiet)

    def sens_reset(fn):
        def run():
            feed["i"] = 0
            return fn()
        return run

    return [
        ("deletion (20 steps, zero fill)",
         lambda: F.deletion(model, x, maps, targets, steps=steps, baseline="zero", logits=logits),
         lambda: q_del(**common, softmax=True), curves_gap,
         lambda: F.deletion(model, x, maps, targets, steps=steps, baseline="zero")),
        ("insertion (20 steps, from a blur)",
         lambda: F.insertion(model, x, maps, targets, steps=steps, baseline="blur", logits=logits),
         lambda: q_ins(**{**common, "x_batch": blurred.numpy()}, softmax=True), curves_gap,
         lambda: F.insertion(model, x, maps, targets, steps=steps, baseline="blur")),
        ("ROAD MoRF (10..90 %)",
         lambda: F.road_morf(model, x, maps, targets),
         lambda: q_road(**common, softmax=True),
         lambda o, t: "score vs accuracy (definitions differ)", None),
        (f"max-sensitivity (Grad-CAM, {samples} samples)",
         lambda: TR.max_sensitivity(model, x, targets, "gradcam", radius=radius, samples=samples,
                                    original=torch.as_tensor(cams)),
         sens_reset(lambda: q_sens(**{**common, "a_batch": cams}, explain_func=gradcam, softmax=False)),
         lambda o, t: f"max |gap| {np.abs(o[:, 0].numpy() - np.asarray(t)).max():.1e}", None),
        ("pointing game (hit inside)",
         lambda: L.pointing_game(maps, masks, tolerance=0),
         lambda: q_point(**common, s_batch=sn),
         lambda o, t: f"{int((o[:, 0].numpy() == np.asarray(t, dtype=float)).sum())}/{B} equal", None),
        ("sparseness (Gini of |map|)",
         lambda: TR.sparseness(maps),
         lambda: q_sparse(**common),
         lambda o, t: f"max |gap| {np.abs(o[:, 0].numpy() - np.asarray(t)).max():.1e} (Quantus adds 1e-7)", None),
        ("completeness (zero baseline)",
         lambda: TR.completeness(model, x, maps, targets, baseline="zero", logits=logits),
         lambda: q_compl(**common, softmax=False),
         lambda o, t: "tolerance vs exact equality (definitions differ)",
         lambda: TR.completeness(model, x, maps, targets, baseline="zero")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/brain-tumor-figshare")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated substrings of the metric names to run")
    parser.add_argument("--short", action="store_true", help="a quick look: 4 slices, 2 repeats")
    args = parser.parse_args()
    if args.short:
        args.slices, args.repeats = 4, 2
    torch.set_num_threads(1)
    model, x, masks, maps, targets, logits = _inputs(args.data, args.slices)
    print(f"{x.shape[0]} slices {tuple(x.shape[2:])}, 1 thread, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}")
    print("| metric | medlens (s) | Quantus (s) | speed-up | CPU-time speed-up | without the logits: speed-up "
          "(wall / CPU) | values |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, ours, theirs, compare, plain in _cases(model, x, masks, maps, targets, logits, steps=20, samples=8,
                                                     radius=0.02):
        if args.only and not any(k in name for k in args.only.split(",")):
            continue
        sides = {"m": ours, "q": theirs, **({"p": plain} if plain is not None else {})}
        for fn in sides.values():  # one untimed call each: medlens builds its folded copy once per model and shape
            fn()
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        out: dict[str, object] = {}
        for _ in range(args.repeats):
            for key, fn in sides.items():  # interleaved: medlens, Quantus, medlens without the logits
                t, c = time.perf_counter(), time.process_time()
                out[key] = fn()
                times[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
        wall = {k: statistics.median(v) for k, v in times.items()}
        proc = {k: statistics.median(v) for k, v in cpu.items()}
        without = f"{wall['q'] / wall['p']:.2f}x / {proc['q'] / proc['p']:.2f}x" if "p" in sides else "-"
        print(f"| {name} | {wall['m']:.3f} | {wall['q']:.3f} | {wall['q'] / wall['m']:.2f}x "
              f"| {proc['q'] / proc['m']:.2f}x | {without} | {compare(out['m'], out['q'])} (load {os.getloadavg()[0]:.1f}) |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
