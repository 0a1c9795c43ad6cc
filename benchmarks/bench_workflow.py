"""Images per hour per stage of the whole Snakemake DAG, and its scaling from --cores 1 to --cores 2 (issue 6).

For each model (default: ``tiny-vit`` and ``vit-s16-random``, both RANDOM weights, short side 448, so
28 x 28 tokens; ViT-S/16 is 12 layers x 6 heads) and each core count, the workflow runs on
``synthetic-shapes:N`` (sharded, ``--per-shard`` images per shard) in a fresh folder with a fresh
store, so nothing is cached. Each rule has a Snakemake ``benchmark:`` file (seconds and peak memory per
job); a stage's images per hour are its images over the seconds of its jobs summed (one job slot: a
process start, model build and every image of a shard), and over the seconds the stages log themselves
("made ... (N items in S s)": model build and images, without the process start and imports); the
run's images per hour come from its wall time. Jobs of one stage overlap under --cores 2, so their summed seconds grow when they share the
cores; the wall time shows what the parallel shards gain. Core-seconds per image (CPU time, which
sharing the cores does not inflate) are what the stages cost against the floor of one backbone forward
per image (benchmarks/bench_storage.py), as the kernel counts them: per stage, its jobs' own processes
(each `lds` stage logs its process's CPU time as it exits, imports and model build included), and
for the whole run every process (getrusage of the children: Snakemake, the jobs); the difference is what
runs outside the stages' jobs (Snakemake, the rules without a stage). Snakemake's benchmark ``cpu_time``
is not used: it samples a job's CPU every 30 s after its first 30, so it misses a job's last seconds.
The load average before and after each run is reported: other work on the machine slows every number.

    python benchmarks/bench_workflow.py                        # 12 images, 4 shards, both models
    lds bench workflow -- --images 8 --models tiny-vit --cores 1,2,4
    lds bench workflow -- --dataset folder:PHOTOS --images 240 --per-shard 60 --models dinov2-s14-imgfocus --cores 2
    lds bench workflow -- ... --set extract.precision=bfloat16 --set solve.layer_diagnostics=false   # any config key
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATASET = "shapes"
STAGES = ("preprocess", "extract", "solve", "decode", "evaluate")
MADE = re.compile(r"^(\S+): made \S.* \((\d+) items in ([0-9.]+)s[;)]", re.MULTILINE)
DONE = re.compile(r"^lds (\S+): done in [0-9.]+ s, ([0-9.]+) core-s$", re.MULTILINE)


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def workflow_config(images: int, per_shard: int, model: str, solver: str, steps: int, dataset: str | None) -> dict:
    """``dataset``: a dataset spec whose first ``images`` images are used (default: synthetic-shapes:IMAGES)."""
    data = {"spec": dataset, "max_images": images} if dataset else {"spec": f"synthetic-shapes:{images}"}
    return {
        "store": "store",
        "results": "results",
        "datasets": {DATASET: data | {"images_per_shard": per_shard}},
        "models": [model],
        "solve": {"solver": solver, "steps": steps, "graph": "kq"},  # one run per model: its stages' seconds
        "decode": {"clusters": 6, "instances": True},
    }


def with_settings(config: dict, settings: list[str]) -> dict:
    """``config`` with each ``section.key=value`` of ``settings`` set (the value read as YAML: true, 0.5, [kq, vv])."""
    for setting in settings:
        path, separator, value = setting.partition("=")
        if not separator or not path:
            sys.exit(f"--set {setting}: expected section.key=value")
        *sections, key = path.split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = yaml.safe_load(value)
    return config


def stage_seconds(results: Path, model: str) -> dict[str, list[float]]:
    """Seconds of every job of each stage, from the rules' benchmark TSVs."""
    root = results / "benchmarks" / DATASET / model
    seconds: dict[str, list[float]] = {}
    for path in sorted(root.rglob("*.tsv")):
        with path.open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        seconds.setdefault(path.stem, []).extend(float(row["s"]) for row in rows)
    return seconds


def logged_seconds(results: Path) -> dict[str, dict[str, float]]:
    """Per stage, summed over its jobs' logs: the seconds its "made" lines report ("s": model build and
    images) and the core-seconds of its jobs' processes as the kernel counted them ("core_s": imports,
    model build, images, what follows, every thread; each `lds` stage logs them as it exits)."""
    found: dict[str, dict[str, float]] = {}
    for log in (results / "logs").rglob("*.log"):
        text = log.read_text()
        for stage, _, spent in MADE.findall(text):
            found.setdefault(stage, {"s": 0.0, "core_s": 0.0})["s"] += float(spent)
        for stage, cores in DONE.findall(text):
            found.setdefault(stage, {"s": 0.0, "core_s": 0.0})["core_s"] += float(cores)
    return found


def run(images: int, per_shard: int, model: str, cores: int, solver: str, steps: int, keep: Path | None,
        dataset: str | None = None, settings: list[str] = ()) -> dict:
    """One fresh workflow run (``settings``: ``section.key=value`` config values); its wall time and every
    stage's job seconds."""
    with tempfile.TemporaryDirectory(prefix=f"lds-bench-{model}-{cores}-") as scratch:
        workdir = keep / f"{model}-cores{cores}" if keep else Path(scratch)
        if (workdir / "results").exists():
            sys.exit(f"{workdir} holds an earlier run; give --keep an empty folder")
        (workdir / "config").mkdir(parents=True, exist_ok=True)
        (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(with_settings(workflow_config(images, per_shard, model, solver, steps, dataset), settings)))
        command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", str(cores)]
        before = load()
        started, used = time.perf_counter(), children_cpu_seconds()
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"LDS_CACHE": str(workdir / "store")})
        wall, used = time.perf_counter() - started, children_cpu_seconds() - used
        if done.returncode != 0:
            sys.exit(f"snakemake --cores {cores} for {model} failed:\n{done.stderr[-3000:]}")
        return {"model": model, "cores": cores, "images": images, "settings": list(settings), "wall_s": wall, "cpu_s": used, "load_before": before,
                "load_after": load(), "stages": stage_seconds(workdir / "results", model),
                "logged": logged_seconds(workdir / "results")}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process and the descendants it waited for: the
    whole run's, Snakemake and every job (the jobs' ``cpu_time`` in the benchmark files misses up to the
    last 30 s of each job, which Snakemake samples every 30 s after the first 30)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def per_hour(images: int, seconds: float) -> str:
    return f"{images * 3600 / seconds:,.0f}" if seconds > 0 else "-"


def markdown(runs: list[dict], cores: list[int]) -> str:
    """One table: per model, a row per stage (job and in-stage seconds summed, images per hour, its jobs'
    core-seconds per image) and the whole run (core-seconds per image of every process of the run, and
    the part outside the stages' jobs), all CPU times as the kernel counted them."""
    columns = ("jobs: s, images/h", "in stage: s, images/h", "core-s/image")
    header = ["model", "stage"] + [f"{what}, --cores {c}" for c in cores for what in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by = {(r["model"], r["cores"]): r for r in runs}
    for model in dict.fromkeys(r["model"] for r in runs):
        first = by[model, cores[0]]
        images = first["images"]
        names = set(first["stages"]) | set(first["logged"])  # lds report logs its CPU but has no benchmark file
        stages = [s for s in STAGES if s in names] + sorted(names - set(STAGES))
        for stage in stages:
            cells = []
            for c in cores:
                logged = by[model, c]["logged"].get(stage, {"s": 0.0, "core_s": 0.0})
                for seconds in (sum(by[model, c]["stages"].get(stage, [])), logged["s"]):
                    cells.append(f"{seconds:.1f} s, {per_hour(images, seconds)}")
                cells.append(f"{logged['core_s'] / images:.2f}")
            jobs = len(first["stages"].get(stage, []))
            label = f"{stage} ({jobs} job{'s' * (jobs > 1)})" if jobs else stage
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
        cells = []
        for c in cores:
            jobs = sum(logged["core_s"] for logged in by[model, c]["logged"].values())
            cells += [f"{by[model, c]['wall_s']:.1f} s wall, {per_hour(images, by[model, c]['wall_s'])}", "",
                      f"**{by[model, c]['cpu_s'] / images:.2f}** ({(by[model, c]['cpu_s'] - jobs) / images:.2f} outside the stages' jobs)"]
        speedups = ", ".join(f"--cores {c}: {first['wall_s'] / by[model, c]['wall_s']:.2f}x" for c in cores[1:])
        lines.append(f"| {model} | **whole run** (speed-up {speedups}) | " + " | ".join(cells) + " |")
    loads = "; ".join(f"{r['model']} --cores {r['cores']}: {r['load_before']} -> {r['load_after']}" for r in runs)
    settings = " ".join(f"`{setting}`" for setting in runs[0]["settings"]) or "none"
    return "\n".join(lines) + f"\n\nSettings beyond the exact solver on kq, K = 6 and proposals: {settings}.\n" \
        f"Load average (1 / 5 / 15 min) before -> after each run: {loads}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12, help="synthetic-shapes images, or the first N of --dataset")
    parser.add_argument("--dataset", default=None, help="a dataset spec (e.g. folder:PATH) instead of synthetic-shapes")
    parser.add_argument("--per-shard", type=int, default=3, help="images per shard")
    parser.add_argument("--models", default="tiny-vit,vit-s16-random", help="comma-separated `lds models` names")
    parser.add_argument("--cores", default="1,2", help="comma-separated --cores values; speed-ups are against the first")
    parser.add_argument("--solver", choices=["exact", "adam"], default="exact")
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps")
    parser.add_argument("--keep", type=Path, default=None, help="run in DIR/<model>-cores<N> and keep it (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path("results/bench/workflow.md"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config value (YAML), e.g. extract.precision=bfloat16; repeatable")
    args = parser.parse_args()
    cores = [int(c) for c in args.cores.split(",")]
    runs = []
    for model in args.models.split(","):
        for c in cores:
            runs.append(run(args.images, args.per_shard, model, c, args.solver, args.steps, args.keep, args.dataset, args.settings))
            print(f"{model} --cores {c}: {runs[-1]['wall_s']:.1f} s (load {runs[-1]['load_after']})", file=sys.stderr)
    table = markdown(runs, cores)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
