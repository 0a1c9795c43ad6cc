"""`lds report`: the metrics of every dataset x model (x graph kind) in one JSON, CSV and markdown table,
and an HTML index page linking every figure and the results explorer."""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.errors import LdsError
from pipeline.evaluate.report import csv_report, html_index, markdown_report, read_run, run_links
from stages.common import write_json_atomic, write_text_atomic
from pipeline.evaluate.figures import model_caption


@click.command()
@click.argument("metrics_files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--results", "results_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"), show_default=True, help="Results folder: read <dataset>/<model>/metrics.json here (unless files are given) and write the report here.")
@click.option("--explorer-images", type=click.IntRange(0), default=None,
              help="The explorer's page and figures (about 0.4 s each) for the first N images of each dataset x model only; default: every image.")
def report(metrics_files, results_dir, explorer_images):
    """Write RESULTS/metrics.json, metrics.csv, metrics.md and index.html from the runs' metrics, and the
    explorer: per dataset x model a page per image under RESULTS/explorer/ (from the store the runs'
    evaluate artifacts are in) and the per-layer agreement figure."""
    from stages.explorer import build_explorers

    files = sorted(metrics_files) or sorted(results_dir.glob("*/*/metrics.json"))
    if not files:
        raise LdsError(f"no metrics found: {results_dir}/<dataset>/<model>/metrics.json; run lds evaluate (or snakemake) first")
    runs = [read_run(path) for path in files]
    results_dir.mkdir(parents=True, exist_ok=True)
    root = results_dir.resolve()

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), root)).as_posix()

    links = [run_links(path, run, model_caption(run), relative) for path, run in zip(files, runs)]
    write_json_atomic(results_dir / "metrics.json", {"runs": runs})
    write_text_atomic(results_dir / "metrics.csv", csv_report(runs))
    write_text_atomic(results_dir / "metrics.md", markdown_report(runs))
    explorers = build_explorers(results_dir, list(zip(files, runs)), relative, explorer_images)
    write_text_atomic(results_dir / "index.html", html_index(runs, links, explorers))
    click.echo(f"report: {results_dir / 'index.html'} ({len(runs)} runs)", err=True)
