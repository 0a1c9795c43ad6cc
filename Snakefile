# lds: layer-distributed spectral clustering of the attention inside pretrained vision models.
# Per dataset x model, in shards: preprocess -> extract -> solve -> decode -> evaluate, then one report over
# every run. solve makes a run per graph kind (kq, vv) on the model's one extract, or one run over every
# shard (solve.level dataset); optionally cluster (one K-Means across a dataset), CLIP zero-shot labels, and
# the TokenCut / MaskCut baselines (extract -> baseline -> decode -> evaluate, each its own run).
# Each rule calls one `lds` stage; the stage finds its artifact in the content-addressed store when nothing
# relevant changed, so re-running a rule is cheap. Snakemake tracks the small JSON manifests in results/;
# each job's output goes to results/logs/<dataset>/<run>/[shard-N/]<stage>.log, which Snakemake prints when
# the job fails (profiles/default, read on every run). The rules: rules/*.smk, in the pipeline's order.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"


rule all:
    input:
        RUNS,
        REPORT,
        RELEASED,


include: "rules/extract.smk"
include: "rules/solve.smk"
include: "rules/decode.smk"
include: "rules/evaluate.smk"
include: "rules/baselines.smk"


onsuccess:
    run_summary()
    print(f"lds: open {os.path.abspath(RESULTS)}/index.html: metrics (metrics.md, .csv, .json), figures per dataset and model, and the explorer (a page per image)")


onerror:
    run_summary()
    print(f"lds: failed items are listed in {RESULTS}/summary.md and each job's output in {RESULTS}/logs/; "
          "fix them (or leave them to retry) and run again: only missing work is done")
