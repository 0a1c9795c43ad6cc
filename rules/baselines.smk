# The baselines: `lds baseline` (TokenCut, MaskCut) on each shard's extract stands in for `lds solve`;
# decode (its masks are the proposals), cluster and evaluate are the rules above, in the baseline's own run
# folder (results/<dataset>/<model>+<baseline>).


rule baseline:
    input:
        SHARD + "/extract.json",
    output:
        BASELINE_SHARD + "/baseline.json",
    log:
        BASELINE_LOGS + "/shard-{shard}/baseline.log",
    params:
        options=lambda w: baseline_options(w.baseline),
    threads: THREADS["shard"]
    priority: READER_PRIORITY
    resources:
        mem_mb=mem_mb(3000, 12000),
    benchmark:
        BASELINE_BENCH + "/shard-{shard}/baseline.tsv"
    shell:
        "{LDS} baseline --input {input:q} {params.options} --store {STORE:q} --manifest {output:q} > {log:q} 2>&1"


use rule decode as decode_baseline with:
    input:
        BASELINE_SHARD + "/baseline.json",
    output:
        **decode_outputs(BASELINE_SHARD),
    log:
        BASELINE_LOGS + "/shard-{shard}/decode.log",
    params:
        figures=BASELINE_RUN + "/figures",
    benchmark:
        BASELINE_BENCH + "/shard-{shard}/decode.tsv"


use rule cluster as cluster_baseline with:
    input:
        lambda w: shard_manifests(w, "baseline", BASELINE_SHARD),
    output:
        BASELINE_RUN + "/cluster.json",
    log:
        BASELINE_LOGS + "/cluster.log",
    benchmark:
        BASELINE_BENCH + "/cluster.tsv"


use rule evaluate as evaluate_baseline with:
    input:
        unpack(lambda w: evaluate_inputs(w, BASELINE_RUN, BASELINE_SHARD)),
    output:
        **evaluate_outputs(BASELINE_RUN),
    log:
        BASELINE_LOGS + "/evaluate.log",
    params:
        figures=BASELINE_RUN + "/figures",
        layers=BASELINE_RUN + "/layers.csv",
    benchmark:
        BASELINE_BENCH + "/evaluate.tsv"
