"""`lds decode`'s work (METHOD.md section 5): per image, K-Means regions of X_ortho (per token and per pixel)
and, optionally, object proposals; then the proposals as COCO results and a figure per image."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.decode.instances import ProposalParams
from pipeline.decode.kmeans import clusters_schema
from pipeline.settings import setting


@dataclass(frozen=True)
class DecodeParams:
    """`lds decode`: per-image K-Means and object proposals (the config's `decode` section; its
    ``dataset_clusters`` is the workflow's own key, for `lds cluster`)."""

    clusters: int | str = setting(6, minimum=2, schema=clusters_schema(), help="K of K-Means per image, or 'auto' (2..10 by silhouette).")
    seed: int = setting(0, help="Random state of K-Means (and of the proposals' K-Means).")
    instances: bool = setting(False, flag="--instances/--no-instances",
                              help="Also compute object proposals (METHOD.md section 5); from `lds baseline`, its TokenCut / MaskCut masks.")
    extended_proposals: bool = setting(True, flag="--extended/--paper-only",
                                       help="With --instances: after the paper's proposals, also rank those its border rule drops and those of K = 11..15 (scored below every other; more recall, same ranking on top).")

    def proposals(self) -> ProposalParams:
        """The settings of the proposals decode makes itself (from X_ortho)."""
        return ProposalParams(seed=self.seed, extended=self.extended_proposals)


def decode_settings(params: DecodeParams, proposals_from: str | None = None) -> dict:
    """The params of a decode artifact (part of its key); ``proposals_from``: the method that made the
    input's own proposals (`lds baseline`'s), which decode then stores as they are."""
    proposals = {"from_input": proposals_from} if proposals_from else asdict(params.proposals())
    return {"method": "kmeans", "clusters": params.clusters, "seed": params.seed, "instances": proposals if params.instances else None}


def decode_image(
    x_ortho: np.ndarray, size: tuple[int, int], params: DecodeParams,
    given: tuple[np.ndarray, np.ndarray] | None = None, given_from: str | None = None,
) -> tuple[dict, dict]:
    """What `lds decode` stores for one image, from its X_ortho (component, y, x) and the (height, width) of
    its preprocessed image: the K-Means region of each token and of each pixel and, with ``params.instances``,
    object proposals per token, best first, and their scores (``given``: the input's own masks and scores,
    made by ``given_from``, stored as they are) -> (arrays, item attributes: the K used)."""
    from pipeline.decode.instances import propose
    from pipeline.decode.kmeans import kmeans_auto, kmeans_labels, upsample_labels
    from pipeline.store import ArraySpec

    if params.clusters == "auto":
        tokens, k = kmeans_auto(x_ortho, params.seed)
    else:
        tokens, k = kmeans_labels(x_ortho, params.clusters, params.seed), params.clusters
    arrays = {
        "labels_tokens": ArraySpec(tokens, ("y", "x"), {"description": "region per token"}),
        "labels": ArraySpec(upsample_labels(tokens, size), ("y", "x"), {"description": "region per pixel of the preprocessed image"}),
    }
    if params.instances:
        masks, scores = given if given is not None else propose(x_ortho, params.proposals())
        chunks = (max(len(masks), 1), *masks.shape[1:])
        scored = f"{given_from} rank (1, then 1 - i / N)" if given is not None else "balanced silhouette score"
        arrays["proposals"] = ArraySpec(masks, ("proposal", "y", "x"), {"description": "object proposals per token, best first"}, chunks=chunks)
        arrays["proposal_scores"] = ArraySpec(scores, ("proposal",), {"description": f"{scored} per proposal"}, chunks=chunks[:1])
    return arrays, {"clusters": k}


def original_coco_results(decoded, images, items: list[str]) -> list[dict]:
    """The stored proposals of ``items`` (decode's item groups) as COCO results on the original images (COCO
    image ids, from the preprocess item groups ``images``), as `lds evaluate` scores them."""
    from pipeline.data.preprocess import Geometry
    from pipeline.evaluate.scoring import original_detections

    results = []
    for item in items:
        attrs = images[item].attrs
        results += original_detections(decoded[item]["proposals"][...], decoded[item]["proposal_scores"][...], Geometry.from_dict(attrs), attrs["image_id"])
    return results


def save_figures(folder, decoded, images, solved, items: list[str], caption: str, auto: bool, first: int) -> None:
    """One PNG per image in ``folder``: the image, its regions (and proposals) and its eigenvectors, titled
    with ``caption`` (the model) and the K used; ``first``: the first eigenvector drawn (1 skips the
    solver's near-constant component; a baseline stores none)."""
    from pipeline.decode.instances import pixel_masks
    from pipeline.evaluate.figures import ImageView, save_image_figure

    for item in items:
        rgb = images[item]["rgb"][...]
        k = decoded[item].attrs["clusters"]
        proposals = scores = None
        if "proposals" in decoded[item]:
            proposals = pixel_masks(decoded[item]["proposals"][...], rgb.shape[:2])
            scores = decoded[item]["proposal_scores"][...]
        view = ImageView(item, rgb, decoded[item]["labels"][...], proposals, scores)
        title = f"{item} | {caption} | K-Means K={k}{' (auto)' if auto else ''}"
        save_image_figure(folder / f"{item}.png", view, solved[item]["X"][...], solved[item]["X_ortho"][...], title, first=first)
