"""Zero-shot labels for regions (METHOD.md section 5): each region's mean CLIP feature against the text
embeddings of class names, averaged over prompt templates; a region whose best score is below the
threshold is background, any other takes the most similar class.

Scores are either the cosine similarity (METHOD.md's rule, threshold 0.7) or CLIP's own zero-shot
probability: softmax over the classes of the logit scale times the cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.errors import LdsError
from pipeline.settings import setting

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


@dataclass(frozen=True)
class ZeroshotParams:
    """`lds zeroshot` (METHOD.md section 5: cosine similarity, below 0.7 background). Which CLIP (--clip,
    --weights) the workflow says per model (zeroshot.clip, zeroshot.weights: its own keys)."""

    classes: tuple[str, ...] = setting((), schema={"items": {"type": "string", "pattern": "^[^,]+$"}},
                                       help="Comma-separated class names  [default: the dataset's]; 'background' is never prompted.")
    threshold: float = setting(THRESHOLD, help="Regions scoring below this are background.")
    score: str = setting("cosine", choices=SCORES, help="cosine: cosine similarity (METHOD.md); probability: CLIP's softmax over the classes.")


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


@dataclass(frozen=True)
class ClassLabels:
    """The labels of a zero-shot artifact: the class names stored (labels index them), those prompted, and
    the label of background (never prompted)."""

    names: list[str]
    prompted: list[str]
    background: int

    @classmethod
    def of(cls, names: list[str]) -> "ClassLabels":
        stored, prompted, background = label_set(names)
        if not prompted:
            raise LdsError(f"no class to label regions with among {', '.join(names)}; give --classes a,b,c")
        return cls(stored, prompted, background)

    @property
    def ids(self) -> list[int]:
        """The label of each prompted class."""
        return [self.names.index(name) for name in self.prompted]


def class_names(params: ZeroshotParams, dataset_attrs: dict) -> list[str]:
    """The names to label with: ``params.classes``, else the dataset's (its preprocess attributes)."""
    names = list(params.classes) or dataset_attrs.get("classes")
    if not names:
        raise LdsError(f"dataset {dataset_attrs.get('dataset')} names no classes; give --classes a,b,c")
    return names


def clip_repo(repo: str | None, weights, model_attrs: dict) -> str | None:
    """The Hugging Face repository of the CLIP whose vision tower made the extract: ``repo``, else the
    model's own (clip-vitb16, hf: CLIP repositories); None with local ``weights``; an error without either."""
    from pipeline.models import default_clip_repo

    repo = repo or default_clip_repo(model_attrs)
    if weights is None and repo is None:
        raise LdsError(
            f"model {model_attrs.get('model')} is not a known CLIP model; give --clip REPO or --weights FOLDER of the "
            "CLIP whose vision tower made the extract"
        )
    return repo


def zeroshot_settings(params: ZeroshotParams, labels: ClassLabels, repo: str | None, weights_sha256: str | None) -> dict:
    """The params of a zero-shot artifact (part of its key): the CLIP (a repository, or local weights by
    their hash), the labels, the rule and the prompt templates."""
    return {"clip": None if weights_sha256 else repo, "weights_sha256": weights_sha256, "classes": labels.names,
            "threshold": params.threshold, "score": params.score, "templates": list(PROMPT_TEMPLATES)}


def last_layer_values(item_group, clip) -> np.ndarray:
    """The value vectors (y, x, heads x head_dim) of an image's last stored attention layer (an extract item
    group), checked against the CLIP whose vision tower is to project them."""
    from pipeline.extract.core import join_heads, stored_array

    layers = sorted(item_group["layers"].groups())
    values = stored_array(layers[-1][1], "v")
    if values.ndim != 4:
        raise LdsError("zero-shot labels need the value vectors of a CLIP ViT; this extract is Stable Diffusion's")
    values = join_heads(values)
    if len(layers) != clip.layers or values.shape[-1] != clip.width:
        raise LdsError(
            f"the extract holds {len(layers)} layers of width {values.shape[-1]} but CLIP ({clip.source}) has "
            f"{clip.layers} of width {clip.width}: extract with the CLIP whose text tower labels the regions"
        )
    return values


def zeroshot_image(values: np.ndarray, regions: np.ndarray, size: tuple[int, int], clip, text: np.ndarray,
                   labels: ClassLabels, params: ZeroshotParams) -> dict:
    """What `lds zeroshot` stores for one image: from the last layer's value vectors (y, x, dims), the
    decode's regions per token (resized to the values' grid when it differs) and the (height, width) of the
    preprocessed image, a class per token and per pixel, and each region's class and best score. ``clip``
    projects the values into its joint space (``project_values``) and has a ``logit_scale``; ``text``: a
    unit text embedding per prompted class."""
    from pipeline.decode.kmeans import upsample_labels
    from pipeline.store import ArraySpec

    grid = values.shape[:2]
    if regions.shape != grid:
        regions = upsample_labels(regions, grid)
    features = clip.project_values(values.reshape(-1, values.shape[-1]))
    tokens, region_labels, best = zero_shot_labels(features, regions, text, labels.ids, labels.background, params.threshold,
                                                   params.score, clip.logit_scale)
    return {
        "labels_tokens": ArraySpec(tokens, ("y", "x"), {"description": "class per token (indices into the artifact's classes)"}),
        "labels": ArraySpec(upsample_labels(tokens, size), ("y", "x"), {"description": "class per pixel of the preprocessed image"}),
        "region_labels": ArraySpec(region_labels, ("region",), {"description": "class of each region present, by region id"}),
        "region_scores": ArraySpec(best, ("region",), {"description": f"best {params.score} score of each region"}),
    }
