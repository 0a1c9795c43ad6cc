"""`lds summary`: what a run did, from the store's journal (computed, reused, resumed, failed items)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import LdsError
from pipeline.store import ArtifactRef, Store
from pipeline.evaluate.summary import summarise, summary_markdown
from stages.common import store_option, write_json_atomic, write_text_atomic


@click.command()
@click.option("--run", default=None, help="Run name (the Snakefile's $LDS_RUN; 'manual' for stages run by hand) [default: the latest].")
@click.option("--all-runs", is_flag=True, help="Every run in the store's journal together.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the table here (.md) and beside it the same as .json.")
@store_option
def summary(run, all_runs, output, store_root):
    """Per stage: items computed, reused from the cache, resumed from an interrupted run, failed (with
    reasons), seconds per computed item, and the bytes its artifacts hold in the store."""
    store = Store(store_root)
    runs = store.journal.runs()
    if not runs:
        raise LdsError(f"store {store.root} has no journal yet: run a stage first")
    if run is not None and run not in runs:
        click.echo(f"lds summary: run {run!r} has no journal records in store {store.root} (nothing computed or reused); "
                   f"latest runs: {', '.join(runs[-3:])}")
        return
    name = "all runs" if all_runs else run or runs[-1]
    records = store.journal.records(None if all_runs else name)
    result = summarise(records, artifact_sizes(store, records))
    text = summary_markdown(result, name)
    click.echo(text, nl=False)
    if output is not None:
        write_text_atomic(output, text)
        write_json_atomic(output.with_suffix(".json"), {"run": name, **result})


def artifact_sizes(store: Store, records: list[dict]) -> dict[tuple[str, str], dict]:
    """(stage, key) -> bytes now in the store and items, of every artifact the records name that is still there."""
    sizes = {}
    for ref in sorted({ArtifactRef(r["stage"], r["key"]) for r in records}, key=lambda ref: (ref.stage, ref.key)):
        if store.exists(ref):
            sizes[(ref.stage, ref.key)] = {"bytes": store.size(ref), "items": store.attrs(ref).get("items", [])}
    return sizes
