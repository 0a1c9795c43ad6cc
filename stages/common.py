"""What every stage shares: the store option, manifests, and the cached, resumable item loop."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import click

from pipeline.errors import ItemError, LdsError, one_line
from pipeline.hashing import artifact_key
from pipeline.models import PROVENANCE_KEYS
from pipeline.store import ArraySpec, ArtifactRef, Store

# Bump a stage's version whenever a change to its code changes what it writes: the keys change with it.
STAGE_VERSIONS = {"preprocess": 2, "extract": 2, "solve": 4, "solve-dataset": 2, "decode": 3, "cluster": 3, "evaluate": 3, "baseline": 3, "zeroshot": 1}

ItemResult = tuple[dict[str, ArraySpec], dict[str, Any], dict[str, dict]]


def default_store_root() -> str:
    return os.environ.get("LDS_CACHE", "cache")


store_option = click.option(
    "--store",
    "store_root",
    default=default_store_root,
    show_default="$LDS_CACHE or ./cache",
    help="Folder or fsspec URL (s3://, gs://, memory://) of the artifact store.",
)
dask_scheduler_option = click.option(
    "--dask-scheduler",
    envvar="LDS_DASK_SCHEDULER",
    default=None,
    metavar="ADDRESS",
    help="Run the dask computations on the dask.distributed scheduler at ADDRESS (tcp://host:8786; workers must see the same store) [default: $LDS_DASK_SCHEDULER, else local threads].",
)
manifest_option = click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a small JSON naming the artifact here (what Snakemake tracks).",
)
input_option = click.option(
    "--input",
    "input_manifest",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Manifest JSON of the input artifact (written by the previous stage).",
)


def read_manifest(path: Path) -> ArtifactRef:
    """The artifact a manifest names."""
    try:
        record = json.loads(Path(path).read_text())
        return ArtifactRef(record["stage"], record["key"])
    except FileNotFoundError:
        raise LdsError(f"manifest {path} does not exist; run the stage that writes it first") from None
    except (ValueError, KeyError, TypeError) as error:
        raise LdsError(f"manifest {path} is not an lds manifest ({error})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all (a temporary name, then one rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_json_atomic(path: Path, record: dict | list) -> None:
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_manifest(path: Path | None, store: Store, ref: ArtifactRef, params: dict, items: list[str]) -> None:
    if path is None:
        return
    record = {
        "stage": ref.stage,
        "key": ref.key,
        "path": store.path(ref),
        "params": params,
        "items": items,
    }
    write_json_atomic(path, record)


# Stages whose artifacts stand in for another stage's downstream (the same item layout).
STANDS_IN_FOR = {"solve-dataset": "solve", "baseline": "solve"}


def upstream(store: Store, ref: ArtifactRef, stage: str) -> ArtifactRef:
    """The nearest ancestor of ``ref`` made by ``stage`` or a stage standing in for it (following first inputs)."""
    current = ref
    while stage not in (current.stage, STANDS_IN_FOR.get(current.stage)):
        inputs = store.attrs(current).get("inputs", [])
        if not inputs:
            raise LdsError(f"artifact {ref.stage}/{ref.key} has no {stage} artifact among its inputs")
        current = ArtifactRef(inputs[0]["stage"], inputs[0]["key"])
    return current


def provenance(store: Store, ref: ArtifactRef) -> dict[str, Any]:
    """What an artifact says about the model it came from (carried into every later stage)."""
    return {k: v for k, v in store.attrs(ref).items() if k in PROVENANCE_KEYS}


def log(message: str) -> None:
    click.echo(message, err=True)


FAILURE_LIMIT = 5  # a stage stops when its first this-many items all failed (something is wrong with every item)


def run_stage(
    store: Store,
    stage: str,
    params: dict,
    input_keys: Iterable[str],
    inputs: list[ArtifactRef],
    items: list[str],
    compute_item: Callable[[str], ItemResult],
    attrs: Callable[[], dict] | dict,
    manifest: Path | None,
    finish: Callable[[Any], dict | None] | None = None,
) -> ArtifactRef:
    """Find the artifact for these inputs and parameters, or make it, resuming an interrupted run.

    ``compute_item(item)`` returns (arrays, item attributes, sub-group attributes). ``finish(writer)``
    may add whole-artifact arrays and returns extra root attributes. ``attrs`` may be a callable so
    that its cost (loading a model, say) is paid only when there is work to do. An item that raises
    (an ItemError, or any unexpected exception) is recorded as failed with its reason and the others go
    on, while an LdsError about the input or environment stops the stage at once; the stage then stops without
    publishing, and the next run computes only the failed (and never attempted) items.
    """
    ref = ArtifactRef(stage, artifact_key(stage, STAGE_VERSIONS[stage], params, input_keys))
    if not store.exists(ref):
        with store.lock(ref):
            if not store.exists(ref):  # another process may have finished it while we waited
                make_artifact(store, ref, params, inputs, items, compute_item, attrs, finish)
                write_manifest(manifest, store, ref, params, items)
                return ref
    log(f"{stage}: cached {store.path(ref)}")
    store.record("reused", ref, items=len(items))
    write_manifest(manifest, store, ref, params, items)
    return ref


def make_artifact(store, ref, params, inputs, items, compute_item, attrs, finish) -> None:
    """The uncached half of run_stage: compute the missing items, record each, publish when all are there."""
    from tqdm import tqdm

    started = time.perf_counter()
    root_attrs = {"params": params, **(attrs() if callable(attrs) else attrs)}
    writer = store.writer(ref, root_attrs, inputs)
    done = writer.done & set(items)
    todo = [item for item in items if item not in done]
    if done:
        log(f"{ref.stage}: resuming, {len(done)} of {len(items)} items already done")
        store.record("resumed", ref, items=len(done))
    failed: dict[str, str] = {}
    for count, item in enumerate(tqdm(todo, desc=ref.stage, unit="image", disable=not sys.stderr.isatty()), 1):
        item_started = time.perf_counter()
        try:
            arrays, item_attrs, group_attrs = compute_item(item)
            written = writer.write_item(item, arrays, item_attrs, group_attrs)
        except Exception as error:  # one bad image must not cost the others: record it and go on
            if isinstance(error, LdsError) and not isinstance(error, ItemError):
                raise  # the input or environment is wrong for every item: say so at once
            failed[item] = reason = one_line(error)
            store.record("failed", ref, item, error=reason, error_type=type(error).__name__)
            log(f"{ref.stage}: {item} failed: {type(error).__name__}: {reason}")
            if not isinstance(error, ItemError) and len(failed) == 1:
                log(traceback.format_exc().rstrip())
            if len(failed) == count == FAILURE_LIMIT:
                raise LdsError(f"{ref.stage}: the first {count} items all failed, stopping (first: {todo[0]}: {failed[todo[0]]})") from None
            continue
        if written:
            store.record("computed", ref, item, seconds=round(time.perf_counter() - item_started, 3))
    if failed:
        names = ", ".join(list(failed)[:5]) + (" ..." if len(failed) > 5 else "")
        raise LdsError(
            f"{ref.stage}: {len(failed)} of {len(items)} items failed ({names}); the {len(items) - len(failed)} others are "
            "kept and a re-run retries only the failed ones (reasons: `lds summary`)"
        )
    extra = finish(writer) if finish else None
    path = writer.publish(items, extra)
    seconds = time.perf_counter() - started
    store.record("published", ref, items=len(items), computed=len(todo), seconds=round(seconds, 3))
    log(f"{ref.stage}: made {path} ({len(todo)} items in {seconds:.1f}s)")
