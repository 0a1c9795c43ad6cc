"""Seconds per image and peak memory of `lds extract` on CPU, with RANDOM weights (issue 3). Not run in CI.

Cases, each in a fresh subprocess so that its peak RSS is its own:
- ``vit-s16``: timm ViT-S/16 architecture (``vit-s16-random``), scikit-image's coffee photo, short side 448
  (448 x 672, 28 x 42 tokens, 12 layers x 6 heads);
- ``hf-vit-s16``: the same architecture as a transformers ViTModel built from config, same image;
- ``sd15``: Stable Diffusion 1.5's UNet + VAE + CLIP text encoder built from config (``sd15-random``), coffee
  centre-cropped to 512 x 512 (latent 64 x 64; self-attention at 64, 32, 16 and 8), ``--timesteps`` timesteps.

Reported: model build time, wall seconds per image (and per timestep for SD; the first image of a fresh
process) and the process's CPU seconds for it with the machine's load average (wall time grows when other
work shares the cores), peak RSS of the process (weights included), RSS after the build, the peak of numpy
allocations during extraction (tracemalloc: the stored arrays), and the float16 bytes stored per image.

    python benchmarks/bench_extract.py                       # all cases, SD with 5 timesteps
    python benchmarks/bench_extract.py --case sd15 --timesteps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "vit-s16": "timm ViT-S/16 architecture, RANDOM weights (not pretrained), 448 x 672",
    "hf-vit-s16": "transformers ViTModel, ViT-S/16 architecture, RANDOM weights (not pretrained), 448 x 672",
    "sd15": "Stable Diffusion 1.5 UNet + VAE + text encoder architecture, RANDOM weights (not pretrained), 512 x 512",
}
VIT_S16 = {"model_type": "vit", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
           "intermediate_size": 1536, "patch_size": 16, "image_size": 224}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spec_and_image(case: str):
    import skimage.data

    from pipeline.models import ModelSpec, get_spec
    from pipeline.data.preprocess import resize_image

    if case == "hf-vit-s16":
        spec = ModelSpec("hf-vit-s16-random", "", False, CASES[case], 16, 448, family="hf", config=VIT_S16)
    else:
        spec = get_spec("sd15-random" if case == "sd15" else "vit-s16-random")
    mode = spec.preprocess_mode or "short-side"
    rgb, _ = resize_image(skimage.data.coffee(), None, spec.image_size, mode, spec.patch_size)
    return spec, rgb


def run_one(case: str, timesteps: int) -> dict:
    """In this process: build the model, time one image's extraction, report memory."""
    import torch

    from pipeline.extract.core import extract_attention, image_tensor
    from pipeline.models.build import build_model

    spec, rgb = spec_and_image(case)
    start = time.perf_counter()
    model = build_model(spec)
    build_seconds = time.perf_counter() - start
    rss_built = rss_mib()
    image = image_tensor(rgb, spec.mean, spec.std)
    tracemalloc.start()
    start, cpu = time.perf_counter(), cpu_seconds()
    if spec.family == "diffusers":
        from pipeline.extract.diffusion import extract_attention_sd, item_generator, sample_timesteps

        generator = item_generator(0, "coffee")
        layers = extract_attention_sd(model, image, sample_timesteps(timesteps, 250, generator), generator)
    elif spec.family == "hf":
        from pipeline.extract.hf import extract_attention_hf

        layers = extract_attention_hf(model, image)
    else:
        layers = extract_attention(model, image, spec.patch_size)
    stored = [getattr(layer, p).astype(np.float16, copy=False) for layer in layers for p in "qkv"]
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    numpy_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    grids = sorted({"x".join(map(str, layer.grid)) for layer in layers}, key=lambda g: -int(g.split("x")[0]))
    return {
        "case": case, "weights": "random (NOT pretrained)", "description": CASES[case],
        "image": list(rgb.shape[:2]), "threads": torch.get_num_threads(), "layers": len(layers), "grids": grids,
        "timesteps": timesteps if spec.family == "diffusers" else None,
        "build_seconds": round(build_seconds, 2), "seconds_per_image": round(seconds, 2),
        "seconds_per_timestep": round(seconds / timesteps, 2) if spec.family == "diffusers" else None,
        "cpu_seconds_per_image": round(cpu, 2), "load_average": round(os.getloadavg()[0], 1),
        "peak_rss_mib": round(rss_mib()), "rss_after_build_mib": round(rss_built),
        "numpy_peak_mib": round(numpy_peak, 1), "stored_float16_mib": round(sum(a.nbytes for a in stored) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), action="append", help="Repeatable; default: all.")
    parser.add_argument("--timesteps", type=int, default=5, help="Stable Diffusion timesteps per image.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.timesteps)))
        return
    for case in args.case or list(CASES):
        command = [sys.executable, __file__, "--one", case, "--timesteps", str(args.timesteps)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            print(json.dumps({"case": case, "error": result.stderr.strip().splitlines()[-1:]}))
            continue
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
