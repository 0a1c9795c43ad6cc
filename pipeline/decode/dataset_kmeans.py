"""Dataset-level K-Means (METHOD.md section 5) on dask arrays of token features, so the tokens of a
dataset never need to fit in memory: the dataset's low-rank SVD from its Gram matrix, K-Means (K given
or chosen by silhouette) started from a seeded sample of tokens, then Lloyd iterations over every token,
each one a fixed-order dask reduction of per-block sums. Same data and seed, same centres and labels,
whichever scheduler runs the graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.dask_compute import tree_reduce
from pipeline.decode.kmeans import best_k, clusters_schema, one_thread
from pipeline.errors import LdsError
from pipeline.settings import setting

SAMPLE_TOKENS = 10_000  # tokens drawn across the dataset to start K-Means and to choose K by silhouette
MAX_ITERATIONS = 100  # Lloyd passes over the dataset at most
TOLERANCE = 1e-4  # stop when the centres move less than this times the features' mean variance (as sklearn)
PREDICT_IMAGES = 64  # images whose labels are computed together (one dask computation)


@dataclass(frozen=True)
class ClusterParams:
    """`lds cluster` (METHOD.md section 5: K = 27 on the first K columns of U S). The workflow passes the
    config's decode.dataset_clusters as K and decode.seed as the seed."""

    clusters: int | str = setting(27, minimum=2, schema=clusters_schema(), help="K, or 'auto' (2..10 by silhouette on a sample of tokens).")
    components: int | None = setting(None, minimum=1, help="Columns of U S clustered (solve-dataset: of X_ortho; per-image: of the dataset's SVD of X) [default: K, or every channel with auto].")
    iterations: int = setting(MAX_ITERATIONS, minimum=1, help="Lloyd passes over the dataset at most (fewer when the centres settle).")
    seed: int = setting(0, help="Random state of the token sample and of K-Means on it.")

    def width(self, channels: int) -> int:
        """The features clustered per token, of an input with ``channels`` channels."""
        return min(self.components or (channels if self.clusters == "auto" else self.clusters), channels)


@dataclass
class DatasetKMeans:
    """Fitted centres (cluster, component), the Lloyd passes made, and the silhouette of each K tried
    (auto-K only)."""

    centres: np.ndarray
    iterations: int
    silhouettes: dict[int, float] = field(default_factory=dict)


def token_rows(x):
    """A dask array (component, y, x) -> (y * x, component) float64: one row per token."""
    return x.reshape(x.shape[0], -1).T.astype(np.float64)


def dataset_projection(rows, components: int) -> np.ndarray:
    """The low-rank SVD of the token rows (dask, tokens x dims) from their Gram matrix: V (dims,
    components) such that rows @ V are the first ``components`` columns of U S."""
    gram = (rows.T @ rows).compute()
    eigenvalues, vectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1][:components]
    return vectors[:, order]


def token_sample(features, size: int, seed: int) -> np.ndarray:
    """Up to ``size`` rows of a dask array drawn without replacement by ``seed``, in row order."""
    count = features.shape[0]
    index = np.sort(np.random.default_rng(seed).choice(count, size=min(size, count), replace=False))
    return features[index].compute()


def nearest(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The index of each row's nearest centre (squared Euclidean distance)."""
    return ((centres**2).sum(1) - 2 * rows @ centres.T).argmin(1).astype(np.int32)


def block_sums(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per centre, the sum of the rows nearest to it and their count: (cluster, dims + 1)."""
    labels, k = nearest(rows, centres), len(centres)
    columns = [np.bincount(labels, weights=column, minlength=k) for column in rows.T]
    return np.stack([*columns, np.bincount(labels, minlength=k).astype(np.float64)], axis=1)


def summed(parts: list[np.ndarray]) -> np.ndarray:
    """Partial sums added in the order given."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def lloyd(features, centres: np.ndarray, max_iterations: int, tolerance: float) -> tuple[np.ndarray, int]:
    """Lloyd iterations over every row of a dask array (tokens, dims) from ``centres``: the new
    centres and the passes made. A centre that gets no token keeps its place."""
    from dask import delayed

    blocks = features.rechunk({1: -1}).to_delayed().ravel()
    for iteration in range(1, max_iterations + 1):
        sums = tree_reduce([delayed(block_sums)(block, centres) for block in blocks], summed).compute()
        counts = sums[:, -1:]
        moved = np.where(counts > 0, sums[:, :-1] / np.maximum(counts, 1), centres)
        shift = float(((moved - centres) ** 2).sum())
        centres = moved
        if shift <= tolerance:
            break
    return centres, iteration


def fit_dataset_kmeans(
    features, clusters: int | str, seed: int = 0, max_iterations: int = MAX_ITERATIONS, sample_size: int = SAMPLE_TOKENS
) -> DatasetKMeans:
    """K-Means over every row of a dask array (tokens, dims), K = ``clusters`` or ``"auto"`` (2..10
    by silhouette on the sample): K-Means on a seeded sample of tokens, then Lloyd on all of them."""
    from sklearn.cluster import KMeans

    sample = token_sample(features, sample_size, seed)
    k, silhouettes = best_k(sample, seed=seed) if clusters == "auto" else (int(clusters), {})
    if k < 2 or features.shape[0] < k:
        raise LdsError(f"cannot make {k} clusters of {features.shape[0]} tokens")
    with one_thread():
        start = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(sample).cluster_centers_
    tolerance = TOLERANCE * float(np.var(sample, axis=0).mean())
    centres, iterations = lloyd(features, start, max_iterations, tolerance)
    return DatasetKMeans(centres, iterations, silhouettes)


def predict(features, centres: np.ndarray):
    """The nearest centre of every row of a dask array (tokens, dims), as a dask array (tokens,)."""
    return features.rechunk({1: -1}).map_blocks(nearest, centres=centres, drop_axis=1, dtype=np.int32)


class DatasetClustering:
    """`lds cluster`'s work: one K-Means over every token of ``items``, whose features ``features(item)`` gives
    as a dask array (component, y, x), read lazily. ``dataset_level``: X_ortho of `lds solve-dataset`
    artifacts (U S of one SVD over the dataset), its first ``width`` columns clustered as they are; else X of
    per-image solves, projected on the dataset's leading ``width`` singular vectors (their channels mean
    something else in every image). ``channels``: the input's channels (X's).

    ``fit`` makes the model (and returns the root attributes), ``image`` an image's cluster maps, and
    ``root_arrays`` the centres (and projection): run_stage's ``attrs``, ``compute_item`` and ``finish``."""

    def __init__(self, params: ClusterParams, features: Callable[[str], Any], items: list[str], dataset_level: bool, channels: int):
        self.params, self.features, self.items, self.dataset_level = params, features, items, dataset_level
        self.width = params.width(channels)
        self.model: DatasetKMeans | None = None
        self.projection: np.ndarray | None = None
        self.predicted: dict[str, np.ndarray] = {}

    @property
    def feature_name(self) -> str:
        return "X_ortho" if self.dataset_level else "X projected on the dataset's SVD"

    def settings(self) -> dict:
        """The params of the artifact (part of its key)."""
        params = self.params
        return {"method": "kmeans-lloyd", "features": self.feature_name, "clusters": params.clusters, "components": self.width,
                "iterations": params.iterations, "seed": params.seed}

    def rows(self, item: str):
        """One image's tokens (token, component) that K-Means sees, as a dask array."""
        if self.dataset_level:
            return token_rows(self.features(item)[: self.width])
        return token_rows(self.features(item)) @ self.projection

    def fit(self) -> dict:
        """The K-Means (and, on per-image solves, the dataset's projection) -> the root attributes it adds."""
        import dask.array as da

        if not self.dataset_level:
            self.projection = dataset_projection(da.concatenate([token_rows(self.features(item)) for item in self.items]), self.width)
        params = self.params
        self.model = fit_dataset_kmeans(da.concatenate([self.rows(item) for item in self.items]), params.clusters, params.seed, params.iterations)
        silhouettes = {"silhouettes": {str(k): v for k, v in self.model.silhouettes.items()}} if self.model.silhouettes else {}
        return {"basis": "dataset" if self.dataset_level else "per-image", "clusters_chosen": len(self.model.centres),
                "kmeans_iterations": self.model.iterations, **silhouettes}

    def labels(self, item: str):
        """The cluster of each token of one image (y, x), as a dask array."""
        return predict(self.rows(item), self.model.centres).reshape(self.features(item).shape[1:])

    def tokens(self, item: str) -> np.ndarray:
        """One image's cluster per token (y, x), computed with the next images (PREDICT_IMAGES at once); an
        image that fails the batch is computed alone, so that it fails alone."""
        import dask

        if item not in self.predicted:
            batch = self.items[self.items.index(item) :][:PREDICT_IMAGES]
            try:
                self.predicted.update(zip(batch, dask.compute(*[self.labels(name) for name in batch])))
            except Exception:  # a bad image fails alone, not its whole batch
                self.predicted[item] = self.labels(item).compute()
        return self.predicted.pop(item)

    def image(self, item: str, size: tuple[int, int]) -> dict:
        """What `lds cluster` stores for one image of (height, width) ``size``: its cluster per token and per pixel."""
        return cluster_maps(self.tokens(item), size)

    def root_arrays(self) -> dict:
        """The K-Means centres (and, on per-image solves, the projection V), stored at the artifact's root."""
        from pipeline.store import ArraySpec

        arrays = {"centroids": ArraySpec(self.model.centres, ("cluster", "component"), {"description": f"K-Means centres in the space of {self.feature_name}"})}
        if self.projection is not None:
            arrays["projection"] = ArraySpec(self.projection, ("channel", "component"), {"description": "V of the dataset's SVD: features = X tokens @ V"})
        return arrays


def cluster_maps(tokens: np.ndarray, size: tuple[int, int]) -> dict:
    """An image's dataset-level cluster per token (y, x) and per pixel of its preprocessed (height, width)."""
    from pipeline.decode.kmeans import upsample_labels
    from pipeline.store import ArraySpec

    return {
        "semantic_tokens": ArraySpec(tokens, ("y", "x"), {"description": "dataset-level cluster per token"}),
        "semantic": ArraySpec(upsample_labels(tokens, size), ("y", "x"), {"description": "dataset-level cluster per pixel of the preprocessed image"}),
    }
