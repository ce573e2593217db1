"""Device check (CUDA) of the forward-only fast paths, as run on 30 Nov 2026 (figures in docs/benchmarks.md).

That run used the first version (an fx trace, with the folded model and the stem also called directly);
since then medlens uses neither on a GPU, so this script now checks that the GPU path runs the model as
given, agrees with the CPU, and what the switch `medlens.accel.fast_forward.ENABLED` costs there.
Usage (on a machine with CUDA): PYTHONPATH=src python benchmarks/device_check_fast_passes.py
"""
from __future__ import annotations

import time

import torch
import torchvision

import medlens
from medlens.accel import fast_forward as inference


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

    torch.backends.cudnn.allow_tf32 = False  # full float32
    tf32_off = medlens.explain(gpu_model, gx, "scorecam", targets=[3, 5])
    print("without TF32:", tf32_off.provenance["methods"]["scorecam"]["forward_passes"])
    print("  scorecam cuda vs cpu max |diff| / max:", float((tf32_off["scorecam"].cpu() - cpu["scorecam"]).abs().max() / cpu["scorecam"].abs().max()))

    for method, options in (("occlusion", {"window": 32, "stride": 16}), ("rise", {"n_masks": 512})):
        a = medlens.explain(gpu_model, gx, method, targets=3, seed=0, **options)[method]
        b = medlens.explain(model, x, method, targets=3, seed=0, **options)[method] if method == "occlusion" else None
        line = f"{method} cuda notes: {medlens.explain(gpu_model, gx[:1], method, targets=3, seed=0, **options).provenance['methods'][method]['forward_passes']}"
        if b is not None:
            line += f"; cuda vs cpu max |diff| / max: {float((a.cpu() - b).abs().max() / b.abs().max()):.1e}"
        print(line)

    for label, enabled in (("fast passes enabled", True), ("medlens.accel.fast_forward.ENABLED = False", False)):
        inference.ENABLED = enabled
        medlens.explain(gpu_model, gx[:1], "scorecam", targets=3)
        t = timed(lambda: medlens.explain(gpu_model, gx[:1], "scorecam", targets=3))
        print(f"scorecam on cuda, 1 image, 1 target, {label}: {t * 1000:.1f} ms")
    inference.ENABLED = True


if __name__ == "__main__":
    main()
