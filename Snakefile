# lds workflow: preprocess -> extract -> solve -> decode -> evaluate, per dataset x model, sharded.
# Each rule calls one `lds` stage; the stage finds its artifact in the content-addressed store when
# nothing relevant changed, so re-running a rule is cheap. Snakemake tracks the small JSON manifests.
import os
import sys

from snakemake.utils import validate

from pipeline.data import list_images, num_shards
from pipeline.models import get_spec

configfile: "config/config.yaml"
validate(config, os.path.join(workflow.basedir, "config", "schema.yaml"))

STORE = os.environ.get("LDS_CACHE", config["store"])
RESULTS = config["results"]
LDS = f'"{sys.executable}" -m stages'
RUN = RESULTS + "/{dataset}/{model}"
SHARD = RUN + "/shard-{shard}"
DECODE = config["decode"]

wildcard_constraints:
    dataset="[^/]+",
    model="[^/]+",
    shard="[0-9]+",

SHARDS = {
    name: num_shards(len(list_images(d["spec"])), d["images_per_shard"])
    for name, d in config["datasets"].items()
}


def shard_manifests(wildcards, stage="decode"):
    count = SHARDS[wildcards.dataset]
    return expand(SHARD + f"/{stage}.json", shard=range(count), allow_missing=True)


def evaluate_inputs(wildcards):
    """Every shard's decode manifest, and the dataset-level clusters when the config asks for them."""
    inputs = {"decode": shard_manifests(wildcards)}
    if DECODE.get("dataset_clusters"):
        inputs["semantic"] = expand(RUN + "/cluster.json", **wildcards)
    return inputs


RUNS = expand(RUN + "/metrics.json", dataset=list(config["datasets"]), model=config["models"])
REPORT = [RESULTS + f"/{name}" for name in ("index.html", "metrics.json", "metrics.csv", "metrics.md")]


rule all:
    input:
        RUNS,
        REPORT,


onsuccess:
    print(f"lds: open {os.path.abspath(RESULTS)}/index.html: metrics (metrics.md, .csv, .json) and figures per dataset and model")


rule preprocess:
    output:
        SHARD + "/preprocess.json",
    params:
        spec=lambda w: config["datasets"][w.dataset]["spec"],
        per=lambda w: config["datasets"][w.dataset]["images_per_shard"],
        size=lambda w: config["preprocess"]["size"] or get_spec(w.model).image_size,
        mode=lambda w: get_spec(w.model).preprocess_mode or config["preprocess"]["mode"],
        multiple=lambda w: get_spec(w.model).patch_size,
    shell:
        "{LDS} preprocess --dataset {params.spec:q} --shard {wildcards.shard} --shard-size {params.per}"
        " --size {params.size} --mode {params.mode} --multiple {params.multiple}"
        " --store {STORE:q} --manifest {output:q}"


rule extract:
    input:
        SHARD + "/preprocess.json",
    output:
        SHARD + "/extract.json",
    shell:
        "{LDS} extract --input {input:q} --model {wildcards.model:q} --store {STORE:q} --manifest {output:q}"


rule solve:
    input:
        SHARD + "/extract.json",
    output:
        SHARD + "/solve.json",
    params:
        **config["solve"],
    shell:
        "{LDS} solve --input {input:q} --solver {params.solver} --channels {params.channels}"
        " --graph {params.graph} --variant {params.variant} --parameterisation {params.parameterisation}"
        " --steps {params.steps} --lr {params.lr} --seed {params.seed} --store {STORE:q} --manifest {output:q}"


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
    shell:
        "{LDS} cluster {params.inputs} --clusters {params.clusters} --seed {params.seed} --store {STORE:q} --manifest {output:q}"


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
    shell:
        "{LDS} evaluate {params.inputs} {params.semantic} --metrics {output.metrics:q} --figures {params.figures:q}"
        " --store {STORE:q} --manifest {output.manifest:q}"


rule report:
    input:
        RUNS,
    output:
        REPORT,
    shell:
        "{LDS} report {input:q} --results {RESULTS:q}"
