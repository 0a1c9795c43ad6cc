"""`lds zeroshot`: CLIP zero-shot class labels for the regions of `lds decode` (METHOD.md section 5), and
their confusion against the ground truth for `lds evaluate --zeroshot`."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import click

from pipeline.decode.zeroshot import (
    ClassLabels, ZeroshotParams, class_embeddings, class_names, clip_repo, last_layer_values, zeroshot_image, zeroshot_settings,
)
from pipeline.extract.consumers import ZEROSHOT_ARRAYS
from pipeline.store import Store
from stages.common import (
    check_extract_arrays, input_option, manifest_option, provenance, read_manifest, require_arrays, run_stage, store_option,
    upstream,
)
from stages.options import click_options, params_from


@click.command()
@input_option
@click.option("--clip", "clip_option", default=None, help="Hugging Face repository of the CLIPModel whose vision tower the extract used  [default: from the extract's model: clip-vitb16 -> openai/clip-vit-base-patch16, hf:<repo> -> <repo>].")
@click.option("--weights", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="A folder written by save_pretrained: a transformers CLIPModel and its tokenizer (instead of the hub).")
@click_options(ZeroshotParams)
@store_option
@manifest_option
def zeroshot(input_manifest, clip_option, weights, store_root, manifest, **settings):
    """Label every region of a decode artifact with a class name by CLIP: the region's mean of the last
    layer's value vectors, projected into CLIP's joint space, against the class names' text embeddings."""
    from pipeline.models.clip import load_clip
    from pipeline.store.hashing import sha256_tree

    params, store = params_from(ZeroshotParams, settings), Store(store_root)
    source = read_manifest(input_manifest, "decode")  # a decode artifact: none stands in for it
    extract_ref, preprocessed = upstream(store, source, "extract"), upstream(store, source, "preprocess")
    check_extract_arrays(store, extract_ref, ZEROSHOT_ARRAYS, "lds zeroshot")
    model_attrs = provenance(store, source)
    names = class_names(params, store.attrs(preprocessed))
    repo, labels = clip_repo(clip_option, weights, model_attrs), ClassLabels.of(names)
    decoded, images, extracted = (store.open(ref)["items"] for ref in (source, preprocessed, extract_ref))
    clip = cache(lambda: load_clip(repo, weights))
    text = cache(lambda: class_embeddings(clip().encode_text, labels.prompted))

    def compute(item: str):
        values = last_layer_values(extracted[item], clip())
        return zeroshot_image(values, decoded[item]["labels_tokens"][...], images[item]["rgb"].shape[:2], clip(), text(), labels, params), {}, {}

    def attrs() -> dict:
        require_arrays(store, extract_ref)  # read below, though the decode artifact is the input
        return model_attrs | {"classes": labels.names, "background": labels.background, "clip": clip().source}

    key = zeroshot_settings(params, labels, repo, sha256_tree(weights) if weights else None)
    run_stage(store, "zeroshot", key, [source.key], [source], list(store.attrs(source)["items"]), compute, attrs, manifest)


