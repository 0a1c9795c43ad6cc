"""The Snakemake DAG: a full run with the MaskCut baseline beside the method, a no-op re-run, a cache hit
after deleting a manifest, config errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]

CONFIG = {
    "store": "store",
    "results": "results",
    "datasets": {"shapes": {"spec": "synthetic-shapes:4", "images_per_shard": 2}},
    "models": ["tiny-vit"],
    "preprocess": {"mode": "short-side", "size": 96},
    "solve": {"solver": "adam", "graph": "kq", "channels": 6, "steps": 20, "lr": 0.003, "seed": 0},  # kq and vv: test_what_where.py
    "decode": {"clusters": 4, "seed": 0, "instances": True, "dataset_clusters": 4},
    "baselines": ["maskcut"],
    "baseline_options": {"masks": 2},
}


def snakemake(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *extra], capture_output=True, text=True, timeout=600)


def job_logs(workdir: Path, run: subprocess.CompletedProcess) -> str:
    """What the jobs of a Snakemake run wrote to their logs (Snakemake names each job's log as it starts it)."""
    return "".join((workdir / path).read_text() for path in re.findall(r"^\s+log: (\S+)", run.stdout + run.stderr, re.MULTILINE))


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    write_config(root, CONFIG)
    run = snakemake(root)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


def test_full_run_produces_metrics_figures_and_shards(workdir):
    run_dir = workdir / "results" / "shapes" / "tiny-vit"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["pretrained"] is False
    for key in ("crossimage_kmeans_miou", "oracle_miou", "matched_miou", "box_ap", "mask_ap50", "xy_regression_r2"):
        assert 0 <= metrics[key] <= 1, key
    assert "semantic_miou" not in metrics  # K-Means across per-image solves is not the paper's dataset level
    assert sorted(p.name for p in run_dir.glob("shard-*")) == ["shard-0", "shard-1"]
    figures = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert figures == ["contact-sheet.png"] + [f"shapes-{i:04d}.png" for i in range(4)]
    proposals = [r for shard in ("shard-0", "shard-1") for r in json.loads((run_dir / shard / "instances.json").read_text())]
    assert proposals and {r["image_id"] for r in proposals} <= {0, 1, 2, 3}


def test_full_run_writes_the_report_and_an_index_linking_the_figures(workdir):
    results = workdir / "results"
    runs = json.loads((results / "metrics.json").read_text())["runs"]
    assert [(r["dataset"], r["model"], r.get("baseline")) for r in runs] == [("shapes", "tiny-vit", None), ("shapes", "tiny-vit", "maskcut")]
    header, row, _ = (results / "metrics.csv").read_text().splitlines()
    assert header.startswith("dataset,model,pretrained") and row.startswith("shapes,tiny-vit,False")
    assert "tiny-vit (NOT pretrained)" in (results / "metrics.md").read_text()
    index = (results / "index.html").read_text()
    for link in ("shapes/tiny-vit/figures/contact-sheet.png", "shapes/tiny-vit/figures/shapes-0003.png", "shapes/tiny-vit/shard-1/instances.json", "metrics.csv"):
        assert f"'{link}'" in index and (results / link).is_file()


def test_the_maskcut_baseline_runs_beside_the_method_as_its_own_report_row(workdir):
    results = workdir / "results"
    run_dir = results / "shapes" / "tiny-vit+maskcut"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["baseline"] == "maskcut" and metrics["model"] == "tiny-vit" and metrics["images"] == 4
    for key in ("crossimage_kmeans_miou", "oracle_miou", "box_ap", "mask_ap50", "xy_regression_r2"):
        assert 0 <= metrics[key] <= 1, key
    method = json.loads((results / "shapes" / "tiny-vit" / "metrics.json").read_text())
    assert "baseline" not in method and metrics["xy_regression_r2"] != method["xy_regression_r2"]
    # MaskCut's masks are the proposals: at most N = 2 per image
    proposals = [r for shard in ("shard-0", "shard-1") for r in json.loads((run_dir / shard / "instances.json").read_text())]
    assert proposals and len(proposals) <= 2 * 4 and metrics["proposals_per_image"] <= 2
    assert sorted(p.name for p in (run_dir / "figures").glob("*.png")) == ["contact-sheet.png"] + [f"shapes-{i:04d}.png" for i in range(4)]
    markdown = (results / "metrics.md").read_text()
    assert "| tiny-vit (kq) (NOT pretrained) |" in markdown and "| tiny-vit (MaskCut) (NOT pretrained) |" in markdown
    assert "<h2>shapes / tiny-vit (MaskCut)</h2>" in (results / "index.html").read_text()
    assert (results / "metrics.csv").read_text().splitlines()[2].startswith("shapes,tiny-vit,False,random initialisation (NOT pretrained),4,maskcut,")
    bench = results / "benchmarks" / "shapes" / "tiny-vit+maskcut"
    assert sorted(str(p.relative_to(bench)) for p in bench.rglob("*.tsv")) == [
        "cluster.tsv", "evaluate.tsv", "shard-0/baseline.tsv", "shard-0/decode.tsv", "shard-1/baseline.tsv", "shard-1/decode.tsv",
    ]
    logs = results / "logs" / "shapes" / "tiny-vit+maskcut"  # each job's output, laid out as its benchmark
    assert sorted(str(p.relative_to(logs).with_suffix(".tsv")) for p in logs.rglob("*.log")) == sorted(str(p.relative_to(bench)) for p in bench.rglob("*.tsv"))
    assert "baseline: made " in (logs / "shard-1" / "baseline.log").read_text()


def test_second_run_has_nothing_to_do(workdir):
    again = snakemake(workdir)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_deleting_a_manifest_reruns_its_rule_from_the_cache(workdir):
    (workdir / "results" / "shapes" / "tiny-vit" / "metrics.json").unlink()
    rerun = snakemake(workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    logs = job_logs(workdir, rerun)
    assert "evaluate: cached" in logs and ": made " not in logs  # no stage made an artifact


def test_bad_config_value_is_rejected(tmp_path):
    write_config(tmp_path, {**CONFIG, "solve": {**CONFIG["solve"], "steps": 0}})
    run = snakemake(tmp_path, "--dry-run")
    assert run.returncode != 0 and "steps" in run.stdout + run.stderr
