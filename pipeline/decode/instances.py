"""Class-agnostic object proposals from X (METHOD.md section 5), scored and written as COCO results.

For K = 2..10: K-Means on the normalised features (``RESTARTS`` greedy k-means++ seedings run as one
numpy batch, the least inertia kept: pipeline.decode.kmeans.kmeans_restarts), connected components of
each cluster (8-connected), then Ward agglomerative merging of spatially adjacent segments; every segment
and every merge is a proposal (connected by construction, since only adjacent segments merge). Proposals
covering 1%..90% of the image are kept; those touching >= 2 image borders are dropped (>= 3 when none
would be left, none when still none would be left). Each is scored by a balanced binary silhouette (from
one token distance matrix per image; a token's distance to a proposal is the least over its segments,
found once per K), sorted, and suppressed at mask IoU 0.7 (at most 100); proposals scoring below 0 are
dropped.

Beyond the paper (``extended``, on by default): the proposals the border rule drops and those of
K = 11..15 are ranked after every proposal of the paper's rule (their score is the silhouette minus
``EXTENDED_OFFSET``), so they add recall without reordering the paper's proposals; on real COCO
photographs they raise AR100 by about 4 points (docs/quality.md).
Token masks become pixel masks by bilinear upsampling thresholded at one half (smoother than nearest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.decode.kmeans import kmeans_restarts, one_thread, token_features


# k-means++ seedings of each K (the run of least inertia is kept). Three, not scikit-learn's ten: on the 166
# coco-mini photographs they gave the same AP50 and more proposals and recall (the Ks' clusterings differ
# more) for a third of the K-Means work (issue 14).
RESTARTS = 3


@dataclass(frozen=True)
class ProposalParams:
    ks: tuple[int, ...] = tuple(range(2, 11))
    extended: bool = True  # also rank, after the paper's proposals, those the border rule drops and those of extra_ks
    extra_ks: tuple[int, ...] = tuple(range(11, 16))
    min_area: float = 0.01  # fraction of the image
    max_area: float = 0.9
    nms_iou: float = 0.7
    max_proposals: int = 100
    min_score: float = 0.0
    seed: int = 0


def normalise_features(x: np.ndarray) -> np.ndarray:
    """(component, y, x): each component scaled to unit length over the image, then min-max to [-1, 1]."""
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    flat = 2 * (flat - low) / np.where(high > low, high - low, 1) - 1
    return flat.reshape(x.shape)


def connected_segments(labels: np.ndarray) -> np.ndarray:
    """Each cluster of a label map (y, x) split into 8-connected components -> segment ids 0..S-1
    (numbered in raster order of their first token)."""
    from skimage.measure import label

    return label(labels, background=-1, connectivity=2).astype(np.int64) - 1


def adjacent_pairs(segments: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (a < b) of segments that touch (8-neighbourhood)."""
    height, width = segments.shape
    pairs = set()
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = segments[: height - dy, max(0, -dx) : width - max(0, dx)]
        b = segments[dy:, max(0, dx) : width - max(0, -dx)]
        different = a != b
        low = np.minimum(a[different], b[different])
        high = np.maximum(a[different], b[different])
        pairs.update(zip(low.tolist(), high.tolist()))
    return pairs


def ward_merges(segments: np.ndarray, features: np.ndarray) -> list[tuple[int, int]]:
    """The merges of Ward agglomerative clustering restricted to adjacent segments (pixel-weighted: merging
    a and b costs n_a n_b / (n_a + n_b) |mean_a - mean_b|²), cheapest first: merge i joins nodes a and b
    into node S + i (nodes 0..S-1 are the segments), until one node holds every segment."""
    import heapq

    flat = segments.ravel()
    count = int(flat.max()) + 1
    sizes = list(np.bincount(flat, minlength=count).astype(np.float64))
    sums = np.zeros((count, features.shape[1]))
    np.add.at(sums, flat, features)
    sums = list(sums)
    neighbours: dict[int, set[int]] = {s: set() for s in range(count)}
    for a, b in adjacent_pairs(segments):
        neighbours[a].add(b)
        neighbours[b].add(a)

    def cost(a: int, b: int) -> float:
        difference = sums[a] / sizes[a] - sums[b] / sizes[b]
        return sizes[a] * sizes[b] / (sizes[a] + sizes[b]) * float(difference @ difference)

    heap = [(cost(a, b), a, b) for a in neighbours for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    merges = []
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in neighbours or b not in neighbours:
            continue  # one of them was merged already
        new = len(sizes)
        merges.append((a, b))
        sizes.append(sizes[a] + sizes[b])
        sums.append(sums[a] + sums[b])
        around = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        neighbours[new] = around
        for other in around:
            neighbours[other] -= {a, b}
            neighbours[other].add(new)
            heapq.heappush(heap, (cost(other, new), other, new))
    return merges


EXTENDED_OFFSET = 2.0  # subtracted from an extended proposal's silhouette (at most 1): ranked after all others


def area_within(masks: np.ndarray, min_area: float, max_area: float) -> np.ndarray:
    """Which masks (n, y, x) cover min_area..max_area of the image."""
    area = masks.reshape(len(masks), -1).mean(1)
    return (area >= min_area) & (area <= max_area)


def border_rule(masks: np.ndarray) -> np.ndarray:
    """Which masks (n, y, x) touch < 2 image borders (< 3 when none touch < 2, any number when none touch < 3)."""
    borders = sum(edge.any(1).astype(int) for edge in (masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]))
    for limit in (2, 3):
        if np.any(borders < limit):
            return borders < limit
    return np.ones(len(masks), dtype=bool)


def token_distances(features: np.ndarray) -> np.ndarray:
    """Euclidean distances between the tokens (tokens, dims), as float32 (tokens, tokens)."""
    from scipy.spatial.distance import cdist

    return cdist(features, features).astype(np.float32)


def nearest_background(inside: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Per proposal (n, tokens): as many non-proposal tokens as it has (fewer when fewer are left), those
    with the least ``nearest`` (n, tokens: each token's distance to the proposal), the first of equals."""
    background = np.zeros_like(inside)
    for mask, near, chosen in zip(inside, nearest, background):
        outside = np.flatnonzero(~mask)
        size = int(mask.sum())
        if size >= len(outside):
            chosen[outside] = True
            continue
        values = near[outside]
        kth = np.partition(values, size - 1)[size - 1]
        below = outside[values < kth]
        chosen[below] = True
        chosen[outside[values == kth][: size - len(below)]] = True
    return background


def balanced_silhouette(masks: np.ndarray, features: np.ndarray, distance: np.ndarray | None = None,
                        nearest: np.ndarray | None = None) -> np.ndarray:
    """Silhouette score of each proposal (n, tokens) against a background of the same size: the
    non-proposal tokens nearest to the proposal in feature space (fewer when fewer are left; the first of
    equals). The score is the mean silhouette over the proposal's and the background's tokens (0 for a
    group of one). ``distance``: ``token_distances(features)``; ``nearest`` (n, tokens): each token's
    distance to each proposal (both computed when not given; ``candidate_masks`` makes them cheaply).

    Every token's summed distance to each proposal (and to each background) is one matrix product."""
    inside = masks.astype(bool)
    if distance is None:
        distance = token_distances(features)
    if nearest is None:
        nearest = np.stack([distance[mask].min(0) for mask in inside]) if len(inside) else np.zeros(inside.shape, np.float32)
    background = nearest_background(inside, nearest)
    groups = np.concatenate([inside, background]).T.astype(np.float32)
    summed = (distance @ groups).astype(np.float64).T  # (2n, token): each token's summed distance to each group
    to_inside, to_background = summed[: len(inside)], summed[len(inside):]
    sizes = inside.sum(1, keepdims=True).astype(np.float64), background.sum(1, keepdims=True).astype(np.float64)
    total = np.zeros(len(inside))
    for members, own, other, own_size, other_size in (
        (inside, to_inside, to_background, sizes[0], sizes[1]),
        (background, to_background, to_inside, sizes[1], sizes[0]),
    ):
        within = own / np.maximum(own_size - 1, 1)
        between = other / np.maximum(other_size, 1)
        silhouette = (between - within) / np.maximum(np.maximum(between, within), 1e-12)
        total += np.where(members & (own_size > 1), silhouette, 0).sum(1)
    return total / np.maximum(sizes[0][:, 0] + sizes[1][:, 0], 1)


def mask_iou(masks: np.ndarray) -> np.ndarray:
    """Pairwise IoU of masks (n, ...)."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    intersection = flat @ flat.T
    area = flat.sum(1)
    return intersection / np.maximum(area[:, None] + area[None, :] - intersection, 1)


def nms(masks: np.ndarray, scores: np.ndarray, threshold: float, limit: int) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression at mask IoU ``threshold``, best first."""
    order = np.argsort(-scores, kind="stable")
    iou = mask_iou(masks[order])
    kept: list[int] = []
    for rank in range(len(order)):
        if len(kept) == limit:
            break
        if all(iou[rank, other] < threshold for other in kept):
            kept.append(rank)
    return order[kept]


def candidate_masks(features: np.ndarray, shape: tuple[int, int], ks: tuple[int, ...], seed: int,
                    distance: np.ndarray) -> dict[bytes, tuple[np.ndarray, np.ndarray]]:
    """Every distinct Ward proposal (y, x) of K-Means (``kmeans_restarts``) with each K of ``ks`` on
    ``features`` (tokens, dims), in the order found, keyed by its packed bits, with each token's distance
    to it (its nearest token; from ``distance``, per segment, then the minimum of a merge's two parts)."""
    found: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    distinct = len(np.unique(features, axis=0))
    for k in ks:
        if k > distinct:
            break
        segments = connected_segments(kmeans_restarts(features, k, RESTARTS, seed).reshape(shape))
        flat = segments.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(int(flat.max()) + 2))
        masks = [flat == s for s in range(len(bounds) - 1)]
        nearest = [distance[order[start:end]].min(0) for start, end in zip(bounds[:-1], bounds[1:])]
        for a, b in ward_merges(segments, features):
            masks.append(masks[a] | masks[b])
            nearest.append(np.minimum(nearest[a], nearest[b]))
        for mask, near in zip(masks, nearest):
            found.setdefault(np.packbits(mask).tobytes(), (mask.reshape(shape), near))
    return found


def propose(x: np.ndarray, params: ProposalParams = ProposalParams()) -> tuple[np.ndarray, np.ndarray]:
    """Object proposals from features (component, y, x): token masks (n, y, x) bool and their scores,
    best first (``params.extended``: the extended proposals last, scored below every other)."""
    features = token_features(normalise_features(x))
    shape = x.shape[1:]
    with one_thread():
        distance = token_distances(features)
        paper = candidate_masks(features, shape, params.ks, params.seed, distance)
        extra = candidate_masks(features, shape, params.extra_ks, params.seed, distance) if params.extended else {}
        found = list(paper.values()) + [value for key, value in extra.items() if key not in paper]
        if not found:  # fewer than two distinct tokens: nothing to cluster
            return np.zeros((0, *shape), dtype=bool), np.zeros(0)
        masks = np.stack([mask for mask, _ in found])
        nearest = np.stack([near for _, near in found])
        from_paper = np.arange(len(masks)) < len(paper)
        sized = area_within(masks, params.min_area, params.max_area)
        masks, nearest, from_paper = masks[sized], nearest[sized], from_paper[sized]
        primary = np.zeros(len(masks), dtype=bool)
        primary[from_paper] = border_rule(masks[from_paper])
        if not params.extended:
            masks, nearest, primary = masks[primary], nearest[primary], primary[primary]
        if not len(masks):
            return masks, np.zeros(0)
        silhouettes = balanced_silhouette(masks.reshape(len(masks), -1), features, distance, nearest)
        scores = silhouettes - EXTENDED_OFFSET * ~primary
        kept = nms(masks, scores, params.nms_iou, params.max_proposals)
    kept = kept[silhouettes[kept] >= params.min_score]
    return masks[kept], scores[kept]


def pixel_masks(token_masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Token masks (n, y, x) -> pixel masks (n, height, width): bilinear upsampling thresholded at one
    half, nearest neighbour for a mask that would vanish so."""
    from PIL import Image

    from pipeline.decode.kmeans import upsample_labels

    masks = np.zeros((len(token_masks), *size), dtype=bool)
    for i, mask in enumerate(token_masks):
        soft = Image.fromarray(mask.astype(np.float32), mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        masks[i] = np.asarray(soft) > 0.5
        if not masks[i].any():
            masks[i] = upsample_labels(mask, size).astype(bool)
    return masks


def coco_results(masks: np.ndarray, scores: np.ndarray, image_id: int) -> list[dict]:
    """COCO results (class-agnostic: category 1) for pixel masks (n, y, x): compressed RLE, box
    [x, y, width, height] and score per proposal; pycocotools' ``loadRes`` reads them as they are."""
    from pipeline.data.coco import encode_mask

    results = []
    for mask, score in zip(masks, scores):
        rle, box = encode_mask(mask)
        results.append({"image_id": int(image_id), "category_id": 1, "segmentation": rle, "bbox": box, "score": float(score)})
    return results
