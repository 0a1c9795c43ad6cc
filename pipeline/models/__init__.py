"""The model registry: a name -> a spec, in the manner of timm's registry.

Specs are plain data (no torch import), so the workflow can ask for a model's preprocessing
without loading it. ``build_model`` (in ``pipeline.models.build``) turns a spec into a torch module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import LdsError


PROVENANCE_KEYS = ("model", "timm_name", "pretrained", "weights", "model_description")


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

    def provenance(self) -> dict[str, Any]:
        """What every artifact made with this model says about it."""
        return {
            "model": self.name,
            "timm_name": self.timm_name,
            "pretrained": self.pretrained,
            "weights": "pretrained" if self.pretrained else "random initialisation (NOT pretrained)",
            "model_description": self.description,
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
                  mean=(0.4815, 0.4578, 0.4082), std=(0.2686, 0.2613, 0.2758)),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered name, or of ``timm:<model_name>`` (pretrained weights from the hub)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:") and len(name) > 5:
        timm_name = name[5:]
        patch = 8 if "patch8" in timm_name else 14 if "patch14" in timm_name else 16
        return ModelSpec(name, timm_name, True, f"timm {timm_name}", patch, 448)
    raise LdsError(f"unknown model {name!r}; known: {', '.join(REGISTRY)} or timm:<name> (see `lds models`)")
