"""`lds cluster`: one K-Means over the tokens of every image of a dataset (all shards), so that a
cluster means the same thing in every image (dataset-level semantic segmentation)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from pipeline.errors import LdsError
from pipeline.store import ArraySpec, Store
from stages.common import manifest_option, provenance, read_manifest, run_stage, store_option, upstream
from stages.decode import ClustersType

SAMPLE_TOKENS = 10_000  # tokens drawn across the dataset to choose K by silhouette
BATCH_TOKENS = 4096  # tokens per MiniBatchKMeans step (whole images, concatenated)


@click.command()
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Solve manifests (one per shard).")
@click.option("--clusters", type=ClustersType(), default=27, show_default=True, help="K, or 'auto' (2..10 by silhouette on a sample of tokens).")
@click.option("--components", type=click.IntRange(1), default=None, help="Columns of U S kept from the dataset's low-rank SVD of X [default: K, or every channel with auto].")
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True, help="Passes of MiniBatchKMeans over the dataset.")
@click.option("--seed", type=int, default=0, show_default=True)
@store_option
@manifest_option
def cluster(input_manifests, clusters, components, epochs, seed, store_root, manifest):
    """Project every image's X on the dataset's leading singular vectors, fit MiniBatchKMeans on all
    tokens, and store each image's cluster map (tokens and pixels)."""
    from pipeline.decode import batched_rows, best_k, dataset_projection, fit_dataset_kmeans, token_features, upsample_labels

    store = Store(store_root)
    sources = [read_manifest(path) for path in input_manifests]
    shards = [(store.open(ref)["items"], store.open(upstream(store, ref, "preprocess"))["items"], store.attrs(ref)["items"]) for ref in sources]
    everything = [(solved, images, item) for solved, images, items in shards for item in items]
    if len({item for _, _, item in everything}) < len(everything):
        raise LdsError("the solve manifests given to lds cluster share images; give each shard once")
    channels = everything[0][0][everything[0][2]]["X"].shape[0]
    width = min(components or (channels if clusters == "auto" else clusters), channels)
    params = {"method": "minibatch-kmeans", "clusters": clusters, "components": width, "epochs": epochs, "seed": seed}
    fitted: dict = {}

    def features(solved, item: str) -> np.ndarray:
        return token_features(solved[item]["X"][...]) @ fitted["projection"]

    def fit() -> None:
        fitted["projection"] = dataset_projection((solved[item]["X"][...] for solved, _, item in everything), width)
        k = clusters
        if clusters == "auto":
            rng = np.random.default_rng(seed)
            share = max(1, SAMPLE_TOKENS // len(everything))
            sample = np.concatenate([rng.permutation(features(solved, item))[:share] for solved, _, item in everything])
            k, fitted["silhouettes"] = best_k(sample, seed=seed)
        tokens = sum(int(np.prod(solved[item]["X"].shape[1:])) for solved, _, item in everything)
        if k < 2 or tokens < k:
            raise LdsError(f"cannot make {k} clusters of the {tokens} tokens of {len(everything)} images")
        fitted["model"] = fit_dataset_kmeans(
            lambda: batched_rows((features(solved, item) for solved, _, item in everything), BATCH_TOKENS), k, seed, epochs
        )

    by_item = {item: (solved, images) for solved, images, item in everything}

    def compute(item: str):
        if not fitted:
            fit()
        solved, images = by_item[item]
        shape = solved[item]["X"].shape[1:]
        tokens = fitted["model"].predict(features(solved, item)).reshape(shape).astype(np.int32)
        pixels = upsample_labels(tokens, images[item]["rgb"].shape[:2])
        return {
            "semantic_tokens": ArraySpec(tokens, ("y", "x"), {"description": "dataset-level cluster per token"}),
            "semantic": ArraySpec(pixels, ("y", "x"), {"description": "dataset-level cluster per pixel of the preprocessed image"}),
        }, {}, {}

    def finish(writer):
        if not fitted:  # every item was written by an interrupted run: refit to store the model
            fit()
        model = fitted["model"]
        writer.write_root({
            "centroids": ArraySpec(model.cluster_centers_, ("cluster", "component"), {"description": "K-Means centres in the projected space"}),
            "projection": ArraySpec(fitted["projection"], ("channel", "component"), {"description": "V of the dataset's SVD: features = X tokens @ V"}),
        })
        return {"clusters_chosen": int(model.n_clusters), **({"silhouettes": {str(k): v for k, v in fitted["silhouettes"].items()}} if "silhouettes" in fitted else {})}

    items = [item for _, _, item in everything]
    run_stage(store, "cluster", params, [s.key for s in sources], sources, items, compute, provenance(store, sources[0]), manifest, finish)
