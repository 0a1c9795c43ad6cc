"""Decoding pseudo-eigenvectors into regions (METHOD.md section 5)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def kmeans_labels(x_ortho: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """K-Means on the token features X_ortho (component, y, x) -> labels (y, x)."""
    from sklearn.cluster import KMeans

    components, height, width = x_ortho.shape
    features = x_ortho.reshape(components, -1).T
    clusters = min(clusters, features.shape[0])
    labels = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(features)
    return labels.reshape(height, width).astype(np.int32)


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Token labels (y, x) -> pixel labels of ``size`` = (height, width), nearest neighbour."""
    image = Image.fromarray(labels.astype(np.int32), mode="I")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST)).astype(np.int32)
