"""What the tests that run the workflow share: the Snakemake command, a tiny config, the config written
where Snakemake reads it, a dry run, and the `lds` command lines a dry run prints."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
# four synthetic images in two shards through a tiny random ViT: each test adds what it checks
TINY = {
    "store": "store",
    "results": "results",
    "datasets": {"shapes": {"spec": "synthetic-shapes:4", "images_per_shard": 2}},
    "models": ["tiny-vit"],
    "preprocess": {"size": 96},
}


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def dry_run(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    """`snakemake --dry-run -p` of ``config`` in ``workdir``, printing every job's shell command."""
    write_config(workdir, config)
    command = [*SNAKEMAKE, "--directory", str(workdir), "--cores", "1", "--dry-run", "-p"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def printed_commands(log: str) -> dict[str, list[list[str]]]:
    """The arguments after `-m stages STAGE` of every command a dry run printed, by stage, up to the
    redirection of its output to the job's log (checked)."""
    marker = " -m stages "
    found: dict[str, list[list[str]]] = {}
    for line in log.splitlines():
        if marker in line:
            stage, *args = shlex.split(line[line.index(marker) + len(marker):])
            redirect = args.index(">")
            assert args[redirect + 1].startswith("results/logs/") and args[redirect + 2:] == ["2>&1"], args[redirect:]
            found.setdefault(stage, []).append(args[:redirect])
    return found
