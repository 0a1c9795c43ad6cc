"""Decoding pseudo-eigenvectors into regions (METHOD.md section 5): K-Means per image, with K given or
chosen by silhouette (across a dataset: pipeline.decode.dataset_kmeans); and the batched numpy K-Means of
the object proposals (``kmeans_restarts``)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image

AUTO_KS = tuple(range(2, 11))  # the K tried by auto-K (METHOD.md section 5)


def clusters_schema() -> dict:
    """The JSON schema of K of K-Means as a config key: an integer >= 2, or auto (a new dict each time, so
    that YAML writes no aliases)."""
    return {"oneOf": [{"type": "integer", "minimum": 2}, {"const": "auto"}]}


def one_thread():
    """A context limiting OpenMP and BLAS to one thread: per-image clustering is small, and the spinning
    threads of several processes sharing few cores slow it down a hundredfold."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def token_features(x: np.ndarray) -> np.ndarray:
    """(component, y, x) -> (y * x, component): one row per token."""
    return x.reshape(x.shape[0], -1).T


def kmeans_plus_plus(features: np.ndarray, k: int, restarts: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding of ``restarts`` runs at once -> centres (restart, k, dims): the first centre
    a random token, each next one the best (least summed squared distance to the nearest centre) of
    2 + log k tokens drawn with probability proportional to that squared distance (as scikit-learn)."""
    tokens = len(features)
    trials = 2 + int(np.log(k))
    norms = np.einsum("nd,nd->n", features, features)
    rows = np.arange(restarts)
    centres = np.empty((restarts, k, features.shape[1]))
    chosen = rng.integers(tokens, size=restarts)
    centres[:, 0] = features[chosen]
    closest = np.maximum(norms[chosen, None] + norms[None] - 2 * features[chosen] @ features.T, 0)  # (restart, token)
    for c in range(1, k):
        cumulative = np.cumsum(closest, axis=1)
        drawn = rng.random((restarts, trials)) * cumulative[:, -1:]
        candidates = np.minimum((cumulative[:, None, :] <= drawn[:, :, None]).sum(-1), tokens - 1)  # (restart, trial)
        distance = norms[candidates][..., None] + norms - 2 * features[candidates] @ features.T  # (restart, trial, token)
        distance = np.minimum(closest[:, None], np.maximum(distance, 0))
        best = distance.sum(-1).argmin(1)
        closest = distance[rows, best]
        centres[:, c] = features[candidates[rows, best]]
    return centres


def kmeans_restarts(features: np.ndarray, k: int, restarts: int = 10, seed: int = 0, max_iter: int = 300,
                    tol: float = 1e-4) -> np.ndarray:
    """K-Means (Lloyd) on ``features`` (tokens, dims) from ``restarts`` greedy k-means++ seedings run as one
    batch in numpy -> the labels (tokens,) of the run with the least inertia (the first of equals). A run
    stops when its centres move less (summed squared shift) than ``tol`` times the features' mean variance
    (as scikit-learn's; unchanged labels move them by 0); a cluster left empty keeps its centre; a token
    as near to two centres goes to the first. The Lloyd steps run in float32, the final assignment and
    the inertia in float64. Deterministic for a given ``seed`` (object proposals: pipeline.decode.instances;
    scikit-learn's KMeans, ten seedings, does the regions of ``kmeans_labels``)."""
    features = np.asarray(features, dtype=np.float64)
    tokens = len(features)
    centres = kmeans_plus_plus(features, k, restarts, np.random.default_rng([seed, k]))
    threshold = tol * features.var(axis=0).mean()
    single = features.astype(np.float32)  # the Lloyd steps in float32: half the memory traffic
    with_ones = np.concatenate([single, np.ones((tokens, 1), np.float32)], axis=1)  # one product gives sums and counts
    centres = centres.astype(np.float32)
    active = np.arange(restarts)
    for _ in range(max_iter):
        current = centres[active]
        scores = current @ single.T - 0.5 * np.einsum("rkd,rkd->rk", current, current)[..., None]  # (run, cluster, token)
        nearest = scores == scores.max(1, keepdims=True)
        totals = nearest.astype(np.float32) @ with_ones  # (run, cluster, dims + 1): sums and counts
        tied = totals[..., -1].sum(1) != tokens  # a token as near to two centres: to the first
        if np.any(tied):
            first = scores[tied].argmax(1)
            nearest[tied] = first[:, None, :] == np.arange(k)[None, :, None]
            totals[tied] = nearest[tied].astype(np.float32) @ with_ones
        counts = totals[..., -1:]
        updated = np.where(counts > 0, totals[..., :-1] / np.maximum(counts, 1), current)
        done = ((updated - current).astype(np.float64) ** 2).sum((1, 2)) <= threshold
        centres[active] = updated
        active = active[~done]
        if not len(active):
            break
    centres = centres.astype(np.float64)
    scores = centres @ features.T - 0.5 * np.einsum("rkd,rkd->rk", centres, centres)[..., None]
    labels = scores.argmax(1)  # (run, token)
    inertia = -2 * np.take_along_axis(scores, labels[:, None], 1).sum((1, 2))  # less the summed |x|², the same for every run
    return labels[int(np.argmin(inertia))]


def kmeans_labels(x_ortho: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """K-Means on the token features X_ortho (component, y, x) -> labels (y, x)."""
    from sklearn.cluster import KMeans

    components, height, width = x_ortho.shape
    features = token_features(x_ortho)
    clusters = min(clusters, features.shape[0])
    with one_thread():
        labels = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(features)
    return labels.reshape(height, width).astype(np.int32)


def best_k(features: np.ndarray, ks: Iterable[int] = AUTO_KS, seed: int = 0) -> tuple[int, dict[int, float]]:
    """The K of K-Means with the highest silhouette score on ``features`` (tokens, dims), and every
    K's score. Ks above the number of distinct tokens (or not below the number of tokens) are skipped."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    distinct = len(np.unique(features, axis=0))
    scores = {}
    with one_thread():
        for k in ks:
            if k > distinct or k >= len(features):
                break
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
            scores[k] = float(silhouette_score(features, labels))
    if not scores:
        return 1, {}
    return max(scores, key=scores.get), scores


def kmeans_auto(x_ortho: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int]:
    """Per-image K-Means with K = 2..10 chosen by silhouette -> labels (y, x) and the K chosen."""
    k, _ = best_k(token_features(x_ortho), seed=seed)
    if k == 1:
        return np.zeros(x_ortho.shape[1:], dtype=np.int32), 1
    return kmeans_labels(x_ortho, k, seed), k


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Token labels (y, x) -> pixel labels of ``size`` = (height, width), nearest neighbour."""
    image = Image.fromarray(labels.astype(np.int32), mode="I")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)).astype(np.int32)
