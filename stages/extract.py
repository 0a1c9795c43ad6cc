"""`lds extract`: queries, keys and values of every attention layer, per image."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import click

from pipeline.hashing import sha256_file
from pipeline.models import get_spec
from pipeline.store import ArraySpec, Store
from stages.common import input_option, manifest_option, read_manifest, run_stage, store_option

DIMS = ("head", "y", "x", "dim")


@click.command()
@input_option
@click.option("--model", "model_name", required=True, help="A registered model (see `lds models`) or timm:<name>.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Local state dict (.safetensors / .pth).")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation seed of random models.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@store_option
@manifest_option
def extract(input_manifest, model_name, weights, seed, dtype, store_root, manifest):
    """Store Q, K, V (head, y, x, dim) of every attention layer of MODEL for each image."""
    store = Store(store_root)
    source = read_manifest(input_manifest)
    spec = get_spec(model_name)
    weights_hash = sha256_file(weights) if weights else None
    params = {"model": model_name, "weights_sha256": weights_hash, "seed": None if spec.pretrained or weights else seed, "dtype": dtype}
    images = store.open(source)["items"]
    provenance = spec.provenance() | ({"weights": str(weights)} if weights else {})

    @cache
    def model():
        from pipeline.models.build import build_model

        return build_model(spec, weights, seed)

    def compute(item: str):
        from pipeline.extract import extract_attention, image_tensor

        rgb = images[item]["rgb"][...]
        layers = extract_attention(model(), image_tensor(rgb, spec.mean, spec.std), spec.patch_size)
        arrays, group_attrs = {}, {}
        for layer in layers:
            for name in ("q", "k", "v"):
                data = getattr(layer, name).astype(dtype)
                arrays[f"layers/{layer.name}/{name}"] = ArraySpec(data, DIMS, {"description": f"{name} per head"})
            heads, h, w, dim = layer.q.shape
            group_attrs[f"layers/{layer.name}"] = {"resolution": [h, w], "heads": heads, "head_dim": dim, "scale": layer.scale}
        item_attrs = {"grid": list(layers[0].grid), "patch_size": spec.patch_size, "image_size": list(rgb.shape[:2])}
        return arrays, item_attrs, group_attrs

    run_stage(
        store,
        "extract",
        params,
        input_keys=[source.key],
        inputs=[source],
        items=list(store.attrs(source)["items"]),
        compute_item=compute,
        attrs=provenance,
        manifest=manifest,
    )
