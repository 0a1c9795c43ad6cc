"""Kill Snakemake in the middle of a sharded run, run it again: the results equal an uninterrupted
run and, by the store's own journal, no finished work was done twice."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from pipeline.store import ArtifactRef, Store

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]
CONFIG = {
    "store": "store",
    "results": "results",
    "datasets": {"shapes": {"spec": "synthetic-shapes:24", "images_per_shard": 6}},
    "models": ["tiny-vit"],
    "preprocess": {"mode": "short-side", "size": 64},
    "solve": {"solver": "exact", "graph": "kq", "channels": 6},
    "decode": {"clusters": 4, "seed": 0, "instances": False, "dataset_clusters": 4},
}
STAGES = ("preprocess", "extract", "solve", "decode")


def start(workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*SNAKEMAKE, "--directory", str(workdir), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    log, _ = process.communicate(timeout=900)
    assert process.returncode == 0, log[-4000:]
    return log


def computed_count(store: Path, stage: str) -> int:
    return len(list(store.glob(f".journal/*/{stage}.*.computed.*.json")))


def manifests(workdir: Path) -> dict[str, ArtifactRef]:
    found = {}
    for path in sorted((workdir / "results" / "shapes" / "tiny-vit").rglob("*.json")):
        record = json.loads(path.read_text())
        if "key" in record and "stage" in record:
            found[str(path.relative_to(workdir))] = ArtifactRef(record["stage"], record["key"])
    return found


def test_a_killed_run_resumes_to_the_uninterrupted_result_without_recomputing(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for folder in (whole, killed):
        (folder / "config").mkdir(parents=True)
        (folder / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    finish(start(whole))

    run = start(killed)
    deadline = time.monotonic() + 600
    while computed_count(killed / "store", "extract") < 4 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)  # the snakemake process only: its running jobs are orphaned
    run.communicate(timeout=60)
    assert not (killed / "results" / "metrics.json").exists()
    time.sleep(1)
    store = Store(killed / "store")
    published_before = set(store.artifacts())

    unlock = subprocess.run([*SNAKEMAKE, "--directory", str(killed), "--unlock"], capture_output=True, text=True, timeout=120)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    log = finish(start(killed, "--rerun-incomplete"))
    assert "Nothing to be done" not in log

    # the same artifacts, addressed by content, and the same numbers
    # (extract's manifests are temporary: its attention is released once solve has read it)
    assert manifests(killed) == manifests(whole) and len(manifests(whole)) == 4 * (len(STAGES) - 1) + 2
    left, right = Store(whole / "store"), store
    for ref in {r for r in manifests(whole).values() if r.stage == "decode"}:
        for item in left.attrs(ref)["items"]:
            assert np.array_equal(left.open(ref)[f"items/{item}/labels"][...], right.open(ref)[f"items/{item}/labels"][...])
    metrics = [json.loads((w / "results/shapes/tiny-vit/metrics.json").read_text()) for w in (whole, killed)]
    assert {k: v for k, v in metrics[0].items() if k != "artifact"} == {k: v for k, v in metrics[1].items() if k != "artifact"}

    # by the journal: every item of every stage computed exactly once over both runs, and nothing
    # that was published before the kill was made again
    records = store.journal.records()
    computed = Counter((r["stage"], r["key"], r["item"]) for r in records if r["event"] == "computed")
    assert max(computed.values()) == 1
    expected = Counter({stage: 24 for stage in STAGES} | {"cluster": 24})
    assert Counter(stage for stage, _, _ in computed) == expected
    remade = [r for r in records if r["event"] in ("computed", "published") and ArtifactRef(r["stage"], r["key"]) in published_before
              and r["run"] == store.journal.runs()[-1]]
    assert remade == []
    assert len(store.journal.runs()) == 2 and (killed / "results" / "summary.md").is_file()
