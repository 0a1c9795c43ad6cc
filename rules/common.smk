# What the rules share: settings read from the config, the folders of a run, the datasets' shard counts,
# and the input functions and option helpers of the rules. No rules here.
import os
import shlex
import sys
import time
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from pipeline.extract.consumers import BASELINE_ARRAYS, GRAPH_ARRAYS, ZEROSHOT_ARRAYS, arrays_needed
from pipeline.data import num_shards, open_dataset
from pipeline.failures import MAX_FAILED_ENV, parse_max_failed
from pipeline.models import default_clip_repo, get_spec
from pipeline.store import Store
from stages.common import find_manifests, stale_manifests
from stages.versions import STAGE_VERSIONS

SCHEMA = yaml.safe_load(Path(workflow.basedir, "config", "schema.yaml").read_text())
STORE = os.environ.get("LDS_CACHE", config["store"])
RESULTS = config["results"]
LDS = f'"{sys.executable}" -m stages'
DECODE = config["decode"]
REPORT_SETTINGS = config["report"]
SOLVE = config["solve"]
THREADS = config["threads"]

# -- the jobs' environment ------------------------------------------------------------------------------------------
# Every stage this workflow run starts files its journal records (computed, reused, failed) under one
# run name, which `lds summary` reads; cluster jobs inherit it with the environment.
os.environ.setdefault("LDS_RUN", time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}")
# Every stage may leave out this many failed images (a count, or a fraction of its images) and publish the rest.
os.environ[MAX_FAILED_ENV] = str(parse_max_failed(config["max_failed"]))

# -- scheduling -----------------------------------------------------------------------------------------------------
# extract.keep until-consumed: a shard's extract manifest is temporary, and its attention is released (rule
# release_extract) once every stage that reads it has published
KEEP_ALL = config["extract"]["keep"] == "all"
# ... and the readers of a finished extract (and its release) go before the next shard's extract, so that
# about one extract per core is held at a time rather than every shard's
READER_PRIORITY = 0 if KEEP_ALL else 1
# GPU stages: `lds extract` and `lds solve` / `lds solve-dataset` ask for one GPU when the config sends them to CUDA.
GPU = {"gpu": 1} if SOLVE["device"] == "cuda" else {}
EXTRACT_GPU = {"gpu": 1} if config["extract"]["device"] == "cuda" else {}
# `lds cluster` and `lds evaluate` run their dask computations there when the config names a scheduler.
DASK_SCHEDULER = f"--dask-scheduler '{config['dask_scheduler']}'" if config.get("dask_scheduler") else ""

# -- folders --------------------------------------------------------------------------------------------------------
# A run's manifests, metrics and figures; beside them Snakemake's benchmark TSVs (seconds, peak memory) and
# each job's log (the stage's stdout and stderr), in the same layout.
RUN = RESULTS + "/{dataset}/{model}"
SHARD = RUN + "/shard-{shard}"
BENCH = RESULTS + "/benchmarks/{dataset}/{model}"
LOGS = RESULTS + "/logs/{dataset}/{model}"
# A baseline's run: its own folder beside the model's (results/shapes/tiny-vit+maskcut), read by `lds report` as a run.
BASELINE_RUN = RESULTS + "/{dataset}/{model}+{baseline}"
BASELINE_SHARD = BASELINE_RUN + "/shard-{shard}"
BASELINE_BENCH = RESULTS + "/benchmarks/{dataset}/{model}+{baseline}"
BASELINE_LOGS = RESULTS + "/logs/{dataset}/{model}+{baseline}"

wildcard_constraints:
    dataset="[^/]+",
    model="[^/+]+",
    baseline="tokencut|maskcut",
    shard="[0-9]+",

# -- models and runs ------------------------------------------------------------------------------------------------
# A model's result folder: its name with '/' as '--' (hf:facebook/dino-vits16 -> hf:facebook--dino-vits16).
MODELS = {model.replace("/", "--"): model for model in config["models"]}
if any("+" in folder or "@" in folder for folder in MODELS):
    raise WorkflowError("a model name in the config holds '+' or '@', which the workflow keeps for baseline runs (<model>+maskcut) and graph kinds (<model>@vv)")
if set(config["extract"]["weights"]) - set(config["models"]):
    raise WorkflowError(f"config extract.weights names {', '.join(sorted(set(config['extract']['weights']) - set(config['models'])))}, not among `models`")
# Each graph kind of `solve.graph` is a run of its own on the model's extract (shared): kq in the model's
# folder, vv in <model>@vv. With solve.level dataset there is one run per model, on solve_dataset.graph, in
# the model's folder. The `model` wildcard of the solve, decode, cluster, zeroshot and evaluate rules is
# such a run folder.
GRAPHS = (SOLVE["graph"] if isinstance(SOLVE["graph"], list) else [SOLVE["graph"]]) if SOLVE["level"] == "image" else [None]
GRAPH_SUFFIX = {"kq": "", "vv": "@vv", None: ""}
RUN_FOLDERS = {folder + GRAPH_SUFFIX[graph]: graph for folder in MODELS for graph in GRAPHS}  # run folder -> graph kind

# -- datasets -------------------------------------------------------------------------------------------------------
DATASETS = {name: open_dataset(d["spec"]) for name, d in config["datasets"].items()}
# `max_images: N` keeps the first N images of a dataset's listing (a fixed subset)
IMAGES = {name: min(len(dataset.records), config["datasets"][name].get("max_images") or len(dataset.records)) for name, dataset in DATASETS.items()}
SHARDS = {name: num_shards(IMAGES[name], d["images_per_shard"]) for name, d in config["datasets"].items()}


def remove_stale_manifests() -> None:
    """Remove each manifest naming an artifact that is gone from the store (deleted by hand, `lds cache gc`), so
    that its rule runs again and makes it (the rules after it then run too, and find theirs in the store).

    It runs here, as the Snakefile is read: Snakemake decides which jobs run from the files it finds while it
    builds the DAG, right after. `onstart` comes after that decision, and an input function that removes a
    file Snakemake has already listed stops the run ("Unable to obtain modification time ...")."""
    stage_manifests = [path for path in Path(RESULTS).rglob("*.json") if path.stem in STAGE_VERSIONS]
    for stale in stale_manifests(Store(STORE), find_manifests(stage_manifests)):
        print(f"lds: {stale} names an artifact that is not in store {STORE}: removed, so its rule runs again", file=sys.stderr)
        stale.unlink()


if workflow.is_main_process:
    remove_stale_manifests()


# -- zero-shot labels: which models and datasets get them -----------------------------------------------------------
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

# -- the targets of rule all ----------------------------------------------------------------------------------------
RUNS = expand(RUN + "/metrics.json", dataset=list(config["datasets"]), model=list(RUN_FOLDERS)) + expand(
    BASELINE_RUN + "/metrics.json", dataset=list(config["datasets"]), model=list(MODELS), baseline=config["baselines"]
)
REPORT = [RESULTS + f"/{name}" for name in ("index.html", "metrics.json", "metrics.csv", "metrics.md")]
RELEASED = [] if KEEP_ALL else [
    f"{RESULTS}/{dataset}/{model}/shard-{shard}/extract-released.json" for dataset in config["datasets"] for model in MODELS for shard in range(SHARDS[dataset])
]


# -- helpers of the rules -------------------------------------------------------------------------------------------
def model_folder(folder: str) -> str:
    """The model's result folder of a run folder: tiny-vit@vv -> tiny-vit."""
    return folder.split("@", 1)[0]


def model_spec(wildcards):
    """The registry entry of the model a job's `model` wildcard (a result folder name) stands for."""
    return get_spec(MODELS[model_folder(wildcards.model)])


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
    as `--max-timestep VALUE`, a list comma-joined, true as a bare flag, false as `--no-KEY` where the
    default is true; null, other false values and empty lists left out (the default)."""
    parts = []
    section_schema = SCHEMA["properties"][section]["properties"]
    values = {**config[section], **(overrides or {})}
    for key in section_schema:
        value = values.get(key)
        flag = "--" + key.replace("_", "-")
        if value is False and section_schema[key].get("default") is True and key not in WORKFLOW_KEYS.get(section, ()):
            parts.append("--no-" + key.replace("_", "-"))
            continue
        if key in WORKFLOW_KEYS.get(section, ()) or value is None or value is False or value == []:
            continue
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {shlex.quote(','.join(map(str, value)) if isinstance(value, list) else str(value))}")
    return " ".join(parts)


def labelled(wildcards) -> bool:
    """Whether this dataset x model (each of its runs) gets CLIP zero-shot labels (which read its extract's values)."""
    return model_folder(wildcards.model) in ZEROSHOT_CLIPS and wildcards.dataset in ZEROSHOT_DATASETS


def extract_weights(wildcards) -> str:
    """`lds extract --weights` for a model named under extract.weights ('' for the others)."""
    path = config["extract"]["weights"].get(MODELS[wildcards.model])
    return f"--weights {shlex.quote(path)}" if path else ""


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


def baseline_options(method: str) -> str:
    """`lds baseline` options from the config's `baseline_options` (MaskCut's N only for maskcut)."""
    options = config["baseline_options"]
    line = f"--method {method} --affinity {options['affinity']} --layer={shlex.quote(str(options['layer']))}"
    if options["tau"] is not None:
        line += f" --tau {options['tau']}"
    if options["eigenvectors"]:
        line += f" --eigenvectors {options['eigenvectors']}"
    return line + (f" --masks {options['masks']}" if method == "maskcut" else "")


def decode_outputs(shard: str) -> dict[str, str]:
    """decode's outputs in a shard folder: its manifest and, with `decode.instances`, the COCO results json."""
    return {"manifest": shard + "/decode.json", **({"proposals": shard + "/instances.json"} if DECODE.get("instances") else {})}


def evaluate_outputs(run: str) -> dict[str, str]:
    """evaluate's outputs in a run folder: its manifest, metrics.json and the contact sheet."""
    return {"manifest": run + "/evaluate.json", "metrics": run + "/metrics.json", "sheet": run + "/figures/contact-sheet.png"}


# -- input functions ------------------------------------------------------------------------------------------------
def shard_extract(wildcards) -> str:
    """A run's shard's extract manifest: in its model's folder, shared by the model's runs on every graph kind."""
    return f"{RESULTS}/{wildcards.dataset}/{model_folder(wildcards.model)}/shard-{wildcards.shard}/extract.json"


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


# -- the end of a run -----------------------------------------------------------------------------------------------
def run_summary() -> None:
    """Write and print what this run did (results/summary.md and .json) from the store's journal."""
    shell(f"{LDS} summary --run {os.environ['LDS_RUN']} --store {STORE!r} --output {RESULTS}/summary.md || true")
