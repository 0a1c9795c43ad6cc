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

SHARDS = {
    name: num_shards(len(list_images(d["spec"])), d["images_per_shard"])
    for name, d in config["datasets"].items()
}


def shard_manifests(wildcards):
    count = SHARDS[wildcards.dataset]
    return expand(SHARD + "/decode.json", shard=range(count), allow_missing=True)


rule all:
    input:
        expand(RUN + "/metrics.json", dataset=list(config["datasets"]), model=config["models"]),


onsuccess:
    print(f"lds: results under {os.path.abspath(RESULTS)}: metrics.json and figures/ per dataset and model")


rule preprocess:
    output:
        SHARD + "/preprocess.json",
    params:
        spec=lambda w: config["datasets"][w.dataset]["spec"],
        per=lambda w: config["datasets"][w.dataset]["images_per_shard"],
        size=lambda w: config["preprocess"]["size"] or get_spec(w.model).image_size,
        mode=config["preprocess"]["mode"],
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
        " --steps {params.steps} --lr {params.lr} --seed {params.seed} --store {STORE:q} --manifest {output:q}"


rule decode:
    input:
        SHARD + "/solve.json",
    output:
        SHARD + "/decode.json",
    params:
        **config["decode"],
        figures=RUN + "/figures",
    shell:
        "{LDS} decode --input {input:q} --clusters {params.clusters} --seed {params.seed}"
        " --figures {params.figures:q} --store {STORE:q} --manifest {output:q}"


rule evaluate:
    input:
        shard_manifests,
    output:
        manifest=RUN + "/evaluate.json",
        metrics=RUN + "/metrics.json",
    params:
        inputs=lambda w, input: " ".join(f"--input '{path}'" for path in input),
    shell:
        "{LDS} evaluate {params.inputs} --metrics {output.metrics:q} --store {STORE:q} --manifest {output.manifest:q}"
