"""Weights from the Hugging Face hub or cache, a local file or folder, and the one-line error when
they cannot be found."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import LdsError, one_line


def hub_cache() -> str:
    """The folder huggingface_hub reads and fills ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def weights_unavailable(model: str, source: str, error: BaseException, weights_hint: str) -> LdsError:
    """The error for pretrained weights that are neither in the cache nor downloadable."""
    from huggingface_hub import constants

    offline = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
    return LdsError(
        f"weights for model {model} ({source}) are not available: not in the Hugging Face cache under "
        f"{hub_cache()} and {offline} ({type(error).__name__}); copy the cache from a machine with internet "
        f"or pass --weights {weights_hint}"
    )


def read_state_dict(path: Path, model: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch pickle (``.pth`` / ``.bin``)."""
    if path.is_dir():
        raise LdsError(f"weights {path} for model {model} is a folder; this model takes one state-dict file "
                       "(.safetensors, .pth or .bin); folders are for transformers / diffusers models")
    if not path.is_file():
        raise LdsError(f"weights file {path} for model {model} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LdsError(f"weights file {path} for model {model} is unreadable ({one_line(error)})") from None
    return state.get("model", state) if isinstance(state, dict) else state


def load_state(module: torch.nn.Module, path: Path, model: str) -> None:
    """Load a state dict file into ``module``, every key matching."""
    try:
        module.load_state_dict(read_state_dict(path, model))
    except RuntimeError as error:
        raise LdsError(f"weights file {path} does not fit model {model}: {one_line(error)}") from None
