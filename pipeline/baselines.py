"""TokenCut and MaskCut baselines on ONE affinity (METHOD.md section 5).

One attention layer (the last, by default) gives one graph W over its tokens:

- ``features``: TokenCut's: cosine similarity of the layer's key features (heads concatenated),
  binarised: 1 where it exceeds tau (0.2), eps (1e-5) elsewhere;
- ``attention``: the layer's key-query attention softmax(Q Kᵀ · scale), symmetrised and averaged over
  heads (no binarisation: every weight is already positive).

The normalised cut of W (Shi and Malik) is the generalised eigenproblem (D - W) x = λ D x, D the
degrees; the eigenvectors after the trivial constant one, smallest eigenvalue first, are the baseline's
X. TokenCut splits the second-smallest eigenvector at its mean, calls the side holding its largest
absolute value the foreground, and keeps the 4-connected component of the foreground holding that
seed. MaskCut repeats this N times: before each further cut the rows and columns of every token already
in a mask are set to eps (for the ``features`` affinity that is what zeroing their features does), the
foreground is the other side when it holds 3 or 4 of the image corners, and a mask overlapping the
previous one at IoU > 0.5, or covering 1% of the image or less, is dropped; each mask loses the tokens of
the masks before it (the reference code, CutLER's ``maskcut.py``, without its CRF post-processing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.extract import LayerAttention, join_heads

AFFINITIES = ("features", "attention")
METHODS = ("tokencut", "maskcut")
DEFAULT_EIGENVECTORS = {"tokencut": 8, "maskcut": 15}  # METHOD.md section 5
DEFAULT_MASKS = {"tokencut": 1, "maskcut": 3}


@dataclass(frozen=True)
class BaselineParams:
    method: str = "tokencut"
    affinity: str = "features"
    eigenvectors: int = 8
    masks: int = 1  # MaskCut's N; TokenCut makes one
    tau: float = 0.2  # binarisation threshold of the features affinity
    eps: float = 1e-5  # weight of the edges below tau, and of every edge of a masked token
    max_overlap: float = 0.5  # MaskCut: a mask overlapping the previous one more than this is dropped
    min_area: float = 0.01  # MaskCut: a mask covering this fraction of the image or less is dropped


@dataclass
class BaselineResult:
    eigenvalues: np.ndarray  # (m,) increasing
    x: np.ndarray  # (m, y, x): the eigenvectors, D-orthonormal
    masks: np.ndarray  # (n, y, x) bool, in the order found
    scores: np.ndarray  # (n,): 1 for the first mask, then 1 - i / N (MaskCut has no confidence)
    edges_above_tau: float | None = None  # features affinity: the fraction of token pairs joined (W = 1)


DEGENERATE_EDGES = 0.99  # a features graph joining more token pairs than this has no cut worth the name


def feature_affinity(features: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """Features (tokens, dims) -> W (tokens, tokens): 1 where cosine similarity > tau, else eps."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return np.where(unit @ unit.T > tau, 1.0, eps)


def attention_affinity(layer: LayerAttention) -> np.ndarray:
    """The mean over heads of (A + Aᵀ) / 2, A = softmax(Q Kᵀ · scale): (tokens, tokens) float64."""
    from pipeline.graphs import summed_symmetrised
    from pipeline.solver_params import GraphOptions

    return summed_symmetrised(layer, GraphOptions("kq", "random-walk")).numpy() / layer.q.shape[0]


def layer_affinity(layer: LayerAttention, params: BaselineParams) -> np.ndarray:
    """The one graph of a layer (head, y, x, dim) that the baseline cuts."""
    if params.affinity == "attention":
        return attention_affinity(layer)
    keys = join_heads(layer.k).astype(np.float64)
    return feature_affinity(keys.reshape(-1, keys.shape[-1]), params.tau, params.eps)


def ncut_eigenvectors(w: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smallest nontrivial solutions of (D - W) x = λ D x: eigenvalues (count,) increasing
    and eigenvectors (tokens, count), D-orthonormal (xᵀ D x = 1)."""
    from scipy.linalg import eigh

    degree = np.diag(w.sum(1))
    count = min(count, len(w) - 1)
    return eigh(degree - w, degree, subset_by_index=[1, count])


def foreground(vector: np.ndarray, grid: tuple[int, int], corner_rule: bool) -> np.ndarray:
    """The foreground of a bipartition (y, x) bool: the side of the mean holding the largest |value| (with
    ``corner_rule``, the other side when that one holds >= 3 image corners), then its 4-connected
    component holding the most extreme token of that side."""
    from scipy import ndimage

    above = (vector > vector.mean()).reshape(grid)
    side = 1.0 if vector[np.argmax(np.abs(vector))] > vector.mean() else -1.0
    mask = above if side > 0 else ~above
    if corner_rule and mask[[0, 0, -1, -1], [0, -1, 0, -1]].sum() >= 3:
        side, mask = -side, ~mask
    components, _ = ndimage.label(mask)
    seed = np.unravel_index(np.argmax(side * vector), grid)
    return components == components[seed]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def maskcut(w: np.ndarray, grid: tuple[int, int], params: BaselineParams) -> list[np.ndarray]:
    """MaskCut's N masks (y, x) bool, in the order found; dropped masks are empty."""
    painted = np.zeros(len(w), dtype=bool)
    found: list[np.ndarray] = []
    previous = None
    for _ in range(params.masks):
        graph = w.copy()
        graph[painted] = params.eps
        graph[:, painted] = params.eps
        _, vectors = ncut_eigenvectors(graph, 1)
        mask = foreground(vectors[:, 0], grid, corner_rule=True)
        if previous is not None and (iou(mask, previous) > params.max_overlap or mask.mean() <= params.min_area):
            mask = np.zeros(grid, dtype=bool)
        previous = mask
        found.append(mask & ~painted.reshape(grid))
        painted |= mask.ravel()
    return found


def run_baseline(layer: LayerAttention, params: BaselineParams) -> BaselineResult:
    """Eigenvectors and masks of one layer's affinity (TokenCut: one mask; MaskCut: up to N)."""
    grid = layer.grid
    w = layer_affinity(layer, params)
    values, vectors = ncut_eigenvectors(w, params.eigenvectors)
    if params.method == "tokencut":
        masks = [foreground(vectors[:, 0], grid, corner_rule=False)]
    else:
        masks = maskcut(w, grid, params)
    scores = 1 - np.arange(len(masks)) / len(masks)
    kept = [i for i, mask in enumerate(masks) if mask.any()]
    stacked = np.stack([masks[i] for i in kept]) if kept else np.zeros((0, *grid), dtype=bool)
    joined = float((w == 1.0).mean()) if params.affinity == "features" else None
    return BaselineResult(values, vectors.T.reshape(-1, *grid), stacked, scores[kept], joined)


def degenerate_warning(joined: list[float | None], tau: float) -> str | None:
    """A one-line warning when the features graph of some images joins (nearly) every token pair, so
    the cut and its eigenvectors say nothing (keys of some models are all alike at TokenCut's tau)."""
    bad = [value for value in joined if value is not None and value >= DEGENERATE_EDGES]
    if not bad:
        return None
    return (f"in {len(bad)} of {len(joined)} images the features graph joins {min(bad):.0%} or more of the token "
            f"pairs (key cosine similarity > --tau {tau}): the cut is arbitrary there; raise --tau or use "
            "--affinity attention")
