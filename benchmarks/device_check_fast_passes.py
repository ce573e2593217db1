"""Device check (CUDA) of the forward-only fast paths, as run on 30 Nov 2026 (figures in docs/benchmarks.md).

That run used the first version (an fx trace); since then medlens uses neither the folded copy nor the
precomputed stem on a GPU, so on CUDA this script now mostly shows "the model as given".
Usage (on a machine with CUDA): PYTHONPATH=src python benchmarks/device_check_fast_passes.py
"""
from __future__ import annotations

import time

import torch
import torchvision

import medlens
from medlens import inference
from medlens.families.masked_stem import build_masked_stem
from medlens.inference import FastForward, fast_forward
from medlens.spatial import upsample_to


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-30))


def timed(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    assert torch.cuda.is_available(), "needs CUDA"
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(0))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=14).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cpu = medlens.explain(model, x, "scorecam", targets=[3, 5])
    import copy

    gpu_model, gx = copy.deepcopy(model).to(dev), x.to(dev)
    gpu = medlens.explain(gpu_model, gx, "scorecam", targets=[3, 5])
    notes = gpu.provenance["methods"]["scorecam"]
    print("scorecam notes on cuda:", notes["forward_passes"], "|", notes["first_convolution_precomputed"])
    print("cudnn.allow_tf32 =", torch.backends.cudnn.allow_tf32, "(TF32 convolutions round to about 1e-3)")
    print("scorecam cuda vs cpu correlation:", [round(corr(gpu["scorecam"][i, 0].cpu(), cpu["scorecam"][i, 0]), 6) for i in range(2)])

    torch.backends.cudnn.allow_tf32 = False  # full float32: the folded trace must now agree and be used
    tf32_off = medlens.explain(gpu_model, gx, "scorecam", targets=[3, 5])
    notes = tf32_off.provenance["methods"]["scorecam"]
    print("without TF32:", notes["forward_passes"], "|", notes["first_convolution_precomputed"])
    print("  scorecam cuda vs cpu max |diff| / max:", float((tf32_off["scorecam"].cpu() - cpu["scorecam"]).abs().max() / cpu["scorecam"].abs().max()))
    fast = fast_forward(gpu_model, gx)
    with torch.inference_mode():
        print("folded trace vs model on cuda, relative gap:", inference.relative_gap(fast(gx), gpu_model(gx)))

    model64 = torchvision.models.resnet18(weights=None, num_classes=4).double().eval().to(dev)
    x64 = torch.randn(1, 3, 64, 64, dtype=torch.float64, device=dev)
    stem, why = build_masked_stem(FastForward(module=model64), x64, (4, 4))
    w = torch.rand(5, 16, dtype=torch.float64, device=dev)
    masked = x64 * upsample_to(w.view(1, 5, 4, 4), (64, 64)).transpose(0, 1)
    with torch.inference_mode():
        err = float((stem.outputs(w) - model64.conv1(masked)).abs().max())
        err_logits = float((stem.logits(w) - model64(masked)).abs().max())
    print("stem float64 on cuda: max error of conv1 outputs", err, "of logits", err_logits)

    for method, options in (("occlusion", {"window": 32, "stride": 16}), ("rise", {"n_masks": 512})):
        a = medlens.explain(gpu_model, gx, method, targets=3, seed=0, **options)[method]
        b = medlens.explain(model, x, method, targets=3, seed=0, **options)[method] if method == "occlusion" else None
        line = f"{method} cuda notes: {medlens.explain(gpu_model, gx[:1], method, targets=3, seed=0, **options).provenance['methods'][method]['forward_passes']}"
        if b is not None:
            line += f"; cuda vs cpu max |diff| / max: {float((a.cpu() - b).abs().max() / b.abs().max()):.1e}"
        print(line)

    library = inference.LIBRARY_PACKAGES
    for label, packages in (("folded trace + stem", library), ("model as given", ())):
        inference.LIBRARY_PACKAGES = packages
        medlens.explain(gpu_model, gx[:1], "scorecam", targets=3)
        t = timed(lambda: medlens.explain(gpu_model, gx[:1], "scorecam", targets=3))
        print(f"scorecam on cuda, 1 image, 1 target, {label}: {t * 1000:.1f} ms")
    inference.LIBRARY_PACKAGES = library


if __name__ == "__main__":
    main()
