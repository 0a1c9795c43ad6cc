"""`lds extract`: queries, keys and values of every attention layer, per image."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import click

from pipeline.consumers import ARRAYS, parse_arrays
from pipeline.errors import LdsError
from pipeline.hashing import sha256_tree
from pipeline.models import get_spec
from pipeline.store import ArraySpec, Store
from stages.common import input_option, manifest_option, read_manifest, run_stage, store_option

DIMS = ("head", "y", "x", "dim")
TIMESTEP_POOL = 20  # Stable Diffusion: attention sets per image, four times lds solve's buffer of 5


@click.command()
@input_option
@click.option("--model", "model_name", required=True, help="A registered model (see `lds models`), timm:<name>, hf:<repo_id> or diffusers:<repo_id>.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Local weights: a state dict (.safetensors / .pth), a save_pretrained folder (transformers; diffusers layout for Stable Diffusion), or the .onnx of dinov2-s14-imgfocus.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation seed of random models; Stable Diffusion: also its timesteps and noise.")
@click.option("--dtype", type=click.Choice(["float16", "float32", "int8"]), default="float16", show_default=True, help="int8: per channel of each head an int8 value per token and a float32 scale (<array>_scale); about half of float16's bytes, the exact solver's X within 0.9999 of float32's (docs/models.md: What extract stores).")
@click.option("--timesteps", type=click.IntRange(1), default=TIMESTEP_POOL, show_default=True, help="Stable Diffusion: the pool of distinct timesteps per image, each with its own noise and stored (a leading timestep axis); lds solve's buffer draws from it, so keep it larger than --buffer.")
@click.option("--max-timestep", type=click.IntRange(0, 999), default=250, show_default=True, help="Stable Diffusion: timesteps drawn uniformly from 0..this (dataset mode: 300).")
@click.option("--max-resolution", type=click.IntRange(1), default=None, help="Dataset mode: keep only layers whose grid is this or coarser (32).")
@click.option("--upsample-to", type=click.IntRange(1), default=None, help="Resize every layer's Q/K/V maps bicubically to this many tokens per side (MAE at 224: 28, the CLIP / DINO grid at 448).")
@click.option("--concat-heads", is_flag=True, help="Dataset mode: the heads of a layer concatenated into one vector per token (stored as one head).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N: where the model runs; not part of the artifact key.")
@click.option("--arrays", "array_names", default=",".join(ARRAYS), show_default=True, help="Which of q, k, v to store (comma-separated): what the readers need (kq graphs: q,k; vv graphs and zero-shot labels: v; baselines: q,k or k); the workflow derives it from the config.")
@store_option
@manifest_option
def extract(input_manifest, model_name, weights, seed, dtype, timesteps, max_timestep, max_resolution, upsample_to, concat_heads, device, array_names, store_root, manifest):
    """Store Q, K, V (those --arrays names) (head, y, x, dim) of every attention layer of MODEL for each
    image; for Stable Diffusion (timestep, head, y, x, dim) of every UNet self-attention layer. The
    device is recorded per image, not in the artifact key: CPU and GPU give the same arrays up to float
    error."""
    from zarr.codecs import BloscCodec

    from pipeline.solver import resolve_device

    on = resolve_device(device)  # a missing GPU stops the stage before any work
    stored = parse_arrays(array_names)
    store = Store(store_root)
    source = read_manifest(input_manifest, "preprocess")
    spec = get_spec(model_name)
    diffusion = spec.family == "diffusers"
    if weights is not None and not weights.exists():
        raise LdsError(f"weights {weights} for model {model_name} do not exist; give a file or folder that does")
    uses_seed = diffusion or not (spec.pretrained or weights)
    params = {"model": model_name, "weights_sha256": sha256_tree(weights) if weights else None, "seed": seed if uses_seed else None, "dtype": dtype,
              "arrays": list(stored)}
    params |= {"timesteps": timesteps, "max_timestep": max_timestep} if diffusion else {}
    params |= ({"max_resolution": max_resolution} if max_resolution else {}) | ({"concat_heads": True} if concat_heads else {})
    params |= {"upsample_to": upsample_to} if upsample_to else {}
    images = store.open(source)["items"]
    # Q, K, V compress best with zstd level 5 after a byte shuffle (high bytes apart from low), measured on
    # DINOv2 ViT-S/14 at 448 px: float16 8% smaller than zarr's zstd alone (docs/models.md: What extract stores)
    codecs = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)
    provenance = spec.provenance() | ({"weights": str(weights)} if weights else {})

    @cache
    def model():
        from pipeline.models.build import build_model

        return build_model(spec, weights, seed, cache_dir=store.local_folder("weights")).to(on)

    def loaded_provenance() -> dict:
        """The artifact's model attributes, once the model is loaded: a model that cannot be built
        stops the stage before any image instead of failing each one."""
        model()
        return provenance

    def attention(item: str, rgb):
        from pipeline.extract import extract_attention, image_tensor

        image = image_tensor(rgb, spec.mean, spec.std).to(on)
        if diffusion:
            import numpy as np

            from pipeline.extract_diffusion import extract_attention_sd, item_generator, sample_timesteps

            generator = item_generator(seed, item)
            steps = sample_timesteps(timesteps, max_timestep, generator)
            return extract_attention_sd(model(), image, steps, generator, np.dtype("float16" if dtype == "int8" else dtype))  # int8: quantised below
        if spec.family == "hf":
            from pipeline.extract_hf import extract_attention_hf

            return extract_attention_hf(model(), image)
        return extract_attention(model(), image, spec.patch_size)

    def compute(item: str):
        from pipeline.extract import coarse_layers, concat_heads as concatenated, quantise, upsample_layer

        rgb = images[item]["rgb"][...]
        layers = attention(item, rgb)
        if upsample_to:
            layers = [upsample_layer(layer, (upsample_to, upsample_to)) for layer in layers]
        if max_resolution:
            kept = coarse_layers(layers, max_resolution)
            if not kept:
                grids = sorted({"x".join(map(str, layer.grid)) for layer in layers})
                raise LdsError(
                    f"no attention layer of model {model_name} on image {item} is {max_resolution}x{max_resolution} "
                    f"or coarser (its grids: {', '.join(grids)}); preprocess to a smaller --size or raise --max-resolution"
                )
            layers = kept
        heads = {layer.name: layer.heads for layer in layers}
        if concat_heads:
            layers = [concatenated(layer) for layer in layers]
        arrays, group_attrs = {}, {}
        for layer in layers:
            lead = ("timestep",) if layer.timesteps is not None else ()
            chunks = (1, *layer.shape[1:]) if lead else None  # one timestep reads alone
            for name in stored:
                description = f"{name} per {'timestep and ' if lead else ''}head" + (" (heads concatenated)" if concat_heads else "")
                data = getattr(layer, name)
                if dtype == "int8":
                    data, scale = quantise(data)
                    description += f", int8: times {name}_scale per channel"
                    scale_chunks = chunks and chunks[:2] + chunks[-1:]
                    arrays[f"layers/{layer.name}/{name}_scale"] = ArraySpec(
                        scale, lead + ("head", "dim"), {"description": f"float32 scale of each channel of {name}"}, scale_chunks)
                arrays[f"layers/{layer.name}/{name}"] = ArraySpec(
                    data.astype(dtype, copy=False), lead + DIMS, {"description": description}, chunks, codecs)
            count, h, w, dim = layer.shape[-4:]
            attrs = {"resolution": [h, w], "heads": count, "head_dim": dim, "scale": layer.scale}
            attrs |= {"timesteps": list(layer.timesteps)} if lead else {}
            attrs |= {"concatenated_heads": heads[layer.name]} if concat_heads else {}
            group_attrs[f"layers/{layer.name}"] = attrs
        finest = max((layer.grid for layer in layers), key=lambda g: g[0] * g[1])
        pixels = rgb.shape[0] // finest[0]  # per token of the finest grid (a ViT's patch size)
        item_attrs = {"grid": list(finest), "patch_size": pixels, "image_size": list(rgb.shape[:2]), "device": on}
        item_attrs |= {"timesteps": list(layers[0].timesteps)} if diffusion else {}
        return arrays, item_attrs, group_attrs

    run_stage(
        store,
        "extract",
        params,
        input_keys=[source.key],
        inputs=[source],
        items=list(store.attrs(source)["items"]),
        compute_item=compute,
        attrs=loaded_provenance,
        manifest=manifest,
    )
