"""`lds extract`'s settings and its work on one image: a model's queries, keys and values of every attention
layer, as the arrays and attributes the extract artifact stores (docs/models.md: What extract stores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import LdsError
from pipeline.extract.consumers import ARRAYS, parse_arrays
from pipeline.settings import setting

DIMS = ("head", "y", "x", "dim")
DTYPES = ("float16", "float32", "int8")
PRECISIONS = ("float32", "bfloat16")
TIMESTEP_POOL = 20  # Stable Diffusion: attention sets per image, four times lds solve's buffer of 5


@dataclass(frozen=True)
class ExtractParams:
    """`lds extract` (METHOD.md sections 1 and 4). The model and its local weights are the command's
    (``--model``, ``--weights``; the config names weights per model, a workflow key)."""

    seed: int = setting(0, help="Initialisation seed of random models; Stable Diffusion: also its timesteps and noise.")
    dtype: str = setting("float16", choices=DTYPES,
                         help="int8: per channel of each head an int8 value per token and a float32 scale (<array>_scale); about half "
                              "of float16's bytes, the exact solver's X within 0.9999 of float32's (docs/models.md: What extract stores).")
    precision: str = setting("float32", choices=PRECISIONS,
                             help="The model's forward pass: float32, or bfloat16 under torch.autocast (3x faster on CPUs with AMX and on "
                                  "GPUs; on DINOv2 the exact solver's X within 0.99 of float32's, docs/models.md: What extract stores).")
    timesteps: int = setting(TIMESTEP_POOL, minimum=1,
                             help="Stable Diffusion: the pool of distinct timesteps per image, each with its own noise and stored (a leading "
                                  "timestep axis); lds solve's buffer draws from it, so keep it larger than its --buffer (solve.buffer).")
    max_timestep: int = setting(250, minimum=0, maximum=999, help="Stable Diffusion: timesteps drawn uniformly from 0..this (dataset mode: 300).")
    max_resolution: int | None = setting(None, minimum=1, help="Dataset mode: keep only layers whose grid is this or coarser (32); default: all.")
    concat_heads: bool = setting(False,
                                 help="Dataset mode: the heads of a layer concatenated into one vector per token (stored as one head).")
    upsample_to: int | None = setting(None, minimum=1, help="Resize every layer's Q/K/V maps bicubically to this many tokens per side (MAE at "
                                                            "224: 28, the CLIP / DINO grid at 448); default: as computed.")
    device: str = setting("auto", schema={"enum": ["auto", "cpu", "cuda"]},
                          help="auto (CUDA when present), cpu, cuda or cuda:N: where the model runs; not part of the artifact key (the "
                               "config: auto, cpu or cuda; cuda also asks the workflow's extract jobs for a GPU, resource gpu=1).")
    arrays: tuple[str, ...] = setting(ARRAYS, config=False,
                                      help="Which of q, k, v to store (comma-separated): what the readers need (kq graphs: q,k; vv graphs "
                                           "and zero-shot labels: v; baselines: q,k or k); the workflow derives it from the config.")

    def __post_init__(self):
        object.__setattr__(self, "arrays", parse_arrays(",".join(self.arrays)))  # checked, in q, k, v order


def artifact_params(params: ExtractParams, spec, weights: Path | None = None) -> dict:
    """The params of the extract artifact of model ``spec`` (with local ``weights``): the seed only where it
    makes the weights (random models) or the noise (Stable Diffusion), the timesteps only for Stable
    Diffusion, the dataset-mode settings only when set; never the device."""
    from pipeline.store.hashing import sha256_tree

    diffusion = spec.family == "diffusers"
    uses_seed = diffusion or not (spec.pretrained or weights)
    found = {"model": spec.name, "weights_sha256": sha256_tree(weights) if weights else None, "seed": params.seed if uses_seed else None,
             "dtype": params.dtype, "arrays": list(params.arrays)}
    found |= {"timesteps": params.timesteps, "max_timestep": params.max_timestep} if diffusion else {}
    found |= ({"max_resolution": params.max_resolution} if params.max_resolution else {}) | ({"concat_heads": True} if params.concat_heads else {})
    found |= {"precision": params.precision} if params.precision != "float32" else {}  # float32: the keys made before it existed
    return found | ({"upsample_to": params.upsample_to} if params.upsample_to else {})


def forward_precision(params: ExtractParams, device: str = "cpu"):
    """The context of the forward pass in ``params.precision`` on ``device`` (torch.autocast). Held around
    every image of a stage, autocast makes its bfloat16 copy of each weight once, not once per image
    (DINOv2 ViT-S/14 at 448 px: 0.25 -> 0.23 s per image on a CPU)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=params.precision == "bfloat16")


def attention_layers(model, rgb: np.ndarray, spec, params: ExtractParams, item: str = "", device: str = "cpu") -> list:
    """Q, K, V of every attention layer of ``model`` (built from ``spec``, on ``device``) for one RGB image
    (y, x, channel), the forward pass in ``params.precision`` (``forward_precision``); Stable Diffusion: at
    ``params.timesteps`` timesteps drawn from (seed, item)."""
    with forward_precision(params, device):
        return _attention_layers(model, rgb, spec, params, item, device)


def _attention_layers(model, rgb: np.ndarray, spec, params: ExtractParams, item: str, device: str) -> list:
    from pipeline.extract.core import extract_attention, image_tensor

    image = image_tensor(rgb, spec.mean, spec.std).to(device)
    if spec.family == "diffusers":
        from pipeline.extract.diffusion import extract_attention_sd, item_generator, sample_timesteps

        generator = item_generator(params.seed, item)
        steps = sample_timesteps(params.timesteps, params.max_timestep, generator)
        return extract_attention_sd(model, image, steps, generator, np.dtype("float16" if params.dtype == "int8" else params.dtype))  # int8: quantised later
    if spec.family == "hf":
        from pipeline.extract.hf import extract_attention_hf

        return extract_attention_hf(model, image)
    return extract_attention(model, image, spec.patch_size)


def extract_image(model, rgb: np.ndarray, spec, params: ExtractParams, item: str = "", device: str = "cpu") -> tuple[dict, dict, dict]:
    """`lds extract`'s work on one image ``item`` (RGB, y x channel, preprocessed for ``spec``): (arrays,
    item attributes, attributes per layer group) as the artifact stores them. Arrays ``layers/<name>/<q|k|v>``
    are (head, y, x, dim), for Stable Diffusion (timestep, head, y, x, dim), in ``params.dtype`` (int8 with a
    ``<array>_scale`` per channel); ``device``: where ``model`` runs (resolved), recorded per image."""
    from zarr.codecs import BloscCodec

    from pipeline.extract.core import coarse_layers, concat_heads, quantise, upsample_layer
    from pipeline.store import ArraySpec

    # Q, K, V compress best with zstd level 5 after a byte shuffle (high bytes apart from low), measured on
    # DINOv2 ViT-S/14 at 448 px: float16 8% smaller than zarr's zstd alone (docs/models.md: What extract stores)
    codecs = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)
    layers = attention_layers(model, rgb, spec, params, item, device)
    if params.upsample_to:
        layers = [upsample_layer(layer, (params.upsample_to, params.upsample_to)) for layer in layers]
    if params.max_resolution:
        kept = coarse_layers(layers, params.max_resolution)
        if not kept:
            grids = sorted({"x".join(map(str, layer.grid)) for layer in layers})
            raise LdsError(
                f"no attention layer of model {spec.name} on image {item} is {params.max_resolution}x{params.max_resolution} "
                f"or coarser (its grids: {', '.join(grids)}); preprocess to a smaller --size or raise --max-resolution"
            )
        layers = kept
    heads = {layer.name: layer.heads for layer in layers}
    if params.concat_heads:
        layers = [concat_heads(layer) for layer in layers]
    arrays, group_attrs = {}, {}
    for layer in layers:
        lead = ("timestep",) if layer.timesteps is not None else ()
        chunks = (1, *layer.shape[1:]) if lead else None  # one timestep reads alone
        for name in params.arrays:
            description = f"{name} per {'timestep and ' if lead else ''}head" + (" (heads concatenated)" if params.concat_heads else "")
            data = getattr(layer, name)
            if params.dtype == "int8":
                data, scale = quantise(data)
                description += f", int8: times {name}_scale per channel"
                scale_chunks = chunks and chunks[:2] + chunks[-1:]
                arrays[f"layers/{layer.name}/{name}_scale"] = ArraySpec(
                    scale, lead + ("head", "dim"), {"description": f"float32 scale of each channel of {name}"}, scale_chunks)
            arrays[f"layers/{layer.name}/{name}"] = ArraySpec(
                data.astype(params.dtype, copy=False), lead + DIMS, {"description": description}, chunks, codecs)
        count, h, w, dim = layer.shape[-4:]
        attrs = {"resolution": [h, w], "heads": count, "head_dim": dim, "scale": layer.scale}
        attrs |= {"timesteps": list(layer.timesteps)} if lead else {}
        attrs |= {"concatenated_heads": heads[layer.name]} if params.concat_heads else {}
        group_attrs[f"layers/{layer.name}"] = attrs
    finest = max((layer.grid for layer in layers), key=lambda g: g[0] * g[1])
    pixels = rgb.shape[0] // finest[0]  # per token of the finest grid (a ViT's patch size)
    item_attrs = {"grid": list(finest), "patch_size": pixels, "image_size": list(rgb.shape[:2]), "device": device}
    item_attrs |= {"timesteps": list(layers[0].timesteps)} if spec.family == "diffusers" else {}
    return arrays, item_attrs, group_attrs
