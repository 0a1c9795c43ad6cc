"""Hugging Face transformers ViTs: ViTModel (DINO, DeiT), CLIPVisionModel, Dinov2Model,
Dinov2WithRegistersModel and ViTMAEModel, built at random from a config, from a ``save_pretrained``
folder, from a state dict file, or from the hub cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import LdsError, one_line
from pipeline.models import ModelSpec
from pipeline.models.hub import load_state, weights_unavailable

# transformers model_type -> the class whose attention lds reads
ARCHITECTURES = {
    "vit": "ViTModel",
    "clip": "CLIPVisionModel",  # a whole CLIP checkpoint: its vision tower
    "clip_vision_model": "CLIPVisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "vit_mae": "ViTMAEModel",
}
WEIGHTS_HINT = "FOLDER (written by save_pretrained) or a .safetensors state dict"


def model_class(model_type: str, model: str) -> type:
    """The transformers class for a config's ``model_type``."""
    import transformers

    if model_type not in ARCHITECTURES:
        raise LdsError(
            f"model {model} is a transformers {model_type!r} model; lds reads "
            f"{', '.join(sorted(set(ARCHITECTURES.values())))}"
        )
    return getattr(transformers, ARCHITECTURES[model_type])


def _overrides(model_type: str) -> dict[str, Any]:
    # ViT-MAE hides 75% of the patches at random by default: keep them all (the order is fixed at forward)
    return {"mask_ratio": 0.0} if model_type == "vit_mae" else {}


def _from_config(config: dict[str, Any], model: str, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig

    settings = dict(config)
    model_type = settings.pop("model_type")
    torch.manual_seed(seed)
    return model_class(model_type, model)(AutoConfig.for_model(model_type, **settings, **_overrides(model_type)))


def _from_pretrained(source: str | Path, model: str) -> torch.nn.Module:
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(source).model_type
    return model_class(model_type, model).from_pretrained(source, **_overrides(model_type))


def _pretrained_config(spec: ModelSpec) -> dict[str, Any]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.repo_id)
    except Exception as error:
        raise weights_unavailable(spec.name, f"transformers {spec.repo_id}", error, WEIGHTS_HINT) from None
    vision = getattr(config, "vision_config", config)  # a whole CLIP config holds the vision tower's
    return {**vision.to_diff_dict(), "model_type": vision.model_type}


def build_hf_model(spec: ModelSpec, weights: str | Path | None = None, seed: int = 0) -> torch.nn.Module:
    """A transformers vision model in eval mode.

    ``weights``: a folder written by ``save_pretrained`` (config and weights), or a state dict file
    (``.safetensors`` / ``.pth`` / ``.bin``) for the spec's own architecture; otherwise random models
    are initialised from ``seed`` and pretrained ones come from the Hugging Face cache or hub.
    """
    if weights is not None and Path(weights).is_dir():
        try:
            model = _from_pretrained(Path(weights), spec.name)
        except OSError as error:
            raise LdsError(
                f"weights folder {weights} for model {spec.name} is not a transformers checkpoint ({one_line(error)})"
            ) from None
    elif weights is not None:
        config = spec.config if not spec.pretrained else _pretrained_config(spec)
        model = _from_config(config, spec.name, seed)
        load_state(model, Path(weights), spec.name)
    elif not spec.pretrained:
        model = _from_config(spec.config, spec.name, seed)
    else:
        try:
            model = _from_pretrained(spec.repo_id, spec.name)
        except LdsError:
            raise
        except Exception as error:  # offline hub errors come in many types
            raise weights_unavailable(spec.name, f"transformers {spec.repo_id}", error, WEIGHTS_HINT) from None
    return model.eval()
