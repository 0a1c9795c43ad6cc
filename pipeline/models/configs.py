"""Architectures of the registered random (NOT pretrained) transformers and diffusers models, as the
keyword arguments of their config classes. Plain data: importing this module imports no torch."""

from __future__ import annotations

from typing import Any

# transformers: AutoConfig.for_model(model_type, **rest); 4 layers, 4 heads, width 64
_TINY_VIT = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


def tiny_hf(model_type: str, patch_size: int, **extra: Any) -> dict[str, Any]:
    """A tiny transformers ViT-like config whose position embeddings cover 224 px."""
    return {"model_type": model_type, **_TINY_VIT, "patch_size": patch_size, "image_size": 224, **extra}


# diffusers: UNet2DConditionModel(**unet), AutoencoderKL(**vae), transformers CLIPTextConfig(**text_encoder)
TINY_SD = {
    # 3 levels (32 and 64 channels, 8 heads): self-attention at 1/8, 1/16 and (mid block) 1/32 of the image
    "unet": {
        "sample_size": 16,
        "layers_per_block": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    # 4 levels as in Stable Diffusion: the latent is 1/8 of the image, 4 channels
    "vae": {
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
    },
    "text_encoder": {
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
}

# Stable Diffusion 1.5's architecture (unet/, vae/ and text_encoder/ configs of the 1.5 repo)
SD15 = {
    "unet": {  # diffusers' UNet2DConditionModel defaults are SD 1.x's, but for these two
        "sample_size": 64,
        "cross_attention_dim": 768,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 512,
    },
    "text_encoder": {  # the text tower of CLIP ViT-L/14
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    },
}
