"""Queries, keys and values of every attention layer of a transformers ViT (METHOD.md section 1)."""

from __future__ import annotations

import inspect

import torch

from pipeline.errors import LdsError
from pipeline.extract.core import LayerAttention, to_numpy

# names of the separate projections in transformers attention modules (current, then older releases)
PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


def attention_modules_hf(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, tuple[str, str, str]]]:
    """(layer name, attention module, names of its q/k/v projections) of every layer, in depth order."""
    found = []
    for module in model.modules():
        for names in PROJECTIONS:
            if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in names):
                found.append((f"block{len(found):02d}", module, names))
    return found


def heads_and_scale(module: torch.nn.Module, projection: torch.nn.Linear) -> tuple[int, float]:
    """Number of heads and the logit scale an attention module uses."""
    heads = next(getattr(module, n) for n in ("num_attention_heads", "num_heads") if hasattr(module, n))
    scale = next((getattr(module, n) for n in ("scaling", "scale") if hasattr(module, n)), None)
    return heads, float(scale if scale is not None else (projection.out_features // heads) ** -0.5)


def prefix_tokens(model: torch.nn.Module) -> int:
    """Tokens before the patches: the class token, then DINOv2's register tokens."""
    return 1 + getattr(model.config, "num_register_tokens", 0)


def forward_kwargs(model: torch.nn.Module, patches: int, device: torch.device | str = "cpu") -> dict:
    """Arguments that make any image size work and keep ViT-MAE's patches all there, in order (its
    noise made on ``device``, the image's)."""
    parameters = inspect.signature(model.forward).parameters
    kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in parameters else {}
    if "noise" in parameters:  # ViT-MAE keeps the patches in the order of this noise: ascending = unshuffled
        kwargs["noise"] = torch.arange(patches, dtype=torch.float32, device=device)[None]
    return kwargs


@torch.no_grad()
def extract_attention_hf(model: torch.nn.Module, image: torch.Tensor) -> list[LayerAttention]:
    """Run the model once and return Q, K, V of every layer, class and register tokens removed.

    Forward hooks read the outputs of each layer's query, key and value projections, so the model's
    own output is untouched. ViT-MAE runs with mask ratio 0 and an ascending noise (no patch hidden,
    none reordered).
    """
    patch = model.config.patch_size
    if image.shape[-2] % patch or image.shape[-1] % patch:
        raise LdsError(
            f"image of {image.shape[-2]}x{image.shape[-1]} pixels is not a multiple of the model's patch size "
            f"{patch}; preprocess with --multiple {patch}"
        )
    grid_h, grid_w = image.shape[-2] // patch, image.shape[-1] // patch
    modules = attention_modules_hf(model)
    captured: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for name, module, projections in modules:
        for part, projection in zip("qkv", projections):
            handles.append(getattr(module, projection).register_forward_hook(
                lambda m, args, output, key=(name, part): captured.__setitem__(key, output)))
    try:
        model(image, **forward_kwargs(model, grid_h * grid_w, image.device))
    finally:
        for handle in handles:
            handle.remove()
    prefix = prefix_tokens(model)
    layers = []
    for name, module, projections in modules:
        heads, scale = heads_and_scale(module, getattr(module, projections[0]))
        arrays = []
        for part in "qkv":
            tokens = captured[(name, part)][0]  # (tokens, heads * dim), batch of one
            if tokens.shape[0] != prefix + grid_h * grid_w:
                raise RuntimeError(f"{name}: {tokens.shape[0]} tokens, expected {prefix} + {grid_h}x{grid_w}")
            arrays.append(to_numpy(tokens[prefix:].reshape(grid_h, grid_w, heads, -1).permute(2, 0, 1, 3)))
        layers.append(LayerAttention(name, *arrays, scale))
    return layers
