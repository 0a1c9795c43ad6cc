"""Quality on real photographs (issue 13): the workflow on coco-mini and voc20-from-coco, one markdown table.

Each run is a Snakemake run of this repository's Snakefile in its own folder under ``--work`` (its
config written to ``<run>/config/config.yaml``), all sharing one store (``--store``), so a second
benchmark run only recomputes what changed. Runs, all with ``dinov2-s14-imgfocus`` (the pretrained
DINOv2 ViT-S/14 that installs offline):

- ``coco``: coco-mini, exact solver, instance proposals (extended, the default) and the TokenCut and
  MaskCut baselines; ``coco-paper-proposals``: the same solves decoded with the paper's proposals only.
- ``voc-image``: voc20-from-coco, per-image exact solves: X-Y R², oracle and matched mIoU.
- ``voc-dataset``: voc20-from-coco at the dataset level (METHOD.md §1-2: centre crop, layers <= 32x32,
  heads concatenated, ``lds solve-dataset``), one K-Means with K = 21 over all images, Hungarian mIoU.
- ``solvers-exact`` / ``solvers-adam``: the first ``--adam-images`` coco-mini photos with each solver
  (Adam: the paper's 1000 steps, conv-net parameterisation).

Seconds per image are those the stages logged when they made their artifacts (the store's journal, any
run), summed over the run's preprocess, extract, solve (or baseline / solve-dataset, cluster), decode
and evaluate, over its images: a cached artifact keeps the seconds it took when it was made.

    lds bench quality                                   # ../shared/data; over an hour on 2 cores the first time (docs/quality.md)
    lds bench quality -- --runs coco,solvers-exact,solvers-adam --adam-images 24
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "dinov2-s14-imgfocus"
INSTANCE_COLUMNS = ("box_ap50", "box_ap", "box_ar100", "mask_ap50", "mask_ap", "mask_ar100")
# The paper's Table 8 (COCO val2017, class-agnostic, percent): masks per image, then INSTANCE_COLUMNS.
PAPER_ROWS = (
    ("paper Table 8: Ours (Stable Diffusion 1.4), COCO val2017", 13, (4.0, 1.9, 11.2, 4.0, 1.5, 8.2)),
    ("paper Table 8: MaskCut (its DINO backbone), COCO val2017", 3, (6.0, 2.9, 8.1, 4.9, 2.2, 6.9)),
)


def run_configs(coco: str, voc: str, store: str, adam_images: int) -> dict[str, dict]:
    """Every run's Snakemake config, by run name."""
    coco_data = {"coco-mini": {"spec": f"coco:{coco}:train2017", "images_per_shard": 42}}
    voc_data = {"voc20": {"spec": f"voc2012:{voc}:train", "images_per_shard": 34}}
    subset = {"coco-mini-first": {"spec": f"coco:{coco}:train2017", "images_per_shard": -(-adam_images // 2), "max_images": adam_images}}
    base = {"store": store, "results": "results", "models": [MODEL]}  # per-image runs on kq graphs only (solve.graph)
    return {
        "coco": {**base, "datasets": coco_data, "solve": {"solver": "exact", "graph": "kq"}, "decode": {"instances": True}, "baselines": ["tokencut", "maskcut"]},
        "coco-paper-proposals": {**base, "datasets": coco_data, "solve": {"solver": "exact", "graph": "kq"}, "decode": {"instances": True, "extended_proposals": False}},
        "voc-image": {**base, "datasets": voc_data, "solve": {"solver": "exact", "graph": "kq"}, "decode": {"instances": True}},
        "voc-dataset": {
            **base, "datasets": voc_data, "preprocess": {"mode": "center-crop", "size": 320},
            # keep: all leaves the raw features for benchmarks/semantic_reference.py
            "extract": {"max_resolution": 32, "concat_heads": True, "keep": "all"}, "solve": {"level": "dataset"},
            # affordable on 2 CPU cores (docs/solver.md: Dataset-level solver); the paper's 100 epochs at lr 1e-2 take hours
            "solve_dataset": {"graph": "vv", "layers": "block08,block09,block10,block11", "partitions": 2, "epochs": 20, "lr": 0.1, "ema": 0.95},
            "decode": {"instances": False, "dataset_clusters": 21},
        },
        "solvers-exact": {**base, "datasets": subset, "solve": {"solver": "exact", "graph": "kq"}, "decode": {"instances": True}},
        "solvers-adam": {**base, "datasets": subset, "solve": {"solver": "adam", "graph": "kq"}, "decode": {"instances": True}},
    }


def run_workflow(name: str, config: dict, work: Path, cores: int) -> float:
    """Run the Snakefile with ``config`` in ``work/name``; its wall seconds."""
    folder = work / name
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(folder), "--cores", str(cores)]
    print(f"quality: {name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(folder / "snakemake.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    if done.returncode:
        sys.exit(f"quality: run {name} failed; see {folder / 'snakemake.log'}")
    return time.perf_counter() - started


def published_seconds(store: Path, stage: str, key: str) -> float:
    """The seconds the journal says making artifact ``stage/key`` took (0 when no run recorded it)."""
    for path in sorted(store.glob(f".journal/*/{stage}.{key}.-.published.*.json")):
        return float(json.loads(path.read_text()).get("seconds", 0.0))
    return 0.0


def manifest_keys(run_folder: Path, stages: tuple[str, ...] | None = None) -> set[tuple[str, str]]:
    """(stage, key) of every manifest under a run's folder (shards, cluster, evaluate), of ``stages`` only when given."""
    keys = set()
    for path in run_folder.rglob("*.json"):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and {"stage", "key"} <= record.keys() and (stages is None or record["stage"] in stages):
            keys.add((record["stage"], record["key"]))
    return keys


def run_metrics(work: Path, name: str, store: Path) -> dict[str, dict]:
    """metrics.json of every model run (and baseline run) of one benchmark run, with its seconds per
    image; a baseline's run also counts the preprocess and extract it shares with the method's run."""
    found = {}
    for path in sorted((work / name / "results").glob("*/*/metrics.json")):
        metrics = json.loads(path.read_text())
        keys = manifest_keys(path.parent)
        if "+" in path.parent.name:
            keys |= manifest_keys(path.parent.with_name(path.parent.name.split("+")[0]), ("preprocess", "extract"))
        metrics["seconds_per_image"] = sum(published_seconds(store, *key) for key in keys) / max(metrics["images"], 1)
        found[path.parent.name] = metrics
    return found


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def instance_row(label: str, metrics: dict) -> str:
    cells = [percent(metrics.get(column)) for column in INSTANCE_COLUMNS]
    return f"| {label} | {metrics.get('proposals_per_image', 0):.1f} | {' | '.join(cells)} | {metrics['seconds_per_image']:.2f} |"


def tables(results: dict[str, dict[str, dict]], adam_images: int) -> str:
    """The markdown tables of every run that finished."""
    lines = []
    coco, paper_only = results.get("coco", {}), results.get("coco-paper-proposals", {})
    if coco or paper_only:
        images = next(iter((coco or paper_only).values()))["images"]
        lines += [
            f"**Class-agnostic instances, coco-mini ({images} COCO train2017 photos), percent**; pycocotools on the original annotations at original resolution",
            "",
            "| run | masks/img | box AP50 | box AP | box AR100 | mask AP50 | mask AP | mask AR100 | s/img |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        labels = {MODEL: f"lds, {MODEL}, exact, extended proposals", f"{MODEL}+tokencut": f"lds TokenCut baseline, {MODEL}",
                  f"{MODEL}+maskcut": f"lds MaskCut baseline, {MODEL}"}
        for run, metrics in coco.items():
            lines.append(instance_row(labels.get(run, run), metrics))
        for run, metrics in paper_only.items():
            lines.append(instance_row(f"lds, {run}, exact, the paper's proposals only", metrics))
        for label, masks, values in PAPER_ROWS:
            lines.append(f"| {label} | {masks} | {' | '.join(f'{v:.1f}' for v in values)} | - |")
        lines.append("")
    voc_rows = [(name, metrics) for name in ("voc-image", "voc-dataset") for metrics in results.get(name, {}).values()]
    if voc_rows:
        lines += [
            f"**Regions, voc20-from-coco ({voc_rows[0][1]['images']} COCO photos, VOC-20 classes)**; mIoU in percent",
            "",
            "| run | X-Y R² | oracle mIoU | matched mIoU (per image) | semantic mIoU, dataset level (K = 21) | s/img |",
            "|---|---|---|---|---|---|",
        ]
        names = {"voc-image": f"lds, {MODEL}, exact, per image", "voc-dataset": f"lds, {MODEL}, dataset level (solve-dataset)"}
        for name, metrics in voc_rows:
            semantic = percent(metrics.get("semantic_miou")) if name == "voc-dataset" else "-"
            lines.append(f"| {names[name]} | {metrics['xy_regression_r2']:.3f} | {percent(metrics.get('oracle_miou'))} | "
                         f"{percent(metrics.get('matched_miou'))} | {semantic} | {metrics['seconds_per_image']:.2f} |")
        lines.append("")
    solver_rows = [(solver, metrics) for solver in ("exact", "adam") for metrics in results.get(f"solvers-{solver}", {}).values()]
    if solver_rows:
        lines += [
            f"**Solvers, the first {adam_images} coco-mini photos**; percent, Adam: 1000 steps, lr 1e-3, conv net",
            "",
            "| solver | masks/img | box AP50 | box AP | box AR100 | mask AP50 | mask AP | mask AR100 | s/img |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [instance_row(solver, metrics) for solver, metrics in solver_rows]
        lines += ["", "| solver | X-Y R² |", "|---|---|"] + [f"| {solver} | {metrics['xy_regression_r2']:.3f} |" for solver, metrics in solver_rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coco", default=str(REPO.parent / "shared" / "data" / "coco-mini"), help="coco-mini root (annotations/, train2017/)")
    parser.add_argument("--voc", default=str(REPO.parent / "shared" / "data" / "voc20-from-coco"), help="voc20-from-coco root (VOC2012/)")
    parser.add_argument("--store", default=os.environ.get("LDS_CACHE", str(REPO / "cache")), help="artifact store shared by every run")
    parser.add_argument("--work", type=Path, default=REPO / "results" / "bench-quality", help="folder of the runs and the table")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--adam-images", type=int, default=12, help="coco-mini photos of the exact-vs-Adam comparison")
    parser.add_argument("--runs", default="coco,coco-paper-proposals,voc-image,voc-dataset,solvers-exact,solvers-adam", help="comma-separated runs")
    args = parser.parse_args()
    for root in (args.coco, args.voc):
        if not Path(root).is_dir():
            sys.exit(f"quality: {root} is not a folder; pass --coco / --voc (the dev data lives in ../shared/data)")
    store = str(Path(args.store).resolve()) if "://" not in args.store else args.store
    configs = run_configs(str(Path(args.coco).resolve()), str(Path(args.voc).resolve()), store, args.adam_images)
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = set(names) - set(configs)
    if unknown:
        sys.exit(f"quality: unknown runs {', '.join(sorted(unknown))}; choose from {', '.join(configs)}")
    results, walls = {}, {}
    for name in names:
        walls[name] = run_workflow(name, configs[name], args.work, args.cores)
        results[name] = run_metrics(args.work, name, Path(store))
    table = tables(results, args.adam_images)
    footer = "Wall seconds of this benchmark's runs: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items())
    text = f"{table}\n{footer} (load average now {' / '.join(f'{v:.1f}' for v in os.getloadavg())}).\n"
    (args.work / "quality.md").write_text(text)
    (args.work / "quality.json").write_text(json.dumps(results, indent=2, default=str))
    print(text)
    print(f"quality: {args.work / 'quality.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
