"""TokenCut and MaskCut baselines on ONE affinity (METHOD.md section 5).

One attention layer (the last, by default) gives one graph W over its tokens:

- ``features``: TokenCut's: cosine similarity of the layer's key features (heads concatenated),
  binarised: 1 where it exceeds tau (TokenCut 0.2, MaskCut 0.15), eps (1e-5) elsewhere. With ``centre``
  the image's mean key is subtracted first: DINOv2's keys share one large common direction (cosine
  similarity > 0.55 for every token pair), so without it the graph is complete and its cut arbitrary;
- ``attention``: the layer's key-query attention softmax(Q Kᵀ · scale), symmetrised and averaged over
  heads (no binarisation: every weight is already positive).

Artifact tokens (``artifacts``): tokens whose key norm is an outlier, robust z-score (median and
normal-scaled MAD over the image) above the threshold, the high-norm tokens of DINOv2-like models. They
leave the graph (and the mean key); after the cut each takes the eigenvector value of its spatially
nearest kept token, so masks cover them as their neighbours.

The normalised cut of W (Shi and Malik) is the generalised eigenproblem (D - W) x = λ D x, D the
degrees; the eigenvectors after the trivial constant one, smallest eigenvalue first, are the baseline's
X. TokenCut splits the second-smallest eigenvector at its mean, calls the side holding its largest
absolute value the foreground, and keeps the 4-connected component of the foreground holding that
seed. MaskCut repeats this N times, every further cut of the tokens in no mask yet (their subgraph;
CutLER's ``maskcut.py`` keeps found tokens at eps weight instead, which makes them the cheapest cut once
the rest holds no clear object, so its IoU > 0.5 repeat rule drops the mask: on DINOv2 that left 1.5-2
masks per image where the subgraph gives 2.5-2.7), and the foreground is the other side when it holds 3
or 4 of the image corners. As in CutLER, every one of the N cuts is kept however small (no CRF
post-processing here); ``min_area`` can drop small further masks (on 40 coco-mini photos a 1% floor
left 2.6 masks per image with the same AP, the masks it dropped being ranked last).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from pipeline.extract.core import LayerAttention, join_heads
from pipeline.settings import setting

AFFINITIES = ("features", "attention")
METHODS = ("tokencut", "maskcut")
DEFAULT_EIGENVECTORS = {"tokencut": 8, "maskcut": 15}  # METHOD.md section 5
DEFAULT_MASKS = {"tokencut": 1, "maskcut": 3}
DEFAULT_TAU = {"tokencut": 0.2, "maskcut": 0.15}  # TokenCut's and CutLER's MaskCut's
DENSE_TOKENS = 256  # graphs of at most this many tokens are solved densely, larger ones with Lanczos


@dataclass(frozen=True)
class BaselineParams:
    """`lds baseline` (METHOD.md section 5): the method, its one affinity and attention layer, and the cut's
    settings. ``eigenvectors``, ``masks`` and ``tau`` left None take the method's default (``resolved``)."""

    method: str = setting("tokencut", choices=METHODS, config=False,
                          help="tokencut: one normalised cut, one foreground mask; maskcut: N cuts, the found tokens masked out after each.")
    affinity: str = setting("attention", choices=AFFINITIES,
                            help="attention: the layer's key-query attention, symmetrised, mean over heads; features: cosine similarity of the layer's keys, binarised at --tau.")
    layer: str = setting("-2", schema={"type": ["integer", "string"]},
                         help="The attention layer: a name (block10) or an index (-1: the last; -2, the default, measured best on DINOv2 photos).")
    eigenvectors: int | None = setting(None, minimum=1, help="m, eigenvectors stored as X  [default: tokencut 8, maskcut 15].")
    # the config's baseline_options.masks is a key of the workflow's own: MaskCut's N, passed to maskcut only
    masks: int | None = setting(None, minimum=1, config=False, help="MaskCut's N, masks per image  [default: 3; tokencut: 1].")
    tau: float | None = setting(None, help="Binarisation threshold of the features affinity  [default: tokencut 0.2, maskcut 0.15].")
    centre: bool = setting(True, flag="--centre/--no-centre", config=False,
                           help="Features affinity: subtract the image's mean key before the cosine similarity (DINOv2's keys are all alike without it).")
    artifacts: float = setting(5.0, minimum=0, maximum=1e9, config=False,
                               help="Tokens whose key norm has a robust z-score above this leave the graph and take their nearest kept neighbour's values (1e9: keep all).")
    eps: float = 1e-5  # weight of the edges below tau
    min_area: float = 0.0  # MaskCut: a further mask covering this fraction of the image or less is dropped

    def resolved(self) -> "BaselineParams":
        """These settings with the method's defaults for what is left None."""
        return replace(
            self,
            eigenvectors=self.eigenvectors or DEFAULT_EIGENVECTORS[self.method],
            masks=self.masks or DEFAULT_MASKS[self.method],
            tau=DEFAULT_TAU[self.method] if self.tau is None else self.tau,
        )


@dataclass
class BaselineResult:
    eigenvalues: np.ndarray  # (m,) increasing
    x: np.ndarray  # (m, y, x): the eigenvectors, D-orthonormal on the kept tokens
    masks: np.ndarray  # (n, y, x) bool, in the order found
    scores: np.ndarray  # (n,): 1 for the first mask, then 1 - i / N (MaskCut has no confidence)
    artifacts: np.ndarray  # (y, x) bool: the tokens left out of the graph
    edges_above_tau: float | None = None  # features affinity: the fraction of token pairs joined (W = 1)


DEGENERATE_EDGES = 0.99  # a features graph joining more token pairs than this has no cut worth the name


def robust_z(values: np.ndarray) -> np.ndarray:
    """(values - median) / MAD, the MAD scaled to a normal's standard deviation (1.4826 MAD)."""
    from scipy.stats import median_abs_deviation

    spread = median_abs_deviation(values, scale="normal")
    return (values - np.median(values)) / max(spread, 1e-12)


def artifact_tokens(keys: np.ndarray, threshold: float) -> np.ndarray:
    """Keys (tokens, dims) -> (tokens,) bool: key norm's robust z-score above ``threshold``."""
    return robust_z(np.linalg.norm(keys, axis=1)) > threshold


def feature_affinity(features: np.ndarray, tau: float, eps: float, centre: bool = False) -> np.ndarray:
    """Features (tokens, dims) -> W (tokens, tokens): 1 where cosine similarity > tau, else eps; with
    ``centre`` the mean feature is subtracted first."""
    if centre:
        features = features - features.mean(0)
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return np.where(unit @ unit.T > tau, 1.0, eps)


def attention_affinity(layer: LayerAttention) -> np.ndarray:
    """The mean over heads of (A + Aᵀ) / 2, A = softmax(Q Kᵀ · scale): (tokens, tokens) float64."""
    from pipeline.solve.graphs import summed_symmetrised
    from pipeline.solve.params import GraphOptions

    return summed_symmetrised(layer, GraphOptions("kq", "random-walk")).numpy() / layer.heads


def layer_affinity(layer: LayerAttention, params: BaselineParams, kept: np.ndarray) -> np.ndarray:
    """The one graph of a layer (head, y, x, dim) that the baseline cuts, over its ``kept`` tokens."""
    if params.affinity == "attention":
        return attention_affinity(layer)[np.ix_(kept, kept)]
    keys = join_heads(layer.k).astype(np.float64)
    return feature_affinity(keys.reshape(-1, keys.shape[-1])[kept], params.tau, params.eps, params.centre)


def ncut_eigenvectors(w: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smallest nontrivial solutions of (D - W) x = λ D x: eigenvalues (count,) increasing
    and eigenvectors (tokens, count), D-orthonormal (xᵀ D x = 1). Solved as the largest eigenvectors y of
    D^-1/2 W D^-1/2 (λ = 1 - μ, x = D^-1/2 y): densely for small graphs, else with Lanczos."""
    from scipy.linalg import eigh
    from scipy.sparse.linalg import eigsh

    count = min(count, len(w) - 1)
    root = 1 / np.sqrt(w.sum(1))
    normalised = w * root[:, None] * root[None, :]
    if len(w) <= DENSE_TOKENS:
        mu, y = eigh(normalised, subset_by_index=[len(w) - count - 1, len(w) - 1])
    else:  # a fixed start vector keeps runs deterministic
        start = np.random.default_rng(0).uniform(0.5, 1.5, len(w))
        mu, y = eigsh(normalised, k=count + 1, which="LA", tol=0, v0=start)
    order = np.argsort(-mu)[1:]
    return 1 - mu[order], y[:, order] * root[:, None]


def fill_from_neighbours(values: np.ndarray, kept: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Values (kept tokens,) -> (tokens,): every token not kept takes its spatially nearest kept token's."""
    from scipy import ndimage

    full = np.zeros(kept.size)
    full[kept] = values
    _, nearest = ndimage.distance_transform_edt(~kept.reshape(grid), return_indices=True)
    return full.reshape(grid)[tuple(nearest)].ravel()


def foreground(vector: np.ndarray, grid: tuple[int, int], corner_rule: bool, allowed: np.ndarray | None = None) -> np.ndarray:
    """The foreground of a bipartition (y, x) bool of the ``allowed`` tokens (default all): the side of
    their mean holding the largest |value| (with ``corner_rule``, the other side when that one holds >= 3
    image corners), then its 4-connected component holding the most extreme token of that side."""
    from scipy import ndimage

    allowed = np.ones(vector.size, dtype=bool) if allowed is None else allowed
    mean = vector[allowed].mean()
    side = 1.0 if vector[allowed][np.argmax(np.abs(vector[allowed]))] > mean else -1.0
    if corner_rule and (side * (vector.reshape(grid)[[0, 0, -1, -1], [0, -1, 0, -1]] - mean) > 0).sum() >= 3:
        side = -side
    mask = (side * (vector - mean) > 0) & allowed
    components, _ = ndimage.label(mask.reshape(grid))
    seed = np.argmax(np.where(allowed, side * vector, -np.inf))
    return components == components.flat[seed]


def maskcut(w: np.ndarray, grid: tuple[int, int], params: BaselineParams, kept: np.ndarray | None = None) -> list[np.ndarray]:
    """MaskCut's N masks (y, x) bool, in the order found, of the graph W over the ``kept`` tokens
    (default all); dropped masks are empty."""
    kept = np.ones(int(np.prod(grid)), dtype=bool) if kept is None else kept
    painted = np.zeros(kept.size, dtype=bool)
    found: list[np.ndarray] = []
    for _ in range(params.masks):
        free = ~painted[kept]  # the kept tokens in no mask yet
        if free.sum() < 3:
            found.append(np.zeros(grid, dtype=bool))
            continue
        _, vectors = ncut_eigenvectors(w[np.ix_(free, free)], 1)
        full = fill_from_neighbours(vectors[:, 0], kept & ~painted, grid)
        mask = foreground(full, grid, corner_rule=True, allowed=~painted)
        if found and mask.mean() <= params.min_area:
            mask = np.zeros(grid, dtype=bool)
        found.append(mask)
        painted |= mask.ravel()
    return found


def run_baseline(layer: LayerAttention, params: BaselineParams) -> BaselineResult:
    """Eigenvectors and masks of one layer's affinity (TokenCut: one mask; MaskCut: up to N)."""
    params = params.resolved()
    grid = layer.grid
    keys = join_heads(layer.k).astype(np.float64)
    artifacts = artifact_tokens(keys.reshape(-1, keys.shape[-1]), params.artifacts)
    kept = ~artifacts
    w = layer_affinity(layer, params, kept)
    values, vectors = ncut_eigenvectors(w, params.eigenvectors)
    x = np.stack([fill_from_neighbours(v, kept, grid) for v in vectors.T]).reshape(-1, *grid)
    if params.method == "tokencut":
        masks = [foreground(x[0].ravel(), grid, corner_rule=False)]
    else:
        masks = maskcut(w, grid, params, kept)
    scores = 1 - np.arange(len(masks)) / len(masks)
    kept_masks = [i for i, mask in enumerate(masks) if mask.any()]
    stacked = np.stack([masks[i] for i in kept_masks]) if kept_masks else np.zeros((0, *grid), dtype=bool)
    joined = float((w == 1.0).mean()) if params.affinity == "features" else None
    return BaselineResult(values, x, stacked, scores[kept_masks], artifacts.reshape(grid), joined)


def degenerate_warning(joined: list[float | None], tau: float) -> str | None:
    """A one-line warning when the features graph of some images joins (nearly) every token pair, so
    the cut and its eigenvectors say nothing (keys of some models are all alike at TokenCut's tau)."""
    bad = [value for value in joined if value is not None and value >= DEGENERATE_EDGES]
    if not bad:
        return None
    return (f"in {len(bad)} of {len(joined)} images the features graph joins {min(bad):.0%} or more of the token "
            f"pairs (key cosine similarity > --tau {tau}): the cut is arbitrary there; use --centre, raise --tau "
            "or use --affinity attention")


def baseline_image(layers: list[LayerAttention], params: BaselineParams) -> tuple[dict, dict]:
    """What `lds baseline` stores for one image, from its stored attention layers (one timestep): the
    eigenvectors of ``params.layer``'s affinity as X and X_ortho (a baseline's X is already D-orthonormal),
    its eigenvalues, and the TokenCut / MaskCut masks as proposals -> (arrays, item attributes)."""
    from pipeline.solve.graphs import select
    from pipeline.solve.params import GraphOptions
    from pipeline.store import ArraySpec

    params = params.resolved()
    (chosen,) = select(layers, GraphOptions(layers=(str(params.layer),)))
    result = run_baseline(chosen, params)
    chunks = (max(len(result.masks), 1), *result.masks.shape[1:])
    arrays = {
        "X": ArraySpec(result.x, ("channel", "y", "x"), {"description": f"normalised-cut eigenvectors of {chosen.name}'s {params.affinity} affinity, smallest eigenvalue first (the constant one left out)"}),
        "X_ortho": ArraySpec(result.x, ("component", "y", "x"), {"description": "the same eigenvectors (already D-orthonormal)"}),
        "eigenvalues": ArraySpec(result.eigenvalues, ("channel",), {"description": "eigenvalues λ of (D - W) x = λ D x"}),
        "proposals": ArraySpec(result.masks, ("proposal", "y", "x"), {"description": f"{params.method} masks per token, in the order found"}, chunks=chunks),
        "proposal_scores": ArraySpec(result.scores, ("proposal",), {"description": "1 for the first mask, then 1 - i / N (rank, not confidence)"}, chunks=chunks[:1]),
    }
    attrs = {"layer": chosen.name, "grid": list(chosen.grid), "affinity": params.affinity,
             "artifact_tokens_dropped": int(result.artifacts.sum())}
    if result.edges_above_tau is not None:
        attrs["edges_above_tau"] = round(result.edges_above_tau, 4)
    return arrays, attrs


def baseline_settings(params: BaselineParams) -> dict:
    """The params of a baseline artifact (part of its key): every setting, the method's defaults filled in."""
    return asdict(params.resolved())
