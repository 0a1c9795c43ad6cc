# Steps 1-2: each shard's images, preprocessed for the model, and the attention (Q, K, V of every layer) the
# model computes on them; then, with extract.keep until-consumed, the release of that attention once every
# stage that reads it has published.


rule preprocess:
    output:
        SHARD + "/preprocess.json",
    log:
        LOGS + "/shard-{shard}/preprocess.log",
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
        "{LDS} preprocess --dataset {params.spec:q} --shard {wildcards.shard} --shard-size {params.per} {params.limit}"
        " --size {params.size} --mode {params.mode} --multiple {params.multiple}"
        " --store {STORE:q} --manifest {output:q} > {log:q} 2>&1"


rule extract:
    input:
        SHARD + "/preprocess.json",
    output:
        SHARD + "/extract.json" if KEEP_ALL else temp(SHARD + "/extract.json"),
    log:
        LOGS + "/shard-{shard}/extract.log",
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
        " --store {STORE:q} --manifest {output:q} > {log:q} 2>&1"


# extract.keep until-consumed: a shard's attention is deleted from the store once all its readers have
# published (the store keeps the artifact's metadata; a later job that needs it makes it again)
rule release_extract:
    input:
        extract=SHARD + "/extract.json",
        readers=extract_readers,
    output:
        SHARD + "/extract-released.json",
    log:
        LOGS + "/shard-{shard}/release.log",
    params:
        after=lambda w, input: " ".join(f"--after '{path}'" for path in input.readers),
    localrule: True
    priority: READER_PRIORITY + 1
    shell:
        "{LDS} cache release {input.extract:q} {params.after} --record {output:q} --store {STORE:q} > {log:q} 2>&1"
