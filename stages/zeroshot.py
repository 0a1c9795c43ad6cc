"""`lds zeroshot`: CLIP zero-shot class labels for the regions of `lds decode` (METHOD.md section 5), and
their confusion against the ground truth for `lds evaluate --zeroshot`."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import click
import numpy as np

from pipeline.errors import LdsError
from pipeline.consumers import ZEROSHOT_ARRAYS
from pipeline.store import ArraySpec, ArtifactRef, Store
from pipeline.zeroshot import PROMPT_TEMPLATES, SCORES, THRESHOLD
from stages.common import (
    check_extract_arrays, input_option, manifest_option, provenance, read_manifest, require_arrays, run_stage, store_option,
    upstream,
)


def last_layer_values(item_group, clip) -> np.ndarray:
    """The value vectors (y, x, heads x head_dim) of an image's last stored attention layer, checked
    against the CLIP whose vision tower is to project them."""
    from pipeline.extract import join_heads, stored_array

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


@click.command()
@input_option
@click.option("--clip", "clip_repo", default=None, help="Hugging Face repository of the CLIPModel whose vision tower the extract used  [default: from the extract's model: clip-vitb16 -> openai/clip-vit-base-patch16, hf:<repo> -> <repo>].")
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="A folder written by save_pretrained: a transformers CLIPModel and its tokenizer (instead of the hub).")
@click.option("--classes", default=None, help="Comma-separated class names  [default: the dataset's]; 'background' is never prompted.")
@click.option("--threshold", type=float, default=THRESHOLD, show_default=True, help="Regions scoring below this are background.")
@click.option("--score", type=click.Choice(SCORES), default="cosine", show_default=True, help="cosine: cosine similarity (METHOD.md); probability: CLIP's softmax over the classes.")
@store_option
@manifest_option
def zeroshot(input_manifest, clip_repo, weights, classes, threshold, score, store_root, manifest):
    """Label every region of a decode artifact with a class name by CLIP: the region's mean of the last
    layer's value vectors, projected into CLIP's joint space, against the class names' text embeddings."""
    from pipeline.decode import upsample_labels
    from pipeline.hashing import sha256_tree
    from pipeline.models import default_clip_repo
    from pipeline.models.clip import load_clip
    from pipeline.zeroshot import class_embeddings, label_set, zero_shot_labels

    store = Store(store_root)
    source = read_manifest(input_manifest, "decode")
    if source.stage != "decode":
        raise LdsError(f"manifest {input_manifest} names a {source.stage} artifact; lds zeroshot labels the regions of `lds decode`")
    extract_ref = upstream(store, source, "extract")
    check_extract_arrays(store, extract_ref, ZEROSHOT_ARRAYS, "lds zeroshot")
    preprocessed = upstream(store, source, "preprocess")
    model_attrs = provenance(store, source)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else store.attrs(preprocessed).get("classes")
    if not names:
        raise LdsError(f"dataset {store.attrs(preprocessed).get('dataset')} names no classes; give --classes a,b,c")
    repo = clip_repo or default_clip_repo(model_attrs)
    if weights is None and repo is None:
        raise LdsError(
            f"model {model_attrs.get('model')} is not a known CLIP model; give --clip REPO or --weights FOLDER of the "
            "CLIP whose vision tower made the extract"
        )
    stored, prompted, background = label_set(names)
    if not prompted:
        raise LdsError(f"no class to label regions with among {', '.join(names)}; give --classes a,b,c")
    ids = [stored.index(n) for n in prompted]
    params = {
        "clip": None if weights else repo, "weights_sha256": sha256_tree(weights) if weights else None,
        "classes": stored, "threshold": threshold, "score": score, "templates": list(PROMPT_TEMPLATES),
    }
    decoded = store.open(source)["items"]
    images = store.open(preprocessed)["items"]
    extracted = store.open(extract_ref)["items"]

    @cache
    def clip():
        return load_clip(repo, weights)

    @cache
    def text() -> np.ndarray:
        return class_embeddings(clip().encode_text, prompted)

    def compute(item: str):
        values = last_layer_values(extracted[item], clip())
        grid = values.shape[:2]
        regions = decoded[item]["labels_tokens"][...]
        if regions.shape != grid:
            regions = upsample_labels(regions, grid)
        features = clip().project_values(values.reshape(-1, values.shape[-1]))
        tokens, region_labels, best = zero_shot_labels(features, regions, text(), ids, background, threshold, score, clip().logit_scale)
        arrays = {
            "labels_tokens": ArraySpec(tokens, ("y", "x"), {"description": "class per token (indices into the artifact's classes)"}),
            "labels": ArraySpec(upsample_labels(tokens, images[item]["rgb"].shape[:2]), ("y", "x"), {"description": "class per pixel of the preprocessed image"}),
            "region_labels": ArraySpec(region_labels, ("region",), {"description": "class of each region present, by region id"}),
            "region_scores": ArraySpec(best, ("region",), {"description": f"best {score} score of each region"}),
        }
        return arrays, {}, {}

    def attrs() -> dict:
        require_arrays(store, extract_ref)  # read below, though the decode artifact is the input
        return model_attrs | {"classes": stored, "background": background, "clip": clip().source}

    run_stage(
        store, "zeroshot", params, [source.key], [source], list(store.attrs(source)["items"]), compute, attrs, manifest,
    )


def zeroshot_confusion(store: Store, refs: list[ArtifactRef], classes: list[str] | None) -> np.ndarray | None:
    """(truth class, predicted class + a last column for names the dataset lacks) over every labelled
    image of the zero-shot artifacts ``refs``; None when no image has labels."""
    from pipeline.metrics import confusion_matrix
    from pipeline.zeroshot import to_dataset_labels

    if not classes:
        raise LdsError("zero-shot labels are scored by class name, and this dataset names no classes")
    total = None
    for ref in refs:
        attrs = store.attrs(ref)
        labelled = store.open(ref)["items"]
        images = store.open(upstream(store, ref, "preprocess"))["items"]
        for item in attrs["items"]:
            if "labels" in images[item]:
                predicted = to_dataset_labels(labelled[item]["labels"][...], attrs["classes"], classes)
                part = confusion_matrix(images[item]["labels"][...], predicted, len(classes), len(classes) + 1)
                total = part if total is None else total + part
    return total
