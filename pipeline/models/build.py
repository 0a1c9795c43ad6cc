"""Turn a model spec into a torch module: random from config, local weights, or the hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.errors import LdsError
from pipeline.models import ModelSpec


def build_model(spec: ModelSpec, weights: str | Path | None = None, seed: int = 0) -> torch.nn.Module:
    """A timm VisionTransformer in eval mode, accepting any image size (``dynamic_img_size``).

    ``weights``: a local ``.safetensors`` / ``.pth`` state dict; otherwise registered random models are
    initialised from ``seed`` and pretrained ones come from the Hugging Face cache or hub.
    """
    import timm

    kwargs = {"dynamic_img_size": True, **spec.timm_kwargs}
    if weights is not None:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        model.load_state_dict(_read_state_dict(Path(weights), spec))
    elif not spec.pretrained:
        torch.manual_seed(seed)
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    else:
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as error:  # offline hub errors come in many types
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            raise LdsError(
                f"weights for model {spec.name} (timm {spec.timm_name}) are not available: not in the "
                f"Hugging Face cache under {cache} and the hub is unreachable ({type(error).__name__}); "
                "copy the cache from a machine with internet or pass --weights PATH"
            ) from None
    return model.eval()


def _read_state_dict(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LdsError(f"weights file {path} for model {spec.name} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LdsError(f"weights file {path} for model {spec.name} is unreadable ({error})") from None
    return state.get("model", state) if isinstance(state, dict) else state
