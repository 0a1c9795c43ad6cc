"""CLIP for zero-shot labels: the text tower, and the projection of the vision tower's last-layer value
vectors into the joint image-text space (MaskCLIP's trick), from a transformers ``CLIPModel``.

Value vectors v (tokens, heads x head_dim) -> the last attention layer's output projection -> the vision
tower's post-layernorm -> its visual projection. That is the path CLIP's image embedding takes from the
last layer's attention output, with the attention replaced by the identity (each token keeps its own
value) and without the last residual connection and MLP (lds stores only Q, K and V).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import LdsError, one_line
from pipeline.models.hub import weights_unavailable

WEIGHTS_HINT = "FOLDER (save_pretrained of a transformers CLIPModel and its tokenizer)"


@dataclass
class Clip:
    """A CLIPModel (eval mode), its tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    source: str

    @property
    def layers(self) -> int:
        return self.model.config.vision_config.num_hidden_layers

    @property
    def width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """(prompts, projection_dim) text embeddings (not normalised)."""
        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return self.model.text_projection(pooled).double().numpy()

    @torch.no_grad()
    def project_values(self, values: np.ndarray) -> np.ndarray:
        """Last-layer value vectors (tokens, width) -> (tokens, projection_dim) in the joint space."""
        vision = self.model.vision_model
        hidden = vision.encoder.layers[-1].self_attn.out_proj(torch.from_numpy(np.asarray(values, np.float32)))
        return self.model.visual_projection(vision.post_layernorm(hidden)).double().numpy()


def load_clip(repo_id: str | None, folder: Path | None) -> Clip:
    """A CLIPModel and its tokenizer from a ``save_pretrained`` folder, or from the Hugging Face cache or hub."""
    from transformers import AutoTokenizer, CLIPModel

    if folder is not None:
        try:
            model = CLIPModel.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise LdsError(f"CLIP weights folder {folder} does not hold a transformers CLIPModel ({one_line(error)})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as error:
            raise LdsError(f"CLIP weights folder {folder} holds no tokenizer; save_pretrained one there ({one_line(error)})") from None
        return Clip(model.eval(), tokenizer, f"local folder {folder}")
    try:
        model = CLIPModel.from_pretrained(repo_id)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except Exception as error:  # offline hub errors come in many types
        raise weights_unavailable(f"hf:{repo_id}", f"transformers CLIPModel {repo_id}, text and vision towers", error, WEIGHTS_HINT) from None
    return Clip(model.eval(), tokenizer, f"pretrained {repo_id} (Hugging Face)")
