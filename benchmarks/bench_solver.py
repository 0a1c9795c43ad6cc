"""Seconds per image, peak memory and agreement of the Adam and exact solvers (issue 4).

Cases (all on this machine's CPU unless --device says otherwise):
- ``vit-s16``: Q/K/V extracted from a ViT-S/16 architecture with RANDOM weights (not pretrained) on
  scikit-image's coffee photo at 448x448 (28x28 tokens, 12 layers x 6 heads);
- ``vit-planted`` and ``sd-planted``: synthetic Q/K with a planted segmentation, laid out like ViT-S/16 at
  448 (28x28, 12 layers x 6 heads) and like Stable Diffusion 1.x at 512 (64/32/16/8 grids, 8 heads,
  16 attention layers: 5, 5, 5, 1 per resolution; head dims 40/80/160/160).

Each (case, solver) runs in a fresh subprocess so its peak RSS is its own. Adam runs ``--steps`` steps and
its time is also given per 1000 steps (extrapolated when fewer were run). The subspace similarity is the
mean squared cosine of the principal angles between the two solvers' m-dimensional subspaces (1 = same);
for planted cases, planted_recovery_* is the same measure between the planted regions' indicators and each
solver's subspace (1 = every region indicator lies in it).

    python benchmarks/bench_solver.py                 # all cases, Adam 1000 steps on ViT, 20 on SD
    python benchmarks/bench_solver.py --case vit-s16 --steps 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "vit-s16": {"layout": "vit", "source": "ViT-S/16 architecture, RANDOM weights (not pretrained), coffee photo 448x448"},
    "vit-planted": {"layout": "vit", "source": "synthetic planted segmentation, ViT-S/16 layout at 448"},
    "sd-planted": {"layout": "sd", "source": "synthetic planted segmentation, Stable Diffusion 1.x layout at 512"},
}
SD_LAYOUT = [(64, 5, 40), (32, 5, 80), (16, 5, 160), (8, 1, 160)]  # (grid, attention layers, head dim), 8 heads


def planted_regions(layout: str, seed: int = 0) -> np.ndarray:
    """The planted segmentation (8 smooth regions) at the layout's finest grid."""
    from skimage.transform import resize

    field = resize(np.random.default_rng(seed).normal(size=(8, 8, 8)), (64, 64, 8), order=3)
    finest = 28 if layout == "vit" else 64
    return resize(field.argmax(-1), (finest, finest), order=0, preserve_range=True, anti_aliasing=False).astype(int)


def planted_layers(layout: str, seed: int = 0):
    """Q/K/V whose attention follows ``planted_regions`` plus noise."""
    from skimage.transform import resize

    from pipeline.extract.core import LayerAttention

    regions = planted_regions(layout, seed)
    rng = np.random.default_rng(seed + 1)
    specs = [(28, 12, 64)] if layout == "vit" else SD_LAYOUT
    heads = 6 if layout == "vit" else 8
    layers = []
    for grid, count, dim in specs:
        onehot = np.eye(8)[resize(regions, (grid, grid), order=0, preserve_range=True, anti_aliasing=False).astype(int)]
        for index in range(count):
            projection = rng.normal(size=(heads, 8, dim)) / np.sqrt(8)
            signal = 3.0 * np.einsum("yxc,hcd->hyxd", onehot, projection)
            q = signal + rng.normal(size=signal.shape)
            k = signal + rng.normal(size=signal.shape)
            layers.append(LayerAttention(f"g{grid}-{index:02d}", q.astype(np.float16), k.astype(np.float16),
                                         k.astype(np.float16), 1 / np.sqrt(dim)))
    return layers


def vit_s16_layers():
    import skimage.data

    from pipeline.extract.core import extract_attention, image_tensor
    from pipeline.models import get_spec
    from pipeline.models.build import build_model
    from pipeline.data.preprocess import resize_image

    spec = get_spec("vit-s16-random")
    rgb, _ = resize_image(skimage.data.coffee(), None, 448, "center-crop", spec.patch_size)
    return extract_attention(build_model(spec), image_tensor(rgb, spec.mean, spec.std), spec.patch_size)


def run_one(case: str, solver: str, steps: int, channels: int, device: str) -> dict:
    """In this process: build the inputs, time one solve, report peak RSS."""
    import torch

    from pipeline.solve.per_image import AttentionBuffer, ExactOperator, resolve_device, solve_adam, solve_exact
    from pipeline.solve.params import SolverParams

    layers = vit_s16_layers() if case == "vit-s16" else planted_layers(CASES[case]["layout"])
    on = resolve_device(device)
    params = SolverParams(channels=channels, steps=steps, lr=1e-3, device=device)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if solver == "exact":
        u, _ = solve_exact(ExactOperator.from_layers(layers, params.graphs, on), params)
    else:
        u = solve_adam(AttentionBuffer.from_layers([layers], params, on), params).u
    if on == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(f"/tmp/bench_solver_{case}_{solver}.npy", u)
    return {"case": case, "solver": solver, "seconds": seconds, "steps": steps if solver == "adam" else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_inputs_mib": rss_inputs, "device": on,
            "graphs": sum(layer.q.shape[0] for layer in layers), "tokens": max(l.grid[0] * l.grid[1] for l in layers)}


def subspace_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cos² of the principal angles between the column spaces of a and b (tokens x m)."""
    from scipy.linalg import subspace_angles

    return float(np.mean(np.cos(subspace_angles(a, b)) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), action="append", help="default: all")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default 1000 for ViT layouts, 20 for SD)")
    parser.add_argument("--channels", type=int, default=15)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/bench/solver.json"))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "SOLVER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args.steps, args.channels, args.device)))
        return
    rows = []
    for case in args.case or list(CASES):
        steps = args.steps or (20 if CASES[case]["layout"] == "sd" else 1000)
        results = {}
        for solver in ("exact", "adam"):
            command = [sys.executable, __file__, "--child", case, solver, "--steps", str(steps),
                       "--channels", str(args.channels), "--device", args.device]
            results[solver] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        exact, adam = results["exact"], results["adam"]
        per_1000 = adam["seconds"] * 1000 / steps
        u_exact, u_adam = (np.load(f"/tmp/bench_solver_{case}_{s}.npy") for s in ("exact", "adam"))
        row = {
            "case": case, "inputs": CASES[case]["source"], "graphs": exact["graphs"], "tokens": exact["tokens"],
            "device": exact["device"], "exact_seconds": round(exact["seconds"], 3),
            "exact_peak_rss_mib": round(exact["peak_rss_mib"]), "adam_steps": steps,
            "adam_seconds": round(adam["seconds"], 2), "adam_seconds_per_1000_steps": round(per_1000, 1),
            "adam_peak_rss_mib": round(adam["peak_rss_mib"]), "speedup_vs_1000_adam_steps": round(per_1000 / exact["seconds"], 1),
            "subspace_similarity_exact_vs_adam": round(subspace_similarity(u_exact.reshape(len(u_exact), -1).T, u_adam.reshape(len(u_adam), -1).T), 3),
        }
        if case != "vit-s16":  # how much of the planted regions' indicator subspace each solver holds
            regions = planted_regions(CASES[case]["layout"]).ravel()
            truth = np.stack([regions == r for r in np.unique(regions)], axis=1).astype(float)
            for name, u in (("exact", u_exact), ("adam", u_adam)):
                row[f"planted_recovery_{name}"] = round(subspace_similarity(u.reshape(len(u), -1).T, truth), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
