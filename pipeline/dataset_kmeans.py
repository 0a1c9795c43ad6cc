"""Dataset-level K-Means (METHOD.md section 5) on dask arrays of token features, so the tokens of a
dataset never need to fit in memory: the dataset's low-rank SVD from its Gram matrix, K-Means (K given
or chosen by silhouette) started from a seeded sample of tokens, then Lloyd iterations over every token,
each one a fixed-order dask reduction of per-block sums. Same data and seed, same centres and labels,
whichever scheduler runs the graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.dask_compute import tree_reduce
from pipeline.decode import best_k, one_thread
from pipeline.errors import LdsError

SAMPLE_TOKENS = 10_000  # tokens drawn across the dataset to start K-Means and to choose K by silhouette
MAX_ITERATIONS = 100  # Lloyd passes over the dataset at most
TOLERANCE = 1e-4  # stop when the centres move less than this times the features' mean variance (as sklearn)


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
