# Step 3: the eigenvectors X of the attention's graphs, per image (`lds solve` per shard, one run per graph
# kind) or, with solve.level dataset, jointly over every image of a dataset (`lds solve-dataset`).

if SOLVE["level"] == "image":

    rule solve:
        input:
            shard_extract,
        output:
            SHARD + "/solve.json",
        log:
            LOGS + "/shard-{shard}/solve.log",
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
            "{LDS} solve --input {input:q} {params.options} --store {STORE:q} --manifest {output:q} > {log:q} 2>&1"

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
            log:
                RESULTS + f"/logs/{name}/{{model}}/solve-dataset.log",
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
                " --store {STORE:q} {params.manifests} > {log:q} 2>&1"
