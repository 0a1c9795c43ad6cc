# Step 4: regions. Each image's K-Means clusters of its eigenvectors (and object proposals), optionally one
# K-Means across every image of a dataset, and CLIP zero-shot labels of the regions.


rule decode:
    input:
        SHARD + "/solve.json",
    output:
        **decode_outputs(SHARD),
    log:
        LOGS + "/shard-{shard}/decode.log",
    params:
        clusters=DECODE["clusters"],
        seed=DECODE["seed"],
        instances=lambda w, output: f"--instances --coco-results '{output.proposals}'" if DECODE.get("instances") else "--no-instances",
        extended="--extended" if DECODE.get("extended_proposals", True) else "--paper-only",
        figures=RUN + "/figures",
        max_figures="" if DECODE.get("figures_per_shard") is None else f"--max-figures {DECODE['figures_per_shard']}",
    threads: THREADS["shard"]
    resources:
        mem_mb=mem_mb(2000),
    benchmark:
        BENCH + "/shard-{shard}/decode.tsv"
    shell:
        "{LDS} decode --input {input:q} --clusters {params.clusters} --seed {params.seed} {params.instances} {params.extended}"
        " --figures {params.figures:q} {params.max_figures} --store {STORE:q} --manifest {output.manifest:q} > {log:q} 2>&1"


rule cluster:
    input:
        lambda w: shard_manifests(w, "solve"),
    output:
        RUN + "/cluster.json",
    log:
        LOGS + "/cluster.log",
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
        "{LDS} cluster {params.inputs} --clusters {params.clusters} --seed {params.seed} {params.dask}"
        " --store {STORE:q} --manifest {output:q} > {log:q} 2>&1"


rule zeroshot:
    input:
        decode=SHARD + "/decode.json",
        extract=shard_extract,  # read through the decode's lineage: kept until this job is done
    output:
        SHARD + "/zeroshot.json",
    log:
        LOGS + "/shard-{shard}/zeroshot.log",
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
        " --store {STORE:q} --manifest {output:q} > {log:q} 2>&1"
