"""`lds cluster`: one K-Means over the tokens of every image of a dataset (all shards).

On `lds solve-dataset` artifacts it clusters the first K components of their X_ortho (U S of one SVD
over the whole dataset, METHOD.md section 5), so a cluster means the same thing in every image: the
paper's dataset-level semantic segmentation. On per-image solves (`lds solve`, `lds baseline`) each
image's channels mean something else, so it projects X on the dataset's leading singular vectors and
clusters that; evaluate and report score it under its own name, "K-Means across per-image solves",
never as the paper's semantic segmentation. X is read lazily from the store as dask arrays; the
computations run on a dask.distributed cluster or local threads."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from pipeline.errors import LdsError
from pipeline.store import ArraySpec, ArtifactRef, Store
from stages.common import (
    dask_scheduler_option, log, manifest_option, provenance, read_manifest, run_stage, store_option, upstream,
)
from stages.decode import ClustersType

PREDICT_IMAGES = 64  # images whose labels are computed together (one dask computation)


def dataset_level_inputs(sources: list[ArtifactRef]) -> bool:
    """True when the inputs are `lds solve-dataset` artifacts (one basis for the whole dataset), False when
    they are per-image solves; a mix is an error."""
    dataset_level = {source.stage == "solve-dataset" for source in sources}
    if len(dataset_level) > 1:
        raise LdsError("lds cluster takes the shards of one solver: all `lds solve-dataset` manifests, or all per-image ones")
    return dataset_level.pop()


@click.command()
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Solve manifests (one per shard): all of `lds solve-dataset`, or all per-image.")
@click.option("--clusters", type=ClustersType(), default=27, show_default=True, help="K, or 'auto' (2..10 by silhouette on a sample of tokens).")
@click.option("--components", type=click.IntRange(1), default=None, help="Columns of U S clustered (solve-dataset: of X_ortho; per-image: of the dataset's SVD of X) [default: K, or every channel with auto].")
@click.option("--iterations", type=click.IntRange(1), default=100, show_default=True, help="Lloyd passes over the dataset at most (fewer when the centres settle).")
@click.option("--seed", type=int, default=0, show_default=True)
@dask_scheduler_option
@store_option
@manifest_option
def cluster(input_manifests, clusters, components, iterations, seed, dask_scheduler, store_root, manifest):
    """Fit K-Means on every token of the dataset (started from a seeded sample, then Lloyd over the
    dataset) on the leading components of X_ortho (solve-dataset) or of the dataset's SVD of X (per-image
    solves), and store each image's cluster map (tokens and pixels)."""
    import dask
    import dask.array as da

    from pipeline.dask_compute import dask_scheduler as scheduler
    from pipeline.dataset_kmeans import dataset_projection, fit_dataset_kmeans, predict, token_rows
    from pipeline.decode import upsample_labels

    store = Store(store_root)
    sources = [read_manifest(path, "solve") for path in input_manifests]
    dataset_level = dataset_level_inputs(sources)
    shards = [(store.open(ref)["items"], store.open(upstream(store, ref, "preprocess"))["items"], store.attrs(ref)["items"]) for ref in sources]
    everything = [(solved, images, item) for solved, images, items in shards for item in items]
    if len({item for _, _, item in everything}) < len(everything):
        raise LdsError("the solve manifests given to lds cluster share images; give each shard once")
    by_item = {item: (solved, images) for solved, images, item in everything}
    items = list(by_item)
    if not dataset_level:
        log("cluster: per-image solves: their channels mean different things in every image, so these clusters are scored as "
            "'K-Means across per-image solves', not the paper's dataset level (solve.level: dataset)")
    channels = everything[0][0][everything[0][2]]["X"].shape[0]
    width = min(components or (channels if clusters == "auto" else clusters), channels)
    features = "X_ortho" if dataset_level else "X projected on the dataset's SVD"
    params = {"method": "kmeans-lloyd", "features": features, "clusters": clusters, "components": width, "iterations": iterations, "seed": seed}
    fitted: dict = {}
    predicted: dict[str, np.ndarray] = {}

    def rows(item: str):
        """One image's tokens (token, component) that K-Means sees, read lazily from the store."""
        solved, _ = by_item[item]
        if dataset_level:
            return token_rows(da.from_zarr(solved[item]["X_ortho"])[:width])
        return token_rows(da.from_zarr(solved[item]["X"])) @ fitted["projection"]

    def fit() -> dict:
        """The K-Means (and, on per-image solves, the dataset's projection); run_stage calls this once,
        before the items, when the artifact is to be made; what it returns joins the root attributes."""
        if not dataset_level:
            fitted["projection"] = dataset_projection(da.concatenate([token_rows(da.from_zarr(by_item[item][0][item]["X"])) for item in items]), width)
        model = fit_dataset_kmeans(da.concatenate([rows(item) for item in items]), clusters, seed, iterations)
        fitted["model"] = model
        silhouettes = {"silhouettes": {str(k): v for k, v in model.silhouettes.items()}} if model.silhouettes else {}
        return {**provenance(store, sources[0]), "basis": "dataset" if dataset_level else "per-image", "clusters_chosen": len(model.centres),
                "kmeans_iterations": model.iterations, **silhouettes}

    def labels(item: str):
        """The cluster of each token of one image (y, x), as a dask array."""
        solved, _ = by_item[item]
        return predict(rows(item), fitted["model"].centres).reshape(solved[item]["X"].shape[1:])

    def compute(item: str):
        if item not in predicted:
            batch = items[items.index(item) :][:PREDICT_IMAGES]
            try:
                predicted.update(zip(batch, dask.compute(*[labels(name) for name in batch])))
            except Exception:  # a bad image fails alone, not its whole batch
                predicted[item] = labels(item).compute()
        tokens = predicted.pop(item)
        _, images = by_item[item]
        pixels = upsample_labels(tokens, images[item]["rgb"].shape[:2])
        return {
            "semantic_tokens": ArraySpec(tokens, ("y", "x"), {"description": "dataset-level cluster per token"}),
            "semantic": ArraySpec(pixels, ("y", "x"), {"description": "dataset-level cluster per pixel of the preprocessed image"}),
        }, {}, {}

    def finish(writer):
        arrays = {"centroids": ArraySpec(fitted["model"].centres, ("cluster", "component"), {"description": f"K-Means centres in the space of {features}"})}
        if not dataset_level:
            arrays["projection"] = ArraySpec(fitted["projection"], ("channel", "component"), {"description": "V of the dataset's SVD: features = X tokens @ V"})
        writer.write_root(arrays)

    with scheduler(dask_scheduler):
        run_stage(store, "cluster", params, [s.key for s in sources], sources, items, compute, fit, manifest, finish)
