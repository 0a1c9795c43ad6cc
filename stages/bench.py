"""`lds bench NAME`: run one of the checkout's benchmark scripts (benchmarks/bench_NAME.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from pipeline.errors import LdsError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def available() -> list[str]:
    return sorted(path.stem.removeprefix("bench_") for path in BENCHMARKS.glob("bench_*.py"))


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name, args):
    """Run benchmarks/bench_NAME.py with ARGS (`lds bench solver -- --help`)."""
    script = BENCHMARKS / f"bench_{name}.py"
    if not script.is_file():
        raise LdsError(f"no benchmark {name!r} in {BENCHMARKS}; available: {', '.join(available()) or 'none'}")
    sys.exit(subprocess.call([sys.executable, str(script), *args]))
