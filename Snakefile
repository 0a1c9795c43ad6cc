# lds workflow: preprocess -> extract -> solve -> decode -> evaluate, per dataset x model, sharded.
# Each rule calls one `lds` stage; the stage finds its artifact in the content-addressed store when
# nothing relevant changed, so re-running a rule is cheap. Snakemake tracks the small JSON manifests.
import os
import sys
import time

from snakemake.utils import validate

from pipeline.data import list_images, num_shards
from pipeline.models import get_spec

configfile: "config/config.yaml"
validate(config, os.path.join(workflow.basedir, "config", "schema.yaml"))

STORE = os.environ.get("LDS_CACHE", config["store"])
# Every stage this workflow run starts files its journal records (computed, reused, failed) under one
# run name, which `lds summary` reads; cluster jobs inherit it with the environment.
os.environ.setdefault("LDS_RUN", time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}")
RESULTS = config["results"]
LDS = f'"{sys.executable}" -m stages'
RUN = RESULTS + "/{dataset}/{model}"
SHARD = RUN + "/shard-{shard}"
BENCH = RESULTS + "/benchmarks/{dataset}/{model}"  # Snakemake's benchmark: TSVs (seconds, peak memory) per job
DECODE = config["decode"]
SOLVE = config["solve"]
THREADS = config["threads"]
# GPU stages: `lds extract` and `lds solve` / `lds solve-dataset` ask for one GPU when the config sends them to CUDA.
GPU = {"gpu": 1} if SOLVE["device"] == "cuda" else {}
EXTRACT_GPU = {"gpu": 1} if config["extract"]["device"] == "cuda" else {}

wildcard_constraints:
    dataset="[^/]+",
    model="[^/]+",
    shard="[0-9]+",

# A model's result folder: its name with '/' as '--' (hf:facebook/dino-vits16 -> hf:facebook--dino-vits16).
MODELS = {model.replace("/", "--"): model for model in config["models"]}


def model_spec(wildcards):
    """The registry entry of the model a job's `model` wildcard (a result folder name) stands for."""
    return get_spec(MODELS[wildcards.model])


IMAGES = {name: len(list_images(d["spec"])) for name, d in config["datasets"].items()}
SHARDS = {name: num_shards(IMAGES[name], d["images_per_shard"]) for name, d in config["datasets"].items()}


def mem_mb(vit: int, diffusion: int | None = None):
    """A mem_mb resource: ``vit`` MB (Stable Diffusion models: ``diffusion`` MB), doubled on each retry."""

    def resource(wildcards, attempt: int) -> int:
        large = diffusion is not None and model_spec(wildcards).family == "diffusers"
        return (diffusion if large else vit) * 2 ** (attempt - 1)

    return resource


def extract_options() -> str:
    """`lds extract` options from the config's `extract` section."""
    options = config["extract"]
    line = f"--seed {options['seed']} --dtype {options['dtype']} --timesteps {options['timesteps']} --max-timestep {options['max_timestep']}"
    if options["max_resolution"]:
        line += f" --max-resolution {options['max_resolution']}"
    return line + (" --concat-heads" if options["concat_heads"] else "") + f" --device {options['device']}"


def shard_manifests(wildcards, stage="decode"):
    count = SHARDS[wildcards.dataset]
    return expand(SHARD + f"/{stage}.json", shard=range(count), allow_missing=True)


def evaluate_inputs(wildcards):
    """Every shard's decode manifest, and the dataset-level clusters when the config asks for them."""
    inputs = {"decode": shard_manifests(wildcards)}
    if DECODE.get("dataset_clusters"):
        inputs["semantic"] = expand(RUN + "/cluster.json", **wildcards)
    return inputs


RUNS = expand(RUN + "/metrics.json", dataset=list(config["datasets"]), model=list(MODELS))
REPORT = [RESULTS + f"/{name}" for name in ("index.html", "metrics.json", "metrics.csv", "metrics.md")]


rule all:
    input:
        RUNS,
        REPORT,


def run_summary() -> None:
    """Write and print what this run did (results/summary.md and .json) from the store's journal."""
    shell(f"{LDS} summary --run {os.environ['LDS_RUN']} --store {STORE!r} --output {RESULTS}/summary.md || true")


onsuccess:
    run_summary()
    print(f"lds: open {os.path.abspath(RESULTS)}/index.html: metrics (metrics.md, .csv, .json) and figures per dataset and model")


onerror:
    run_summary()
    print(f"lds: failed items are listed in {RESULTS}/summary.md; fix them (or leave them to retry) and run again: only missing work is done")


rule preprocess:
    output:
        SHARD + "/preprocess.json",
    params:
        spec=lambda w: config["datasets"][w.dataset]["spec"],
        per=lambda w: config["datasets"][w.dataset]["images_per_shard"],
        size=lambda w: config["preprocess"]["size"] or model_spec(w).image_size,
        mode=lambda w: model_spec(w).preprocess_mode or config["preprocess"]["mode"],
        multiple=lambda w: model_spec(w).patch_size,
    threads: THREADS["shard"]
    resources:
        mem_mb=mem_mb(2000),
    benchmark:
        BENCH + "/shard-{shard}/preprocess.tsv"
    shell:
        "{LDS} preprocess --dataset {params.spec:q} --shard {wildcards.shard} --shard-size {params.per}"
        " --size {params.size} --mode {params.mode} --multiple {params.multiple}"
        " --store {STORE:q} --manifest {output:q}"


rule extract:
    input:
        SHARD + "/preprocess.json",
    output:
        SHARD + "/extract.json",
    params:
        model=lambda w: MODELS[w.model],
        options=extract_options(),
    threads: THREADS["shard"]
    resources:
        mem_mb=mem_mb(4000, 16000),
        **EXTRACT_GPU,
    benchmark:
        BENCH + "/shard-{shard}/extract.tsv"
    shell:
        "{LDS} extract --input {input:q} --model {params.model:q} {params.options}"
        " --store {STORE:q} --manifest {output:q}"


if SOLVE["level"] == "image":

    rule solve:
        input:
            SHARD + "/extract.json",
        output:
            SHARD + "/solve.json",
        params:
            **SOLVE,
        threads: THREADS["shard"]
        resources:
            mem_mb=mem_mb(3000, 12000),
            **GPU,
        benchmark:
            BENCH + "/shard-{shard}/solve.tsv"
        shell:
            "{LDS} solve --input {input:q} --solver {params.solver} --channels {params.channels}"
            " --graph {params.graph} --variant {params.variant} --parameterisation {params.parameterisation}"
            " --steps {params.steps} --lr {params.lr} --seed {params.seed} --device {params.device}"
            " --store {STORE:q} --manifest {output:q}"

else:
    # One `lds solve-dataset` job per dataset x model over every shard; it writes each shard's solve.json
    # (its artifact stands in for a `lds solve` one), so one rule per dataset: their shard counts differ.
    for name, count in SHARDS.items():

        rule:
            name:
                f"solve_dataset_{name}"
            input:
                expand(RESULTS + f"/{name}/{{model}}/shard-{{shard}}/extract.json", shard=range(count), allow_missing=True),
            output:
                expand(RESULTS + f"/{name}/{{model}}/shard-{{shard}}/solve.json", shard=range(count), allow_missing=True),
            params:
                inputs=lambda w, input: " ".join(f"--input '{path}'" for path in input),
                manifests=lambda w, output: " ".join(f"--manifest '{path}'" for path in output),
                device=SOLVE["device"],
                **config["solve_dataset"],
            threads: THREADS["dataset"]
            resources:
                # the solver's table, AdamW state and EMA: about 2 MB per image at 100 x 32 x 32
                mem_mb=mem_mb(4000 + 2 * IMAGES[name]),
                **GPU,
            benchmark:
                RESULTS + f"/benchmarks/{name}/{{model}}/solve-dataset.tsv"
            shell:
                "{LDS} solve-dataset {params.inputs} --graph {params.graph} --channels {params.channels}"
                " --resolution {params.resolution} --batch-size {params.batch_size} --iterations {params.iterations}"
                " --epochs {params.epochs} --lr {params.lr} --intra {params.intra} --inter {params.inter}"
                " --threshold {params.threshold} --seed {params.seed} --device {params.device}"
                " --store {STORE:q} {params.manifests}"


rule decode:
    input:
        SHARD + "/solve.json",
    output:
        manifest=SHARD + "/decode.json",
        **({"proposals": SHARD + "/instances.json"} if DECODE.get("instances") else {}),
    params:
        clusters=DECODE["clusters"],
        seed=DECODE["seed"],
        instances=lambda w, output: f"--instances --coco-results '{output.proposals}'" if DECODE.get("instances") else "--no-instances",
        figures=RUN + "/figures",
    threads: THREADS["shard"]
    resources:
        mem_mb=mem_mb(2000),
    benchmark:
        BENCH + "/shard-{shard}/decode.tsv"
    shell:
        "{LDS} decode --input {input:q} --clusters {params.clusters} --seed {params.seed} {params.instances}"
        " --figures {params.figures:q} --store {STORE:q} --manifest {output.manifest:q}"


rule cluster:
    input:
        lambda w: shard_manifests(w, "solve"),
    output:
        RUN + "/cluster.json",
    params:
        inputs=lambda w, input: " ".join(f"--input '{path}'" for path in input),
        clusters=DECODE.get("dataset_clusters"),
        seed=DECODE["seed"],
        dask=f"--dask-scheduler '{config['dask_scheduler']}'" if config.get("dask_scheduler") else "",
    threads: THREADS["dataset"]
    resources:
        mem_mb=mem_mb(4000),
    benchmark:
        BENCH + "/cluster.tsv"
    shell:
        "{LDS} cluster {params.inputs} --clusters {params.clusters} --seed {params.seed} {params.dask} --store {STORE:q} --manifest {output:q}"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        manifest=RUN + "/evaluate.json",
        metrics=RUN + "/metrics.json",
        sheet=RUN + "/figures/contact-sheet.png",
    params:
        inputs=lambda w, input: " ".join(f"--input '{path}'" for path in input.decode),
        semantic=lambda w, input: f"--semantic '{input.semantic}'" if "semantic" in input.keys() else "",
        figures=RUN + "/figures",
        dask=f"--dask-scheduler '{config['dask_scheduler']}'" if config.get("dask_scheduler") else "",
    threads: THREADS["dataset"]
    resources:
        mem_mb=mem_mb(4000),
    benchmark:
        BENCH + "/evaluate.tsv"
    shell:
        "{LDS} evaluate {params.inputs} {params.semantic} --metrics {output.metrics:q} --figures {params.figures:q}"
        " {params.dask} --store {STORE:q} --manifest {output.manifest:q}"


rule report:
    input:
        RUNS,
    output:
        REPORT,
    shell:
        "{LDS} report {input:q} --results {RESULTS:q}"
