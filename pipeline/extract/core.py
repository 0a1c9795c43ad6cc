"""Capture the queries, keys and values of every attention layer of a ViT (METHOD.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LayerAttention:
    """One attention layer's patch tokens: arrays are (head, y, x, dim), or (timestep, head, y, x, dim)
    for Stable Diffusion, where ``timesteps`` names the diffusion timestep of each leading index. An
    array the extract did not store (``--arrays``) is None."""

    name: str
    q: np.ndarray | None
    k: np.ndarray | None
    v: np.ndarray | None
    scale: float
    timesteps: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the stored arrays (q, k and v alike)."""
        return next(a for a in (self.q, self.k, self.v) if a is not None).shape

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[-3], self.shape[-2]

    @property
    def heads(self) -> int:
        return self.shape[-4]


def image_tensor(rgb: np.ndarray, mean, std) -> torch.Tensor:
    """(1, 3, H, W) float tensor normalised with the model's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A captured projection as a float32 array on the host, from whichever device the model runs on
    (every extractor converts through here)."""
    return tensor.detach().float().cpu().numpy()


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The self-attention modules of a timm VisionTransformer, in depth order."""
    return [(f"block{i:02d}", block.attn) for i, block in enumerate(model.blocks)]


@torch.no_grad()
def extract_attention(model: torch.nn.Module, image: torch.Tensor, patch_size: int) -> list[LayerAttention]:
    """Run the model once and return Q, K, V of every layer, class and register tokens removed.

    Forward hooks read each attention module's fused qkv projection as the module computes it and apply
    its q/k norms as timm does, so the model's own output is untouched and nothing is computed twice.
    """
    captured: dict[str, tuple[torch.Tensor, ...]] = {}

    def hook_for(name: str, module: torch.nn.Module):
        def hook(projection, args, qkv):
            batch, tokens, _ = qkv.shape
            q, k, v = qkv.reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            captured[name] = (module.q_norm(q), module.k_norm(k), v)

        return hook

    handles = [module.qkv.register_forward_hook(hook_for(name, module)) for name, module in attention_modules(model)]
    try:
        model(image)
    finally:
        for handle in handles:
            handle.remove()
    grid_h, grid_w = image.shape[-2] // patch_size, image.shape[-1] // patch_size
    prefix = model.num_prefix_tokens
    layers = []
    for name, module in attention_modules(model):
        q, k, v = (to_numpy(t[0, :, prefix:].reshape(t.shape[1], grid_h, grid_w, -1)) for t in captured[name])
        layers.append(LayerAttention(name, q, k, v, float(module.scale)))
    return layers


def upsample_layer(layer: LayerAttention, grid: tuple[int, int]) -> LayerAttention:
    """Q, K and V maps resized bicubically to ``grid`` (METHOD.md section 4: MAE's 14x14 at 224 px brought
    to the 28x28 of the CLIP / DINO models at 448 px, so their graphs share one resolution)."""
    if layer.grid == tuple(grid):
        return layer

    def resized(a: np.ndarray) -> np.ndarray:
        maps = torch.from_numpy(np.moveaxis(a, -1, -3).astype(np.float32))  # (..., dim, y, x)
        flat = maps.reshape(-1, *maps.shape[-3:])
        out = torch.nn.functional.interpolate(flat, size=tuple(grid), mode="bicubic", align_corners=False)
        return np.moveaxis(out.reshape(*maps.shape[:-2], *grid).numpy(), -3, -1).astype(a.dtype)

    return LayerAttention(layer.name, *(None if a is None else resized(a) for a in (layer.q, layer.k, layer.v)), layer.scale, layer.timesteps)


def is_coarse(grid: tuple[int, int], max_resolution: int) -> bool:
    """Dataset mode keeps a layer whose grid is ``max_resolution`` or coarser on both sides."""
    return max(grid) <= max_resolution


def coarse_layers(layers: list[LayerAttention], max_resolution: int) -> list[LayerAttention]:
    """Dataset mode: only the layers whose grid is ``max_resolution`` or coarser on both sides."""
    return [layer for layer in layers if is_coarse(layer.grid, max_resolution)]


def concat_heads(layer: LayerAttention) -> LayerAttention:
    """Dataset mode: the heads of a layer joined into one vector per token, kept as a single head.

    (..., head, y, x, dim) -> (..., 1, y, x, head * dim). ``scale`` stays the per-head scale of the model.
    """
    joined = [None if a is None else np.expand_dims(join_heads(a), -4) for a in (layer.q, layer.k, layer.v)]
    return LayerAttention(layer.name, *joined, layer.scale, layer.timesteps)


def join_heads(array: np.ndarray) -> np.ndarray:
    """(..., head, y, x, dim) -> (..., y, x, head * dim), head-major: the order of the projection's own
    output before it is split into heads. An array already (y, x, features) passes through."""
    if array.ndim == 3:
        return array
    moved = np.moveaxis(array, -4, -2)  # (..., y, x, head, dim)
    return moved.reshape(*moved.shape[:-2], -1)


def quantise(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., y, x, dim) floats -> int8 values of the same shape and float32 scales (..., dim): one per
    channel of each head (and timestep), its largest magnitude over the token grid over 127, so that
    values * scale is the array to within half a scale step."""
    peak = np.abs(array).max(axis=(-3, -2)).astype(np.float32)
    scale = np.where(peak > 0, peak / 127, 1).astype(np.float32)
    return np.rint(array / scale[..., None, None, :]).astype(np.int8), scale


def dequantise(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 array that ``quantise`` stored as int8 ``values`` and ``scale``."""
    return values.astype(np.float32) * scale[..., None, None, :]


def stored_array(layer_group, name: str, index=...) -> np.ndarray:
    """A layer's stored q, k or v (from a zarr group or any mapping of arrays) as floats, int8 ones
    dequantised with their ``<name>_scale``; ``index`` picks along the leading axis (a timestep)."""
    values = layer_group[name][index]
    return dequantise(values, layer_group[f"{name}_scale"][index]) if values.dtype == np.int8 else values
