"""Scaling the Snakemake DAG out: the SLURM profile's dry-run, threads and resources per rule, extract
options from the config, the dataset-level solver in place of the per-image one (issue 6), and the
baselines and zero-shot labels wired into the DAG."""

import json
import re
import subprocess
from pathlib import Path

import yaml

from workflow_runs import REPO, SNAKEMAKE, TINY, write_config

CONFIG = {
    **TINY,
    "solve": {"solver": "exact", "graph": "kq", "channels": 4},  # one run per model (kq and vv: test_what_where.py)
    "decode": {"clusters": 3},
}
# The dataset-level protocol in miniature: 6 x 6 tokens, heads concatenated, a few epochs.
DATASET_LEVEL = {
    **CONFIG,
    "datasets": {"shapes": {"spec": "synthetic-shapes:4", "images_per_shard": 2},
                 "more-shapes": {"spec": "synthetic-shapes:3", "images_per_shard": 1}},
    "preprocess": {"mode": "center-crop", "size": 96},
    "extract": {"max_resolution": 6, "concat_heads": True},
    "solve": {"level": "dataset"},
    "solve_dataset": {"channels": 4, "resolution": 6, "batch_size": 2, "epochs": 2, "intra": 5, "inter": 5, "lr": 0.1},
    "decode": {"clusters": 3, "dataset_clusters": 3},
}


def snakemake(workdir: Path, config: dict, *extra: str) -> subprocess.CompletedProcess:
    write_config(workdir, config)
    run = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *extra], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return run


def dry_run(workdir: Path, config: dict, *extra: str) -> dict[str, list[str]]:
    """Each job of a dry-run with its shell command: {rule: [job text, ...]}."""
    log = snakemake(workdir, config, "--dry-run", "--printshellcmds", *extra).stdout
    jobs: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\[[^\n]*\]\n(?:local)?rule )", log):
        match = re.search(r"^(?:local)?rule (\S+):$", block, re.MULTILINE)
        if match:
            jobs.setdefault(match.group(1), []).append(block)
    return jobs


def field(job: str, name: str) -> str:
    """One `name: value` line of a job in the dry-run (empty when absent)."""
    match = re.search(rf"^\s+{name}: (.*)$", job, re.MULTILINE)
    return match.group(1) if match else ""


def test_slurm_profile_dry_run_validates_without_a_cluster(tmp_path):
    jobs = dry_run(tmp_path, CONFIG, "--profile", str(REPO / "profiles" / "slurm"))
    assert {rule: len(blocks) for rule, blocks in jobs.items()} == {
        "preprocess": 2, "extract": 2, "solve": 2, "release_extract": 2, "decode": 2, "evaluate": 1, "report": 1, "all": 1,
    }
    extract, evaluate = jobs["extract"][0], jobs["evaluate"][0]
    assert "slurm_partition=CHANGE-ME" in field(extract, "resources") and "runtime=240" in field(extract, "resources")
    assert "mem_mb=4000" in field(extract, "resources") and "runtime=120" in field(evaluate, "resources")
    assert "gpu=" not in "".join(field(job, "resources") for blocks in jobs.values() for job in blocks)


def test_threads_gpu_and_extract_options_follow_the_config(tmp_path):
    config = {**CONFIG, "threads": {"shard": 2, "dataset": 1}, "solve": {**CONFIG["solve"], "device": "cuda"},
              "extract": {"max_resolution": 32, "concat_heads": True, "dtype": "float32"}}
    jobs = dry_run(tmp_path, config, "--cores", "4")
    assert field(jobs["extract"][0], "threads") == "2" and field(jobs["evaluate"][0], "threads") == ""
    assert "gpu=1" in field(jobs["solve"][0], "resources") and "gpu=" not in field(jobs["extract"][0], "resources")
    assert "--device cuda" in jobs["solve"][0]
    assert "--dtype float32 --precision float32 --timesteps 20 --max-timestep 250 --max-resolution 32 --concat-heads" in jobs["extract"][0]
    plain = dry_run(tmp_path / "plain", CONFIG, "--cores", "1")
    assert "--max-resolution" not in plain["extract"][0] and "--concat-heads" not in plain["extract"][0]


def test_extract_device_cuda_asks_for_a_gpu_on_the_extract_jobs_only(tmp_path):
    config = {**CONFIG, "extract": {"device": "cuda"}, "solve": {**CONFIG["solve"], "device": "cpu"}}
    jobs = dry_run(tmp_path, config, "--cores", "2")
    assert all("gpu=1" in field(job, "resources") and "--device cuda" in job for job in jobs["extract"])
    assert "gpu=" not in field(jobs["solve"][0], "resources") and "--device cpu" in jobs["solve"][0]
    plain = dry_run(tmp_path / "plain", CONFIG, "--cores", "1")
    assert "gpu=" not in field(plain["extract"][0], "resources") and "--device auto" in plain["extract"][0]


def test_a_hub_model_name_with_a_slash_gets_its_own_result_folder(tmp_path):
    config = {**CONFIG, "models": ["tiny-vit", "hf:facebook/dino-vits16"]}
    jobs = dry_run(tmp_path, config, "--cores", "1")
    hub = [job for job in jobs["extract"] if "hf:facebook--dino-vits16/shard-" in field(job, "output")]
    assert len(hub) == 2 and all("--model hf:facebook/dino-vits16" in job for job in hub)
    assert len(jobs["evaluate"]) == 2 and len(jobs["extract"]) == 4


def test_dataset_level_dry_run_has_one_solver_job_per_dataset_over_all_shards(tmp_path):
    jobs = dry_run(tmp_path, DATASET_LEVEL, "--cores", "2")
    assert "solve" not in jobs and len(jobs["solve_dataset_shapes"]) == len(jobs["solve_dataset_more-shapes"]) == 1
    assert len(jobs["decode"]) == 5 and len(jobs["cluster"]) == 2
    job = jobs["solve_dataset_more-shapes"][0]
    shards = [f"results/more-shapes/tiny-vit/shard-{i}" for i in range(3)]
    assert " ".join(f"--input '{s}/extract.json'" for s in shards) in job
    assert " ".join(f"--manifest '{s}/solve.json'" for s in shards) in job
    assert "--resolution 6 --batch-size 2 --iterations 5 --epochs 2" in job


def test_dataset_level_run_feeds_decode_cluster_and_evaluate_and_writes_benchmarks(tmp_path):
    config = {**DATASET_LEVEL, "datasets": {"shapes": DATASET_LEVEL["datasets"]["shapes"]}}
    snakemake(tmp_path, config, "--cores", "2")
    run = tmp_path / "results" / "shapes" / "tiny-vit"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 4 and 0 <= metrics["semantic_miou"] <= 1
    solved = [json.loads((run / f"shard-{i}" / "solve.json").read_text()) for i in range(2)]
    assert [s["stage"] for s in solved] == ["solve-dataset"] * 2 and [s["items"] for s in solved] == [["shapes-0000", "shapes-0001"], ["shapes-0002", "shapes-0003"]]
    bench = tmp_path / "results" / "benchmarks" / "shapes" / "tiny-vit"
    tables = sorted(str(p.relative_to(bench)) for p in bench.rglob("*.tsv"))
    assert tables == ["cluster.tsv", "evaluate.tsv", "shard-0/decode.tsv", "shard-0/extract.tsv", "shard-0/preprocess.tsv",
                      "shard-1/decode.tsv", "shard-1/extract.tsv", "shard-1/preprocess.tsv", "solve-dataset.tsv"]
    assert float((bench / "solve-dataset.tsv").read_text().splitlines()[1].split("\t")[0]) > 0


def test_zeroshot_labels_only_for_clip_models_on_datasets_with_classes(tmp_path):
    config = {**CONFIG, "models": ["tiny-vit", "tiny-hf-clip", "clip-vitb16"],
              "datasets": {**CONFIG["datasets"], "photos": {"spec": "skimage-samples", "images_per_shard": 20}},
              "zeroshot": {"enabled": True, "weights": {"tiny-hf-clip": "clip folder"}, "classes": ["red", "blue"], "threshold": 0.2}}
    said = snakemake(tmp_path, config, "--dry-run").stderr
    assert "no zero-shot labels for model tiny-vit: it is not a CLIP model" in said
    assert "no zero-shot labels for dataset photos: it names no classes" in said
    jobs = dry_run(tmp_path, config)
    zeroshot = sorted(field(job, "output") for job in jobs["zeroshot"])
    assert zeroshot == [f"results/shapes/{m}/shard-{i}/zeroshot.json" for m in ("clip-vitb16", "tiny-hf-clip") for i in range(2)]
    tiny = next(job for job in jobs["zeroshot"] if "tiny-hf-clip/shard-1" in job)
    assert "--weights 'clip folder' --classes red,blue --threshold 0.2 --score cosine" in tiny
    clip = next(job for job in jobs["zeroshot"] if "clip-vitb16/shard-0" in job)
    assert "--weights" not in clip and "--clip" not in clip  # lds zeroshot finds clip-vitb16's own CLIP
    evaluate = {tuple(field(job, "output").split("/")[1:3]): job for job in jobs["evaluate"]}  # (dataset, model)
    for model in ("tiny-hf-clip", "clip-vitb16"):
        assert f"--zeroshot 'results/shapes/{model}/shard-0/zeroshot.json' --zeroshot 'results/shapes/{model}/shard-1/zeroshot.json'" in evaluate["shapes", model]
    assert all("--zeroshot" not in evaluate[key] for key in (("shapes", "tiny-vit"), ("photos", "tiny-hf-clip"), ("photos", "clip-vitb16")))
    plain = dry_run(tmp_path / "plain", CONFIG)
    assert "zeroshot" not in plain and "--zeroshot" not in plain["evaluate"][0]


def test_zeroshot_clip_for_a_model_not_in_the_config_is_refused(tmp_path):
    config = {**CONFIG, "zeroshot": {"enabled": True, "clip": {"clip-vitb16": "openai/clip-vit-base-patch16"}}}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "zeroshot.clip names clip-vitb16, not among `models`" in run.stdout + run.stderr


def test_baselines_get_their_own_runs_with_the_configured_options(tmp_path):
    config = {**CONFIG, "baselines": ["tokencut", "maskcut"], "baseline_options": {"affinity": "attention", "layer": "block02", "masks": 2}}
    jobs = dry_run(tmp_path, config)
    assert {rule: len(jobs[rule]) for rule in ("baseline", "decode_baseline", "evaluate_baseline", "extract")} == {
        "baseline": 4, "decode_baseline": 4, "evaluate_baseline": 2, "extract": 2,
    }
    maskcut = next(job for job in jobs["baseline"] if "tiny-vit+maskcut/shard-1" in job)
    assert field(maskcut, "input") == "results/shapes/tiny-vit/shard-1/extract.json"  # the method's extract, shared
    assert "--method maskcut --affinity attention --layer=block02 --masks 2" in maskcut
    assert "--tau" not in maskcut  # tau null: each method's own (TokenCut 0.2, MaskCut 0.15)
    tokencut = next(job for job in jobs["baseline"] if "tiny-vit+tokencut/shard-0" in job)
    assert "--method tokencut" in tokencut and "--masks" not in tokencut
    decode = next(job for job in jobs["decode_baseline"] if "tiny-vit+tokencut/shard-0" in job)
    assert "--input results/shapes/tiny-vit+tokencut/shard-0/baseline.json --clusters 3" in decode
    assert "--figures results/shapes/tiny-vit+tokencut/figures" in decode and "--max-figures" not in decode
    assert "--explorer-images" not in jobs["report"][0]
    jobs = dry_run(tmp_path, {**config, "decode": {**config.get("decode", {}), "figures_per_shard": 2}, "report": {"explorer_images": 5}})
    assert all("--max-figures 2" in job for job in jobs["decode"] + jobs["decode_baseline"])
    assert "--explorer-images 5" in jobs["report"][0]
    report = field(jobs["report"][0], "input").split(", ")
    assert set(report) == {f"results/shapes/{run}/metrics.json" for run in ("tiny-vit", "tiny-vit+maskcut", "tiny-vit+tokencut")}


def test_max_images_reaches_every_preprocess_job_so_the_last_shard_stops_at_the_subset(tmp_path):
    config = {**CONFIG, "datasets": {"shapes": {"spec": "synthetic-shapes:7", "images_per_shard": 2, "max_images": 3}}}
    jobs = dry_run(tmp_path, config, "--cores", "1")
    assert len(jobs["preprocess"]) == 2 and all("--max-images 3" in job for job in jobs["preprocess"])


def test_bench_workflow_sets_any_config_value_from_its_command_line(tmp_path):
    """`lds bench workflow -- --set section.key=value`: values read as YAML, sections made as needed, and
    the run's config passes the workflow's schema (a dry run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_workflow", REPO / "benchmarks" / "bench_workflow.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = bench.with_settings(bench.workflow_config(4, 2, "tiny-vit", "exact", 10, None),
                                 ["extract.precision=bfloat16", "solve.layer_diagnostics=false", "solve.graph=[kq, vv]"])
    assert config["extract"] == {"precision": "bfloat16"}
    assert config["solve"]["layer_diagnostics"] is False and config["solve"]["graph"] == ["kq", "vv"]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "-n", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
