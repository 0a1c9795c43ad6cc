"""Self-attention queries, keys and values of a Stable Diffusion UNet (METHOD.md sections 1, 3, 4).

The image is VAE-encoded (posterior mean x scaling factor), noised at each timestep of a sampled pool
(its own Gaussian noise per timestep) with the training schedule, and the UNet is run with the
empty-prompt embedding. Forward hooks on ``to_q``,
``to_k``, ``to_v`` of every self-attention module (``attn1``; cross-attention ``attn2`` is never read)
copy the projections into preallocated arrays of the output dtype, so no N x N matrix outlives the
layer that computes it.

The image, latent, noise, timesteps and prompt embedding live on the model's device; each timestep's
noise is drawn on the CPU generator and then moved there, so a seed gives the same noise on every device
and the stored Q, K, V agree between CPU and GPU up to float error.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.errors import LdsError
from pipeline.extract.core import LayerAttention, to_numpy
from pipeline.models.diffusion import StableDiffusion


def item_generator(seed: int, item: str) -> torch.Generator:
    """A generator for one image's timesteps and noise: reproducible, different for every image."""
    digest = hashlib.sha256(f"{seed}/{item}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def sample_timesteps(count: int, max_timestep: int, generator: torch.Generator) -> list[int]:
    """A pool of ``count`` distinct timesteps drawn uniformly from 0..max_timestep, ascending.

    The paper samples a timestep and noise in every forward pass; lds stores such a pool (each timestep
    with its own noise, see ``extract_attention_sd``) and the solver's buffer draws from it.
    """
    if not 1 <= count <= max_timestep + 1:
        raise LdsError(f"--timesteps {count} must be between 1 and --max-timestep + 1 = {max_timestep + 1}")
    return sorted(torch.randperm(max_timestep + 1, generator=generator)[:count].tolist())


def self_attention_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(module path, module) of every self-attention module of the UNet."""
    from diffusers.models.attention_processor import Attention

    return [(path, m) for path, m in unet.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]


def layer_name(index: int, path: str) -> str:
    """'03-down1.0.t0' for the 4th self-attention run, 'down_blocks.1.attentions.0.transformer_blocks.0.attn1'."""
    short = path.removesuffix(".attn1").replace("_blocks.", "").replace("_block.", "")
    return f"{index:02d}-{short.replace('attentions.', '').replace('transformer', 't')}"


def token_grid(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The (y, x) grid of a layer with ``tokens`` tokens: the latent grid halved (rounding up) k times."""
    height, width = latent
    while height * width > tokens:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != tokens:
        raise RuntimeError(f"{tokens} tokens match no downsampling of the {latent[0]}x{latent[1]} latent")
    return height, width


@torch.no_grad()
def encode(vae: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The latent of an image in [-1, 1]: the posterior mean, shifted and scaled as the UNet expects."""
    latent = vae.encode(image).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


@torch.no_grad()
def extract_attention_sd(
    sd: StableDiffusion, image: torch.Tensor, timesteps: list[int], generator: torch.Generator, dtype=np.float16
) -> list[LayerAttention]:
    """Q, K, V of every UNet self-attention layer at each timestep: arrays (timestep, head, y, x, dim).

    ``image``: (1, 3, H, W) in [-1, 1], on the model's device; ``generator`` (a CPU one) draws one
    Gaussian noise per timestep. Layers are named in the order the UNet runs them (down, mid, up).
    """
    latent = encode(sd.vae, image)
    modules = self_attention_modules(sd.unet)
    order: list[str] = []
    arrays: dict[str, dict[str, np.ndarray]] = {path: {} for path, _ in modules}
    step = 0

    def hook_for(path: str, module: torch.nn.Module, part: str):
        norm = {"q": module.norm_q, "k": module.norm_k}.get(part)

        def hook(linear, args, output):
            heads = module.heads
            tokens = output.view(1, output.shape[1], heads, -1).transpose(1, 2)  # (1, head, N, dim)
            if norm is not None:  # as the attention processors apply it
                tokens = norm(tokens)
            grid = token_grid(tokens.shape[2], tuple(latent.shape[-2:]))
            if part not in arrays[path]:
                if part == "q":
                    order.append(path)
                arrays[path][part] = np.empty((len(timesteps), heads, *grid, tokens.shape[-1]), dtype)
            arrays[path][part][step] = to_numpy(tokens[0].reshape(heads, *grid, -1))

        return hook

    handles = [
        getattr(module, f"to_{part}").register_forward_hook(hook_for(path, module, part))
        for path, module in modules
        for part in "qkv"
    ]
    try:
        for step, t in enumerate(timesteps):
            noise = torch.randn(latent.shape, generator=generator).to(latent.device)  # CPU draw: same on any device
            timestep = torch.tensor([t], device=latent.device)
            sd.unet(sd.scheduler.add_noise(latent, noise, timestep), timestep, encoder_hidden_states=sd.prompt_embedding)
    finally:
        for handle in handles:
            handle.remove()
    scales = dict(modules)
    return [
        LayerAttention(layer_name(i, path), *(arrays[path][p] for p in "qkv"), float(scales[path].scale), tuple(timesteps))
        for i, path in enumerate(order)
    ]
