"""`lds evaluate`: metrics over all shards of a run, stored and written as JSON."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from pipeline.store import ArraySpec, Store
from stages.common import (
    manifest_option, provenance, read_manifest, run_stage, store_option, upstream, write_json_atomic,
)


def _pad_add(total: np.ndarray, part: np.ndarray) -> np.ndarray:
    size = max(total.shape[0], part.shape[0])
    grown = np.zeros((size, size), dtype=np.int64)
    grown[: total.shape[0], : total.shape[0]] += total
    grown[: part.shape[0], : part.shape[0]] += part
    return grown


@click.command()
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Decode manifests (one per shard).")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the metrics as JSON here.")
@store_option
@manifest_option
def evaluate(input_manifests, metrics_path, store_root, manifest):
    """X-Y regression R² of X_ortho and, where labels exist, oracle and matched mIoU."""
    from pipeline.metrics import aligned_scores, confusion_matrix, matched_scores, oracle_labels, xy_regression_r2

    store = Store(store_root)
    sources = [read_manifest(path) for path in input_manifests]
    shards = [
        (store.open(ref)["items"], store.open(upstream(store, ref, "solve"))["items"],
         store.open(upstream(store, ref, "preprocess"))["items"], store.attrs(ref)["items"])
        for ref in sources
    ]
    results: dict = {}

    def finish(writer):
        r2, matched, oracle = [], [], np.zeros((0, 0), dtype=np.int64)
        for decoded, solved, images, items in shards:
            for item in items:
                r2.append(xy_regression_r2(solved[item]["X_ortho"][...]))
                if "labels" not in images[item]:
                    continue
                truth, regions = images[item]["labels"][...], decoded[item]["labels"][...]
                confusion = confusion_matrix(truth, regions, int(truth.max()) + 1, int(regions.max()) + 1)
                matched.append(matched_scores(confusion)["miou"])
                guess = oracle_labels(regions, truth)
                oracle = _pad_add(oracle, confusion_matrix(truth, guess, int(truth.max()) + 1, int(truth.max()) + 1))
        results.update({"images": len(r2), "xy_regression_r2": float(np.mean(r2))})
        arrays = {"xy_r2": ArraySpec(np.array(r2), ("image",), {"description": "X-Y regression R² per image"})}
        if matched:
            oracle_scores = aligned_scores(oracle)
            results.update({
                "matched_miou": float(np.mean(matched)),
                "oracle_miou": oracle_scores["miou"],
                "oracle_pixel_accuracy": oracle_scores["pixel_accuracy"],
            })
            arrays["oracle_confusion"] = ArraySpec(oracle, ("truth", "prediction"), {"description": "oracle-decoded confusion"})
        writer.write_root(arrays)
        return {"metrics": results}

    model_attrs = provenance(store, sources[0])
    ref = run_stage(store, "evaluate", {}, [s.key for s in sources], sources, [], lambda item: None, model_attrs, manifest, finish)
    if metrics_path is not None:
        metrics = store.attrs(ref)["metrics"]
        write_json_atomic(metrics_path, {**model_attrs, **metrics, "artifact": str(store.path(ref))})
        click.echo(f"metrics: {metrics}")
