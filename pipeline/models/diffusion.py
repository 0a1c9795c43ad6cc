"""Stable Diffusion 1.x / 2.x from diffusers: the UNet, the VAE, the noise schedule and the text
embedding of the empty prompt, built at random from a config, from a folder in the diffusers layout,
or from the hub cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import LdsError, one_line
from pipeline.models import ModelSpec
from pipeline.models.hub import weights_unavailable

# Stable Diffusion's training schedule (scheduler/scheduler_config.json of the 1.x and 2.x repos)
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
WEIGHTS_HINT = "FOLDER (a diffusers pipeline written by save_pretrained: unet/, vae/, text_encoder/)"


@dataclass
class StableDiffusion:
    """What extraction needs: the text encoder is run once for the empty prompt, then dropped."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any  # a diffusers scheduler: add_noise over the training schedule
    prompt_embedding: torch.Tensor  # (1, tokens, width): text encoder output for the empty prompt

    def to(self, device: str | torch.device) -> StableDiffusion:
        """The UNet, VAE and prompt embedding moved to ``device`` (as ``torch.nn.Module.to``): self."""
        self.unet, self.vae = self.unet.to(device), self.vae.to(device)
        self.prompt_embedding = self.prompt_embedding.to(device)
        return self


def empty_prompt_ids(tokenizer, text_config) -> torch.Tensor:
    """Token ids of "" padded to the text encoder's length, as the diffusers pipelines tokenise it; from
    the config's special tokens when there is no tokenizer (random models)."""
    if tokenizer is not None:
        return tokenizer(
            "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
    length = text_config.max_position_embeddings
    return torch.tensor([[text_config.bos_token_id, text_config.eos_token_id] + [text_config.pad_token_id] * (length - 2)])


@torch.no_grad()
def _assemble(unet, vae, scheduler, text_encoder, tokenizer) -> StableDiffusion:
    ids = empty_prompt_ids(tokenizer, text_encoder.config)
    embedding = text_encoder.eval()(ids)[0]
    return StableDiffusion(unet.eval(), vae.eval(), scheduler, embedding)


def random_parts(config: dict[str, dict], seed: int) -> dict[str, Any]:
    """unet, vae, text_encoder (random, from ``seed``) and scheduler, by their diffusers subfolder names:
    ``part.save_pretrained(folder / name)`` for each makes a folder that ``--weights`` reads."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return {
        "unet": UNet2DConditionModel(**config["unet"]),
        "vae": AutoencoderKL(**config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        "scheduler": PNDMScheduler(**SD_SCHEDULE),
    }


def _in_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Parameters copied out of the memory-mapped weights file into ordinary (aligned) memory, so the
    CPU runs the same kernels, to the bit, as for the same model built in memory."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()
    return module


def _load(source: str | Path) -> StableDiffusion:
    """Components from a hub repo or a local folder; a folder may lack scheduler/ and tokenizer/."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    def present(subfolder: str) -> bool:  # hub repos of Stable Diffusion have every part
        return not isinstance(source, Path) or (source / subfolder).is_dir()

    unet = _in_memory(UNet2DConditionModel.from_pretrained(source, subfolder="unet", low_cpu_mem_usage=False))
    vae = _in_memory(AutoencoderKL.from_pretrained(source, subfolder="vae", low_cpu_mem_usage=False))
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    scheduler = (
        PNDMScheduler.from_pretrained(source, subfolder="scheduler") if present("scheduler") else PNDMScheduler(**SD_SCHEDULE)
    )
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer") if present("tokenizer") else None
    return _assemble(unet, vae, scheduler, text_encoder, tokenizer)


def build_stable_diffusion(spec: ModelSpec, weights: str | Path | None = None, seed: int = 0) -> StableDiffusion:
    """Stable Diffusion in eval mode.

    ``weights``: a folder in the diffusers layout (``unet/``, ``vae/``, ``text_encoder/``, optionally
    ``scheduler/`` and ``tokenizer/``); otherwise random models are initialised from ``seed`` and
    pretrained ones come from the Hugging Face cache or hub.
    """
    if weights is not None:
        folder = Path(weights)
        if not folder.is_dir():
            raise LdsError(
                f"weights {folder} for model {spec.name} must be a folder in the diffusers layout "
                "(unet/, vae/, text_encoder/, as written by save_pretrained)"
            )
        try:
            return _load(folder)
        except OSError as error:
            raise LdsError(f"weights folder {folder} for model {spec.name} is not a diffusers pipeline ({one_line(error)})") from None
    if not spec.pretrained:
        return _assemble(**random_parts(spec.config, seed), tokenizer=None)
    try:
        return _load(spec.repo_id)
    except Exception as error:  # offline hub errors come in many types
        raise weights_unavailable(spec.name, f"diffusers {spec.repo_id}", error, WEIGHTS_HINT) from None
