"""Generate tests/data/reference_maps.npz: small maps of every registered method on the bundled models.

Made once from the pre-refactor code (commit d20a213, `PYTHONPATH=/tmp/baseline/src python
tests/data/make_reference_maps.py`); tests/test_reference_maps.py checks that today's code gives the same maps.
The inputs are stored in the file too, so the test does not depend on how they were made. Each model is keyed
by the sha256 of its weights file, so the test can find the same weights under a later name.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

import medlens
from medlens.models import zoo

OUT = Path(__file__).resolve().parent / "reference_maps.npz"

#: model name -> (input side, batch): small inputs keep the file and the test small
MODELS = {"phantom-lesion": (32, 2), "phantom-shortcut": (32, 2), "brain-tumor-mri": (32, 2)}

#: (case name, methods, options, targets): every registered method with small options; LRP with every preset
#: composite; SmoothGrad over each base; CAM smoothing options on one CAM; all classes as targets on two methods.
SMALL = {
    "n_steps": 6, "n_samples": 3, "n_masks": 24, "num_samples": 24, "window": 8, "stride": 8, "n_segments": 8,
}
CAMS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam", "scorecam",
        "ablationcam"]
GRADIENTS = ["saliency", "inputxgradient", "guidedbackprop", "guidedgradcam"]
LRP_COMPOSITES = ["epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "depth"]
SMOOTH_BASES = ["saliency", "inputxgradient", "guidedbackprop", "integratedgradients", "lrp"]


def cases() -> list[tuple[str, list[str], dict, object]]:
    out: list[tuple[str, list[str], dict, object]] = []
    out.append(("cam", ["cam"], {}, None))  # refused on models whose head is not GAP + linear: the message is kept
    out.append(("cams", CAMS, {}, None))
    out.append(("gradients", GRADIENTS, {}, None))
    out.append(("cams_all_targets", ["gradcam", "eigengradcam"], {}, "all"))
    out.append(("gradients_all_targets", ["saliency", "guidedbackprop"], {}, "all"))
    out.append(("cam_eigen_smooth", ["gradcam", "layercam"], {"eigen_smooth": True}, None))
    out.append(("cam_aug_smooth", ["gradcam"], {"aug_smooth": True}, None))
    out.append(("ig_zero", ["integratedgradients"], {"n_steps": SMALL["n_steps"], "batch_size": 5}, None))
    out.append(("ig_blur", ["integratedgradients"], {"n_steps": SMALL["n_steps"], "baseline": "blur"}, None))
    for base in SMOOTH_BASES:
        out.append((f"smoothgrad_{base}", ["smoothgrad"], {"n_samples": SMALL["n_samples"], "base": base}, None))
    for composite in LRP_COMPOSITES:
        out.append((f"lrp_{composite}", ["lrp"], {"composite": composite}, None))
    out.append(("occlusion", ["occlusion"], {"window": SMALL["window"], "stride": SMALL["stride"]}, None))
    out.append(("occlusion_blur", ["occlusion"], {"window": SMALL["window"], "stride": 4, "baseline": "blur"}, None))
    out.append(("rise", ["rise"], {"n_masks": SMALL["n_masks"], "batch_size": 10}, None))
    out.append(("lime", ["lime"], {"num_samples": SMALL["num_samples"], "n_segments": SMALL["n_segments"]}, None))
    out.append(("kernelshap", ["kernelshap"], {"num_samples": SMALL["num_samples"], "n_segments": SMALL["n_segments"]},
                None))
    return out


def _targets_arg(targets: object, model: torch.nn.Module) -> object:
    if targets == "all":
        return list(range(len(model.labels)))
    return targets


def make_input(name: str, side: int, batch: int) -> torch.Tensor:
    """Smooth blobs on a gradient background, seeded by the model's name, on the scale the model expects."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, side)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    images = []
    for _ in range(batch):
        img = 0.2 * (xx + 1) + 0.05 * torch.randn(side, side, generator=gen)
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=gen) * 1.4 - 0.7).tolist()
            r = 0.1 + 0.25 * torch.rand(1, generator=gen).item()
            img = img + torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img = (img - img.min()) / (img.max() - img.min())
        images.append(img)
    x = torch.stack(images)[:, None]
    spec = zoo.bundled_models()[name]["input_spec"]
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((x - mean) / std).float()


def weights_sha256(name: str) -> str:
    return hashlib.sha256(Path(zoo.bundled_models()[name]["weights"]).read_bytes()).hexdigest()


def main() -> None:
    torch.manual_seed(0)
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, dict] = {"models": {}, "cases": {}}
    all_cases = cases()
    for model_name, (side, batch) in MODELS.items():
        model = medlens.load_model(model_name)
        x = make_input(model_name, side, batch)
        arrays[f"{model_name}/input"] = x.numpy()
        index["models"][model_name] = {"weights_sha256": weights_sha256(model_name), "side": side, "batch": batch}
        index["errors"] = index.get("errors", {})
        for case, methods, options, targets in all_cases:
            try:
                result = medlens.explain(model, x, methods=methods, targets=_targets_arg(targets, model), seed=7,
                                         **options)
            except medlens.MedlensError as error:  # a refusal is part of the reference: its message must not change
                index["errors"][f"{model_name}/{case}"] = f"{type(error).__name__}: {error}"
                continue
            for method in methods:
                arrays[f"{model_name}/{case}/{method}"] = result[method].numpy().astype(np.float32)
            arrays[f"{model_name}/{case}/targets"] = result.targets.numpy().astype(np.int64)
            print(model_name, case, file=sys.stderr)
    index["cases"] = {case: {"methods": methods, "options": options, "targets": targets}
                      for case, methods, options, targets in all_cases}
    index["generated_with"] = {"medlens": medlens.__version__, "torch": torch.__version__,
                               "commit": "d20a213 (pre-refactor)"}
    arrays["index.json"] = np.frombuffer(json.dumps(index, sort_keys=True).encode(), dtype=np.uint8)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)", file=sys.stderr)


if __name__ == "__main__":
    main()
