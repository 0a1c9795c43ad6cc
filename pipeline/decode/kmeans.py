"""Decoding pseudo-eigenvectors into regions (METHOD.md section 5): K-Means per image, with K given or
chosen by silhouette (across a dataset: pipeline.decode.dataset_kmeans)."""

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
