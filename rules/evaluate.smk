# Step 5: each run's metrics and figures from all its shards, then one report over every run.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        **evaluate_outputs(RUN),
    log:
        LOGS + "/evaluate.log",
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
        " --layers-csv {params.layers:q} {params.dask} --store {STORE:q} --manifest {output.manifest:q} > {log:q} 2>&1"


rule report:
    input:
        RUNS,
    output:
        REPORT,
    log:
        RESULTS + "/logs/report.log",
    params:
        explorer="" if REPORT_SETTINGS.get("explorer_images") is None else f"--explorer-images {REPORT_SETTINGS['explorer_images']}",
    shell:
        "{LDS} report {input:q} --results {RESULTS:q} {params.explorer} > {log:q} 2>&1"
