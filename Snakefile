# lds workflow: preprocess -> extract -> solve -> decode -> evaluate, per dataset x model (solve onwards per graph
# kind, kq and vv, on the model's one extract), sharded; optionally
# the TokenCut / MaskCut baselines (extract -> baseline -> decode -> evaluate) and CLIP zero-shot labels.
# Each rule calls one `lds` stage; the stage finds its artifact in the content-addressed store when
# nothing relevant changed, so re-running a rule is cheap. Snakemake tracks the small JSON manifests.
import os
import shlex
import sys
import time
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from pipeline.consumers import BASELINE_ARRAYS, GRAPH_ARRAYS, ZEROSHOT_ARRAYS, arrays_needed
from pipeline.data import num_shards, open_dataset
from pipeline.failures import MAX_FAILED_ENV, parse_max_failed
from pipeline.models import default_clip_repo, get_spec
from pipeline.store import Store
from stages.common import STAGE_VERSIONS, find_manifests, stale_manifests

configfile: "config/config.yaml"
validate(config, os.path.join(workflow.basedir, "config", "schema.yaml"))
with open(os.path.join(workflow.basedir, "config", "schema.yaml")) as schema_file:
    SCHEMA = yaml.safe_load(schema_file)

STORE = os.environ.get("LDS_CACHE", config["store"])
# Every stage this workflow run starts files its journal records (computed, reused, failed) under one
# run name, which `lds summary` reads; cluster jobs inherit it with the environment.
os.environ.setdefault("LDS_RUN", time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}")
# Every stage may leave out this many failed images (a count, or a fraction of its images) and publish the rest.
os.environ[MAX_FAILED_ENV] = str(parse_max_failed(config["max_failed"]))
# extract.keep until-consumed: a shard's extract manifest is temporary, and its attention is released (rule
# release_extract) once every stage that reads it has published
KEEP_ALL = config["extract"]["keep"] == "all"
# ... and the readers of a finished extract (and its release) go before the next shard's extract, so that
# about one extract per core is held at a time rather than every shard's
READER_PRIORITY = 0 if KEEP_ALL else 1
RESULTS = config["results"]
# A manifest naming an artifact that is gone from the store (deleted by hand, `lds cache gc`) is removed, so
# that its rule runs again and makes it (the rules after it then run too, and find theirs in the store).
if workflow.is_main_process:
    stage_manifests = [path for path in Path(RESULTS).rglob("*.json") if path.stem in STAGE_VERSIONS]
    for stale in stale_manifests(Store(STORE), find_manifests(stage_manifests)):
        print(f"lds: {stale} names an artifact that is not in store {STORE}: removed, so its rule runs again", file=sys.stderr)
        stale.unlink()
LDS = f'"{sys.executable}" -m stages'
RUN = RESULTS + "/{dataset}/{model}"
SHARD = RUN + "/shard-{shard}"
BENCH = RESULTS + "/benchmarks/{dataset}/{model}"  # Snakemake's benchmark: TSVs (seconds, peak memory) per job
# A baseline's run: its own folder beside the model's (results/shapes/tiny-vit+maskcut), read by `lds report` as a run.
BASELINE_RUN = RESULTS + "/{dataset}/{model}+{baseline}"
BASELINE_SHARD = BASELINE_RUN + "/shard-{shard}"
BASELINE_BENCH = RESULTS + "/benchmarks/{dataset}/{model}+{baseline}"
DECODE = config["decode"]
SOLVE = config["solve"]
THREADS = config["threads"]
# GPU stages: `lds extract` and `lds solve` / `lds solve-dataset` ask for one GPU when the config sends them to CUDA.
GPU = {"gpu": 1} if SOLVE["device"] == "cuda" else {}
EXTRACT_GPU = {"gpu": 1} if config["extract"]["device"] == "cuda" else {}
# `lds cluster` and `lds evaluate` run their dask computations there when the config names a scheduler.
DASK_SCHEDULER = f"--dask-scheduler '{config['dask_scheduler']}'" if config.get("dask_scheduler") else ""

wildcard_constraints:
    dataset="[^/]+",
    model="[^/+]+",
    baseline="tokencut|maskcut",
    shard="[0-9]+",

# A model's result folder: its name with '/' as '--' (hf:facebook/dino-vits16 -> hf:facebook--dino-vits16).
MODELS = {model.replace("/", "--"): model for model in config["models"]}
if any("+" in folder or "@" in folder for folder in MODELS):
    raise WorkflowError("a model name in the config holds '+' or '@', which the workflow keeps for baseline runs (<model>+maskcut) and graph kinds (<model>@vv)")
# Each graph kind of `solve.graph` is a run of its own on the model's extract (shared): kq in the model's
# folder, vv in <model>@vv. With solve.level dataset there is one run per model, on solve_dataset.graph, in
# the model's folder. The `model` wildcard of the solve, decode, cluster, zeroshot and evaluate rules is
# such a run folder.
GRAPHS = (SOLVE["graph"] if isinstance(SOLVE["graph"], list) else [SOLVE["graph"]]) if SOLVE["level"] == "image" else [None]
GRAPH_SUFFIX = {"kq": "", "vv": "@vv", None: ""}
RUN_FOLDERS = {folder + GRAPH_SUFFIX[graph]: graph for folder in MODELS for graph in GRAPHS}  # run folder -> graph kind


def model_folder(folder: str) -> str:
    """The model's result folder of a run folder: tiny-vit@vv -> tiny-vit."""
    return folder.split("@", 1)[0]


def model_spec(wildcards):
    """The registry entry of the model a job's `model` wildcard (a result folder name) stands for."""
    return get_spec(MODELS[model_folder(wildcards.model)])


def shard_extract(wildcards) -> str:
    """A run's shard's extract manifest: in its model's folder, shared by the model's runs on every graph kind."""
    return f"{RESULTS}/{wildcards.dataset}/{model_folder(wildcards.model)}/shard-{wildcards.shard}/extract.json"


DATASETS = {name: open_dataset(d["spec"]) for name, d in config["datasets"].items()}
# `max_images: N` keeps the first N images of a dataset's listing (a fixed subset)
IMAGES = {name: min(len(dataset.records), config["datasets"][name].get("max_images") or len(dataset.records)) for name, dataset in DATASETS.items()}
SHARDS = {name: num_shards(IMAGES[name], d["images_per_shard"]) for name, d in config["datasets"].items()}


def mem_mb(vit: int, diffusion: int | None = None):
    """A mem_mb resource: ``vit`` MB (Stable Diffusion models: ``diffusion`` MB), doubled on each retry."""

    def resource(wildcards, attempt: int) -> int:
        large = diffusion is not None and model_spec(wildcards).family == "diffusers"
        return (diffusion if large else vit) * 2 ** (attempt - 1)

    return resource


# Config keys that are not options of the section's `lds` command (the workflow reads them itself).
WORKFLOW_KEYS = {"extract": ("weights", "keep"), "solve": ("level", "graph")}


def command_options(section: str, overrides: dict | None = None) -> str:
    """The `lds` options of a config section (with ``overrides``), in the schema's order: key `max_timestep`
    as `--max-timestep VALUE`, a list comma-joined, true as a bare flag; null, false and empty lists left
    out (the default)."""
    parts = []
    values = {**config[section], **(overrides or {})}
    for key in SCHEMA["properties"][section]["properties"]:
        value = values.get(key)
        if key in WORKFLOW_KEYS.get(section, ()) or value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {shlex.quote(','.join(map(str, value)) if isinstance(value, list) else str(value))}")
    return " ".join(parts)


if set(config["extract"]["weights"]) - set(config["models"]):
    raise WorkflowError(f"config extract.weights names {', '.join(sorted(set(config['extract']['weights']) - set(config['models'])))}, not among `models`")


def extract_weights(wildcards) -> str:
    """`lds extract --weights` for a model named under extract.weights ('' for the others)."""
    path = config["extract"]["weights"].get(MODELS[wildcards.model])
    return f"--weights {shlex.quote(path)}" if path else ""


def baseline_options(method: str) -> str:
    """`lds baseline` options from the config's `baseline_options` (MaskCut's N only for maskcut)."""
    options = config["baseline_options"]
    line = f"--method {method} --affinity {options['affinity']} --layer={shlex.quote(str(options['layer']))}"
    if options["tau"] is not None:
        line += f" --tau {options['tau']}"
    if options["eigenvectors"]:
        line += f" --eigenvectors {options['eigenvectors']}"
    return line + (f" --masks {options['masks']}" if method == "maskcut" else "")


def zeroshot_clips() -> dict[str, str]:
    """The `lds zeroshot` CLIP option of every model folder that gets zero-shot labels ('' for a CLIP
    model's own, which the stage finds); the models without a CLIP text tower are left out, said once."""
    options = config["zeroshot"]
    if not options["enabled"]:
        return {}
    for key in ("clip", "weights"):
        unknown = set(options[key]) - set(config["models"])
        if unknown:
            raise WorkflowError(f"config zeroshot.{key} names {', '.join(sorted(unknown))}, not among `models`")
    clips = {}
    for folder, model in MODELS.items():
        if model in options["weights"]:
            clips[folder] = f"--weights {shlex.quote(options['weights'][model])}"
        elif model in options["clip"]:
            clips[folder] = f"--clip {shlex.quote(options['clip'][model])}"
        elif default_clip_repo(get_spec(model).provenance()):
            clips[folder] = ""
        else:
            print(f"lds: no zero-shot labels for model {model}: it is not a CLIP model (no text tower); "
                  f"name its CLIP under zeroshot.clip or zeroshot.weights", file=sys.stderr)
    return clips


def zeroshot_datasets() -> set[str]:
    """The datasets whose zero-shot labels can be scored: those naming their classes, the others said once."""
    if not config["zeroshot"]["enabled"]:
        return set()
    for name in sorted(n for n, dataset in DATASETS.items() if not dataset.classes):
        print(f"lds: no zero-shot labels for dataset {name}: it names no classes to score them against", file=sys.stderr)
    return {name for name, dataset in DATASETS.items() if dataset.classes}


ZEROSHOT_CLIPS = zeroshot_clips()
ZEROSHOT_DATASETS = zeroshot_datasets()


def labelled(wildcards) -> bool:
    """Whether this dataset x model (each of its runs) gets CLIP zero-shot labels (which read its extract's values)."""
    return model_folder(wildcards.model) in ZEROSHOT_CLIPS and wildcards.dataset in ZEROSHOT_DATASETS


def extract_options(wildcards) -> str:
    """`lds extract` options: the config's, and what the readers of this dataset x model's extract need:
    `--arrays` (kq graphs: q,k; vv graphs and zero-shot labels: v; baselines: q,k or k) and, when the
    dataset-level solver is its only reader, only its layers (`--max-resolution`), heads concatenated."""
    needs = [GRAPH_ARRAYS[graph or config["solve_dataset"]["graph"]] for graph in GRAPHS]
    if labelled(wildcards):
        needs.append(ZEROSHOT_ARRAYS)
    if config["baselines"]:
        needs.append(BASELINE_ARRAYS[config["baseline_options"]["affinity"]])
    overrides = {}
    if SOLVE["level"] == "dataset" and not config["baselines"] and not labelled(wildcards):
        overrides = {"max_resolution": config["extract"]["max_resolution"] or config["solve_dataset"]["resolution"], "concat_heads": True}
    return f"{command_options('extract', overrides)} --arrays {','.join(arrays_needed(needs))}"


def extract_readers(wildcards) -> list[str]:
    """The manifests of every stage that reads a shard's extract: the solve of each run (graph kind), each
    baseline, the zero-shot labels of each run."""
    runs = [folder for folder in RUN_FOLDERS if model_folder(folder) == wildcards.model]
    readers = expand(RESULTS + "/{dataset}/{run}/shard-{shard}/solve.json", run=runs, dataset=wildcards.dataset, shard=wildcards.shard)
    readers += expand(BASELINE_SHARD + "/baseline.json", **wildcards, baseline=config["baselines"])
    if labelled(wildcards):
        readers += expand(RESULTS + "/{dataset}/{run}/shard-{shard}/zeroshot.json", run=runs, dataset=wildcards.dataset, shard=wildcards.shard)
    return readers


def shard_manifests(wildcards, stage: str = "decode", pattern: str = SHARD) -> list[str]:
    """Every shard's ``stage`` manifest of a run (``pattern``: the run's shard folder, SHARD or BASELINE_SHARD)."""
    count = SHARDS[wildcards.dataset]
    return expand(pattern + f"/{stage}.json", shard=range(count), allow_missing=True)


def evaluate_inputs(wildcards, run: str = RUN, shard: str = SHARD):
    """Every shard's decode manifest, the dataset-level clusters when the config asks for them, and
    (not for a baseline's run) every shard's zero-shot labels for the CLIP models on datasets that name
    their classes. ``run`` and ``shard``: the run's folders, RUN and SHARD or BASELINE_RUN and BASELINE_SHARD."""
    inputs = {"decode": shard_manifests(wildcards, pattern=shard)}
    if DECODE.get("dataset_clusters"):
        inputs["semantic"] = expand(run + "/cluster.json", **wildcards)
    if run == RUN and labelled(wildcards):
        inputs["zeroshot"] = shard_manifests(wildcards, "zeroshot")
    return inputs


def decode_outputs(shard: str) -> dict[str, str]:
    """decode's outputs in a shard folder: its manifest and, with `decode.instances`, the COCO results json."""
    return {"manifest": shard + "/decode.json", **({"proposals": shard + "/instances.json"} if DECODE.get("instances") else {})}


def evaluate_outputs(run: str) -> dict[str, str]:
    """evaluate's outputs in a run folder: its manifest, metrics.json and the contact sheet."""
    return {"manifest": run + "/evaluate.json", "metrics": run + "/metrics.json", "sheet": run + "/figures/contact-sheet.png"}


RUNS = expand(RUN + "/metrics.json", dataset=list(config["datasets"]), model=list(RUN_FOLDERS)) + expand(
    BASELINE_RUN + "/metrics.json", dataset=list(config["datasets"]), model=list(MODELS), baseline=config["baselines"]
)
REPORT = [RESULTS + f"/{name}" for name in ("index.html", "metrics.json", "metrics.csv", "metrics.md")]
RELEASED = [] if KEEP_ALL else [
    f"{RESULTS}/{dataset}/{model}/shard-{shard}/extract-released.json" for dataset in config["datasets"] for model in MODELS for shard in range(SHARDS[dataset])
]


rule all:
    input:
        RUNS,
        REPORT,
        RELEASED,


def run_summary() -> None:
    """Write and print what this run did (results/summary.md and .json) from the store's journal."""
    shell(f"{LDS} summary --run {os.environ['LDS_RUN']} --store {STORE!r} --output {RESULTS}/summary.md || true")


onsuccess:
    run_summary()
    print(f"lds: open {os.path.abspath(RESULTS)}/index.html: metrics (metrics.md, .csv, .json), figures per dataset and model, and the explorer (a page per image)")


onerror:
    run_summary()
    print(f"lds: failed items are listed in {RESULTS}/summary.md; fix them (or leave them to retry) and run again: only missing work is done")


rule preprocess:
    output:
        SHARD + "/preprocess.json",
    params:
        spec=lambda w: config["datasets"][w.dataset]["spec"],
        per=lambda w: config["datasets"][w.dataset]["images_per_shard"],
        limit=lambda w: f"--max-images {IMAGES[w.dataset]}",
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
        SHARD + "/extract.json" if KEEP_ALL else temp(SHARD + "/extract.json"),
    params:
        model=lambda w: MODELS[w.model],
        options=lambda w: " ".join(filter(None, (extract_weights(w), extract_options(w)))),
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
            shard_extract,
        output:
            SHARD + "/solve.json",
        params:
            options=lambda w: f"--graph {RUN_FOLDERS[w.model]} {command_options('solve')}",
        threads: THREADS["shard"]
        priority: READER_PRIORITY
        resources:
            mem_mb=mem_mb(3000, 12000),
            **GPU,
        benchmark:
            BENCH + "/shard-{shard}/solve.tsv"
        shell:
            "{LDS} solve --input {input:q} {params.options} --store {STORE:q} --manifest {output:q}"

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
                options=command_options("solve_dataset"),
            threads: THREADS["dataset"]
            resources:
                # the solver's table, AdamW state and EMA: about 2 MB per image at 100 x 32 x 32; the graph
                # cache: about 0.6 MB per image, layer and partition at 22 x 22 tokens (12 layers, 2 partitions)
                mem_mb=mem_mb(4000 + 16 * IMAGES[name]),
                **GPU,
            benchmark:
                RESULTS + f"/benchmarks/{name}/{{model}}/solve-dataset.tsv"
            shell:
                "{LDS} solve-dataset {params.inputs} {params.options} --device {params.device}"
                " --store {STORE:q} {params.manifests}"


rule decode:
    input:
        SHARD + "/solve.json",
    output:
        **decode_outputs(SHARD),
    params:
        clusters=DECODE["clusters"],
        seed=DECODE["seed"],
        instances=lambda w, output: f"--instances --coco-results '{output.proposals}'" if DECODE.get("instances") else "--no-instances",
        extended="--extended" if DECODE.get("extended_proposals", True) else "--paper-only",
        figures=RUN + "/figures",
    threads: THREADS["shard"]
    resources:
        mem_mb=mem_mb(2000),
    benchmark:
        BENCH + "/shard-{shard}/decode.tsv"
    shell:
        "{LDS} decode --input {input:q} --clusters {params.clusters} --seed {params.seed} {params.instances} {params.extended}"
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
        dask=DASK_SCHEDULER,
    threads: THREADS["dataset"]
    resources:
        mem_mb=mem_mb(4000),
    benchmark:
        BENCH + "/cluster.tsv"
    shell:
        "{LDS} cluster {params.inputs} --clusters {params.clusters} --seed {params.seed} {params.dask} --store {STORE:q} --manifest {output:q}"


rule zeroshot:
    input:
        decode=SHARD + "/decode.json",
        extract=shard_extract,  # read through the decode's lineage: kept until this job is done
    output:
        SHARD + "/zeroshot.json",
    params:
        clip=lambda w: ZEROSHOT_CLIPS[model_folder(w.model)],
        classes=f"--classes {shlex.quote(','.join(config['zeroshot']['classes']))}" if config["zeroshot"]["classes"] else "",
        threshold=config["zeroshot"]["threshold"],
        score=config["zeroshot"]["score"],
    threads: THREADS["shard"]
    resources:
        mem_mb=mem_mb(4000),
    benchmark:
        BENCH + "/shard-{shard}/zeroshot.tsv"
    shell:
        "{LDS} zeroshot --input {input.decode:q} {params.clip} {params.classes} --threshold {params.threshold} --score {params.score}"
        " --store {STORE:q} --manifest {output:q}"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        **evaluate_outputs(RUN),
    params:
        inputs=lambda w, input: " ".join(f"--input '{path}'" for path in input.decode),
        semantic=lambda w, input: f"--semantic '{input.semantic}'" if "semantic" in input.keys() else "",
        zeroshot=lambda w, input: " ".join(f"--zeroshot '{path}'" for path in input.get("zeroshot", [])),
        figures=RUN + "/figures",
        layers=RUN + "/layers.csv",  # per-layer agreement (runs of lds solve only)
        dask=DASK_SCHEDULER,
    threads: THREADS["dataset"]
    resources:
        mem_mb=mem_mb(4000),
    benchmark:
        BENCH + "/evaluate.tsv"
    shell:
        "{LDS} evaluate {params.inputs} {params.semantic} {params.zeroshot} --metrics {output.metrics:q} --figures {params.figures:q}"
        " --layers-csv {params.layers:q} {params.dask} --store {STORE:q} --manifest {output.manifest:q}"


# The baselines: `lds baseline` on each shard's extract stands in for `lds solve`; decode (its masks are the
# proposals), cluster and evaluate are the rules above, in the baseline's own run folder.
rule baseline:
    input:
        SHARD + "/extract.json",
    output:
        BASELINE_SHARD + "/baseline.json",
    params:
        options=lambda w: baseline_options(w.baseline),
    threads: THREADS["shard"]
    priority: READER_PRIORITY
    resources:
        mem_mb=mem_mb(3000, 12000),
    benchmark:
        BASELINE_BENCH + "/shard-{shard}/baseline.tsv"
    shell:
        "{LDS} baseline --input {input:q} {params.options} --store {STORE:q} --manifest {output:q}"


use rule decode as decode_baseline with:
    input:
        BASELINE_SHARD + "/baseline.json",
    output:
        **decode_outputs(BASELINE_SHARD),
    params:
        figures=BASELINE_RUN + "/figures",
    benchmark:
        BASELINE_BENCH + "/shard-{shard}/decode.tsv"


use rule cluster as cluster_baseline with:
    input:
        lambda w: shard_manifests(w, "baseline", BASELINE_SHARD),
    output:
        BASELINE_RUN + "/cluster.json",
    benchmark:
        BASELINE_BENCH + "/cluster.tsv"


use rule evaluate as evaluate_baseline with:
    input:
        unpack(lambda w: evaluate_inputs(w, BASELINE_RUN, BASELINE_SHARD)),
    output:
        **evaluate_outputs(BASELINE_RUN),
    params:
        figures=BASELINE_RUN + "/figures",
        layers=BASELINE_RUN + "/layers.csv",
    benchmark:
        BASELINE_BENCH + "/evaluate.tsv"


# extract.keep until-consumed: a shard's attention is deleted from the store once all its readers have
# published (the store keeps the artifact's metadata; a later job that needs it makes it again)
rule release_extract:
    input:
        extract=SHARD + "/extract.json",
        readers=extract_readers,
    output:
        SHARD + "/extract-released.json",
    params:
        after=lambda w, input: " ".join(f"--after '{path}'" for path in input.readers),
    localrule: True
    priority: READER_PRIORITY + 1
    shell:
        "{LDS} cache release {input.extract:q} {params.after} --record {output:q} --store {STORE:q}"


rule report:
    input:
        RUNS,
    output:
        REPORT,
    shell:
        "{LDS} report {input:q} --results {RESULTS:q}"
