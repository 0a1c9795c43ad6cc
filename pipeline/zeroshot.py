"""Zero-shot labels for regions (METHOD.md section 5): each region's mean CLIP feature against the text
embeddings of class names, averaged over prompt templates; a region whose best score is below the
threshold is background, any other takes the most similar class.

Scores are either the cosine similarity (METHOD.md's rule, threshold 0.7) or CLIP's own zero-shot
probability: softmax over the classes of the logit scale times the cosine similarity.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

BACKGROUND = "background"
SCORES = ("cosine", "probability")
THRESHOLD = 0.7
# A subset of the 80 ImageNet prompt templates of CLIP (Radford et al. 2021), the kind MaskCLIP averages over.
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a bad photo of a {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a low resolution photo of a {}.",
    "a rendering of a {}.",
    "a painting of a {}.",
    "art of the {}.",
    "there is a {} in the scene.",
    "this is a {} in the scene.",
)


def unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def class_embeddings(encode: Callable[[list[str]], np.ndarray], names: list[str],
                     templates: tuple[str, ...] = PROMPT_TEMPLATES) -> np.ndarray:
    """(classes, dims): per class, the unit mean of its prompts' unit text embeddings (CLIP's ensembling)."""
    return np.stack([unit(unit(encode([t.format(name) for t in templates])).mean(0)) for name in names])


def label_set(names: list[str]) -> tuple[list[str], list[str], int]:
    """(stored class names, the names prompted, the label of background). 'background' is never
    prompted: when it is a class it labels the regions below threshold, else it is added at the end."""
    stored = list(names) if BACKGROUND in names else [*names, BACKGROUND]
    return stored, [n for n in stored if n != BACKGROUND], stored.index(BACKGROUND)


def region_means(features: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features (tokens, dims) and a region id per token -> (region ids present, their mean features)."""
    ids, inverse = np.unique(regions, return_inverse=True)
    sums = np.zeros((len(ids), features.shape[1]))
    np.add.at(sums, inverse, features)
    return ids, sums / np.bincount(inverse)[:, None]


def region_scores(means: np.ndarray, text: np.ndarray, score: str, logit_scale: float) -> np.ndarray:
    """(regions, classes): cosine similarity, or softmax over classes of logit_scale times it."""
    cosine = unit(means) @ unit(text).T
    if score == "cosine":
        return cosine
    logits = logit_scale * cosine
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def zero_shot_labels(features: np.ndarray, regions: np.ndarray, text: np.ndarray, classes: list[int],
                     background: int, threshold: float = THRESHOLD, score: str = "cosine",
                     logit_scale: float = 100.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (tokens, dims), regions (y, x) and one text embedding per prompted class (with its
    label in ``classes``) -> labels (y, x), then per region present (in id order) its label and best score."""
    ids, means = region_means(features, regions.ravel())
    scores = region_scores(means, text, score, logit_scale)
    best = scores.max(1)
    chosen = np.where(best >= threshold, np.asarray(classes)[scores.argmax(1)], background)
    labels = chosen[np.searchsorted(ids, regions)]
    return labels.astype(np.int32), chosen.astype(np.int32), best


def to_dataset_labels(labels: np.ndarray, names: list[str], classes: list[str]) -> np.ndarray:
    """Labels indexing ``names`` -> indices of the same names in a dataset's ``classes``; a name the dataset
    lacks becomes len(classes) (a prediction of no class: always wrong)."""
    lookup = np.array([classes.index(n) if n in classes else len(classes) for n in names])
    return lookup[labels]
