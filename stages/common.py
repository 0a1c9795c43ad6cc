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

from pipeline.extract.consumers import ARRAYS, check_stored
from pipeline.errors import ItemError, LdsError, one_line
from pipeline.failures import DEFAULT_MAX_FAILED, MAX_FAILED_ENV, allowed_failures, parse_max_failed
from pipeline.store.hashing import artifact_key
from pipeline.models import PROVENANCE_KEYS
from pipeline.store import ArraySpec, ArtifactRef, Store
from pipeline.store.maintenance import reachable
from stages.versions import STAGE_VERSIONS

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


def read_manifest(path: Path, stage: str | None = None) -> ArtifactRef:
    """The artifact a manifest names; with ``stage``, it must be made by that stage or one standing in for it."""
    try:
        record = json.loads(Path(path).read_text())
        ref = ArtifactRef(record["stage"], record["key"])
    except FileNotFoundError:
        raise LdsError(f"manifest {path} does not exist; run the stage that writes it first") from None
    except (ValueError, KeyError, TypeError) as error:
        raise LdsError(f"manifest {path} is not an lds manifest ({error})") from None
    if stage and stage not in (ref.stage, STANDS_IN_FOR.get(ref.stage)):
        context = click.get_current_context(silent=True)
        reader = f"lds {context.info_name}" if context else "this stage"
        raise LdsError(f"manifest {path} is from lds {ref.stage}, but {reader} reads one from lds {stage}; pass the manifest lds {stage} wrote")
    return ref


def find_manifests(paths: Iterable[Path]) -> dict[Path, ArtifactRef]:
    """The manifests among these JSON files and the JSON files under these folders (others are skipped)."""
    found = {}
    for path in paths:
        for file in sorted(path.rglob("*.json")) if path.is_dir() else [path]:
            try:
                found[file] = read_manifest(file)
            except LdsError:
                continue  # metrics and other JSON files that are not manifests
    return found


def stale_manifests(store: Store, manifests: dict[Path, ArtifactRef], removed: Iterable[ArtifactRef] = ()) -> list[Path]:
    """The manifests naming an artifact that is not in the store, or (called before their removal) one of
    ``removed`` or an artifact made from one of them, through its inputs."""
    doomed = set(removed)
    return [path for path, ref in manifests.items() if not store.exists(ref) or (doomed and reachable(store, [ref]) & doomed)]


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


def check_extract_arrays(store: Store, ref: ArtifactRef, needed: tuple[str, ...], reader: str) -> None:
    """Stop with one line when the extract artifact ``ref`` did not store an array (q, k, v) ``reader`` needs."""
    check_stored(store.attrs(ref)["params"].get("arrays", ARRAYS), needed, reader, f"extract/{ref.key}")


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
    may add whole-artifact arrays and returns extra root attributes (``failed``: images its inputs left
    out). ``attrs`` may be a callable so that its cost (loading a model, say) is paid only when there is
    work to do. An item that raises
    (an ItemError, or any unexpected exception) is recorded as failed with its reason and the others go
    on, while an LdsError about the input or environment stops the stage at once. Up to ``max_failed``
    failed items ($LDS_MAX_FAILED, see pipeline.failures) the artifact is published without them, listed
    in its ``failed`` attribute, and later stages skip them; above it the stage stops without publishing,
    and the next run computes only the failed (and never attempted) items.
    """
    ref = ArtifactRef(stage, artifact_key(stage, STAGE_VERSIONS[stage], params, input_keys))
    if not reusable(store, ref):
        with store.lock(ref):
            if not reusable(store, ref):  # another process may have finished it while we waited
                make_artifact(store, ref, params, inputs, items, compute_item, attrs, finish)
                write_manifest(manifest, store, ref, params, store.attrs(ref)["items"])
                return ref
    log(f"{stage}: cached {store.path(ref)}")
    made = store.attrs(ref)
    store.journal.record("reused", ref, items=len(made["items"]), failed=made.get("failed", {}))
    write_manifest(manifest, store, ref, params, made["items"])
    return ref


def reusable(store: Store, ref: ArtifactRef) -> bool:
    """Published with its arrays: an artifact whose arrays were released after use (extract.keep:
    until-consumed) is made again when a stage asks for it."""
    return store.exists(ref) and "released" not in store.attrs(ref)


def require_arrays(store: Store, ref: ArtifactRef) -> None:
    """Stop with one line when an input artifact's arrays were released after use."""
    released = store.attrs(ref).get("released")
    if released:
        raise LdsError(
            f"the arrays of {ref.stage}/{ref.key} were deleted after use ({released['why']}); re-run its stage "
            f"(`lds {ref.stage}` with the same options, or Snakemake, which does) to make them again"
        )


def make_artifact(store, ref, params, inputs, items, compute_item, attrs, finish) -> None:
    """The uncached half of run_stage: compute the missing items, record each, publish when all are there."""
    from tqdm import tqdm

    started = time.perf_counter()
    for source in inputs:
        require_arrays(store, source)
    limit = parse_max_failed(os.environ.get(MAX_FAILED_ENV, DEFAULT_MAX_FAILED))
    root_attrs = {"params": params, **(attrs() if callable(attrs) else attrs)}
    writer = store.writer(ref, root_attrs, inputs)
    done = writer.done & set(items)
    todo = [item for item in items if item not in done]
    if done:
        log(f"{ref.stage}: resuming, {len(done)} of {len(items)} items already done")
        store.journal.record("resumed", ref, items=len(done))
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
            store.journal.record("failed", ref, item, error=reason, error_type=type(error).__name__)
            log(f"{ref.stage}: {item} failed: {type(error).__name__}: {reason}")
            if not isinstance(error, ItemError) and len(failed) == 1:
                log(traceback.format_exc().rstrip())
            if len(failed) == count == FAILURE_LIMIT:
                raise LdsError(f"{ref.stage}: the first {count} items all failed, stopping (first: {todo[0]}: {failed[todo[0]]})") from None
            continue
        if written:
            store.journal.record("computed", ref, item, seconds=round(time.perf_counter() - item_started, 3))
    allowed = allowed_failures(limit, len(items))
    if len(failed) > allowed:
        names = ", ".join(list(failed)[:5]) + (" ..." if len(failed) > 5 else "")
        raise LdsError(
            f"{ref.stage}: {len(failed)} of {len(items)} items failed ({names}), more than max_failed allows ({allowed}); the "
            f"{len(items) - len(failed)} others are kept and a re-run retries only the failed ones (reasons: `lds summary`)"
        )
    kept = [item for item in items if item not in failed]
    extra = (finish(writer) if finish else None) or {}
    left = {**extra.pop("failed", {}), **failed}  # finish may name images left out earlier (evaluate: its inputs')
    path = writer.publish(kept, {**extra, **({"failed": left} if left else {})})
    seconds = time.perf_counter() - started
    store.journal.record("published", ref, items=len(kept), computed=len(todo) - len(failed), seconds=round(seconds, 3),
                         failed=left, bytes=store.size(ref))
    left_out = f"; {len(failed)} failed items left out (max_failed allows {allowed}): {', '.join(failed)}" if failed else ""
    log(f"{ref.stage}: made {path} ({len(todo)} items in {seconds:.1f}s{left_out})")
