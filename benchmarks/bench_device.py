"""The same stages on two devices (default: the CPU and CUDA): agreement and wall seconds.

It checks the GPU paths of ``lds extract``, ``lds solve`` and ``lds solve-dataset`` against the CPU ones:
each device gets its own store (the device is not part of an artifact's key), the same commands run in
both, and the stored arrays are compared.

Cases (RANDOM weights, not pretrained):
- ``vit``: ViT-S/16 architecture (``vit-s16-random``) on ``synthetic-shapes`` at 448x448 (28x28 tokens):
  per-image extract, the exact and the Adam (conv net) solvers, dataset-mode extract (heads
  concatenated) and ``solve-dataset``;
- ``sd``: Stable Diffusion 1.5 UNet + VAE architecture (``sd15-random``) on one 512x512 image,
  ``--timesteps 2``: extract, exact and Adam solvers.

Agreement: ``attention_max_rel_diff`` is max |a - b| / max |a| over every stored Q/K/V (float16);
``subspace`` is the mean cos² of the principal angles between the two devices' X_ortho (1 = same
subspace, per image, then averaged); ``final_loss`` is each device's last Adam loss. Seconds are given
as "wall / in stage": the command's wall time (process start, imports and model build included) and the
seconds the stage logs for its images ("made ... (N items in S s)": model build and images).

    python benchmarks/bench_device.py                      # cpu vs cuda, needs a GPU
    lds bench device -- --devices cpu,cpu --images 2 --adam-steps 20 --sd-steps 2   # a dry run here
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_solver import subspace_similarity  # benchmarks/ is on sys.path when a script in it runs
from bench_workflow import MADE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def lds(store: Path, manifest: Path, *args: object) -> str:
    """Run one `lds` stage into ``store``; return "wall seconds / seconds the stage logs itself"."""
    command = [sys.executable, "-m", "stages", *map(str, args), "--store", str(store), "--manifest", str(manifest)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout}\n{done.stderr}")
    made = MADE.search(done.stderr)
    return f"{time.perf_counter() - start:.2f} / {made.group(3) if made else '-'}"


def artifact(store: Path, manifest: Path):
    from pipeline.store import ArtifactRef, Store

    record = json.loads(manifest.read_text())
    return Store(store).open(ArtifactRef(record["stage"], record["key"]))


def attention_difference(a, b) -> float:
    """max |a - b| / max |a| over every q, k and v array of two extract artifacts."""
    worst = 0.0
    for item in a.attrs["items"]:
        for layer in a[f"items/{item}/layers"].group_keys():
            for name in ("q", "k", "v"):
                x = a[f"items/{item}/layers/{layer}/{name}"][...].astype(np.float32)
                y = b[f"items/{item}/layers/{layer}/{name}"][...].astype(np.float32)
                worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12)))
    return worst


def subspace(a, b) -> float:
    """Mean over images of the mean cos² of the principal angles between two X_ortho."""
    values = []
    for item in a.attrs["items"]:
        x, y = (np.asarray(s[f"items/{item}/X_ortho"][...], dtype=np.float64) for s in (a, b))
        values.append(subspace_similarity(x.reshape(len(x), -1).T, y.reshape(len(y), -1).T))
    return round(float(np.mean(values)), 4)


def final_loss(solved) -> float:
    return round(float(np.mean([solved[f"items/{item}/losses"][-1] for item in solved.attrs["items"]])), 4)


def run_case(case: str, devices: list[str], args: argparse.Namespace, work: Path) -> list[dict]:
    if case == "vit":
        prepare = ["--dataset", f"synthetic-shapes:{args.images}", "--size", 448, "--mode", "center-crop", "--multiple", 16]
        model, extra, adam_steps = ["--model", "vit-s16-random"], [], args.adam_steps
    else:
        prepare = ["--dataset", "synthetic-shapes:1", "--size", 512, "--mode", "center-crop", "--multiple", 64]
        model, extra, adam_steps = ["--model", "sd15-random"], ["--timesteps", 2], args.sd_steps
    rows, made = [], {}
    for index, device in enumerate(devices):
        store, out = work / f"store-{index}", work / f"{case}-{index}"
        seconds = {"preprocess": lds(store, out / "pre.json", "preprocess", *prepare, "--shard-size", 64)}
        seconds["extract"] = lds(store, out / "ext.json", "extract", "--input", out / "pre.json", *model, *extra, "--device", device)
        seconds["solve_exact"] = lds(store, out / "exact.json", "solve", "--input", out / "ext.json", "--solver", "exact", "--device", device)
        seconds[f"solve_adam_{adam_steps}_steps"] = lds(store, out / "adam.json", "solve", "--input", out / "ext.json",
                                                        "--steps", adam_steps, "--device", device)
        if case == "vit":
            seconds["extract_dataset_mode"] = lds(store, out / "dext.json", "extract", "--input", out / "pre.json", *model,
                                                  "--max-resolution", 32, "--concat-heads", "--device", device)
            seconds[f"solve_dataset_{args.epochs}_epochs"] = lds(
                store, out / "dsolve.json", "solve-dataset", "--input", out / "dext.json", "--channels", 20,
                "--epochs", args.epochs, "--device", device)
        made[device if device not in made else f"{device}#{index}"] = {
            name: artifact(store, out / f"{name}.json") for name in ("ext", "exact", "adam", "dsolve") if (out / f"{name}.json").exists()}
        rows.append({"case": case, "device": device, "seconds_wall_and_in_stage": seconds})
        print(json.dumps(rows[-1]), flush=True)
    first, second = made.values()
    agreement = {
        "case": case, "devices": list(made),
        "attention_max_rel_diff": round(attention_difference(first["ext"], second["ext"]), 5),
        "subspace_exact": subspace(first["exact"], second["exact"]),
        "subspace_adam": subspace(first["adam"], second["adam"]),
        "final_loss_adam": [final_loss(first["adam"]), final_loss(second["adam"])],
    }
    if "dsolve" in first:
        agreement["subspace_solve_dataset"] = subspace(first["dsolve"], second["dsolve"])
    print(json.dumps(agreement), flush=True)
    return rows + [agreement]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cpu,cuda", help="two devices, comma-separated (cpu, cuda, cuda:N)")
    parser.add_argument("--case", choices=["vit", "sd"], action="append", help="default: both")
    parser.add_argument("--images", type=int, default=4, help="images of the vit case")
    parser.add_argument("--adam-steps", type=int, default=500, help="Adam steps of the vit case")
    parser.add_argument("--sd-steps", type=int, default=50, help="Adam steps of the sd case")
    parser.add_argument("--epochs", type=int, default=20, help="solve-dataset epochs")
    parser.add_argument("--out", type=Path, default=Path("results/bench/device.json"))
    args = parser.parse_args()
    devices = args.devices.split(",")
    if len(devices) != 2:
        raise SystemExit("--devices: give exactly two, e.g. cpu,cuda")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lds-bench-device-") as work:
        for case in args.case or ["vit", "sd"]:
            rows += run_case(case, devices, args, Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
