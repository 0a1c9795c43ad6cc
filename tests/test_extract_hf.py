"""Extraction from Hugging Face transformers ViTs (ViT, CLIP, DINOv2 with and without registers,
ViT-MAE) on the registered tiny random models (METHOD.md section 1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import LdsError
from pipeline.extract.core import image_tensor
from pipeline.extract.hf import attention_modules_hf, extract_attention_hf, forward_kwargs
from pipeline.models import get_spec
from pipeline.models.build import build_model
from pipeline.store import ArtifactRef, Store
from stages.cli import cli

HEADS, HEAD_DIM, DEPTH = 4, 16, 4  # the tiny-hf-* models: width 64, 4 heads, 4 layers
PREFIX = {"tiny-hf-vit": 1, "tiny-hf-clip": 1, "tiny-hf-dinov2": 1, "tiny-hf-dinov2-reg": 5, "tiny-hf-mae": 1}
GRID = (3, 5)  # a non-square image: 3 x 5 patches


def image_for(patch: int) -> torch.Tensor:
    return torch.randn(1, 3, GRID[0] * patch, GRID[1] * patch, generator=torch.Generator().manual_seed(0))


def softmax_np(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(PREFIX))
def test_tiny_hf_models_are_random_and_give_patch_tokens_only(name):
    spec = get_spec(name)
    assert spec.family == "hf" and not spec.pretrained
    assert spec.provenance()["pretrained"] is False and "NOT pretrained" in spec.provenance()["weights"]
    model = build_model(spec)
    assert not model.training and len(attention_modules_hf(model)) == DEPTH
    layers = extract_attention_hf(model, image_for(spec.patch_size))
    assert [layer.name for layer in layers] == [f"block{i:02d}" for i in range(DEPTH)]
    for layer in layers:
        assert layer.q.shape == layer.k.shape == layer.v.shape == (HEADS, *GRID, HEAD_DIM)
        assert layer.grid == GRID and layer.scale == pytest.approx(HEAD_DIM**-0.5)


@pytest.mark.parametrize("name", list(PREFIX))
def test_stored_qk_give_the_models_own_attention_and_the_output_is_unchanged(name):
    """Reference: the model's own attention probabilities (eager attention, output_attentions=True) over
    all tokens; restricted to the patch tokens and renormalised, they must equal softmax(Q Kᵀ · scale)
    recomputed from Q and K as stored (float16)."""
    spec = get_spec(name)
    model = build_model(spec)
    model.set_attn_implementation("eager")
    image = image_for(spec.patch_size)
    kwargs = forward_kwargs(model, GRID[0] * GRID[1])
    with torch.no_grad():
        reference = model(image, output_attentions=True, **kwargs)
    hooks = hook_count(model)  # transformers keeps its own output-recording hooks
    outputs = []
    handle = model.register_forward_hook(lambda m, args, out: outputs.append(out.last_hidden_state.clone()))
    try:
        layers = extract_attention_hf(model, image)
    finally:
        handle.remove()
    assert hook_count(model) == hooks
    torch.testing.assert_close(outputs[0], reference.last_hidden_state, rtol=0, atol=0)
    prefix, tokens = PREFIX[name], GRID[0] * GRID[1]
    assert len(reference.attentions) == DEPTH
    for layer, probabilities in zip(layers, reference.attentions):
        p = probabilities[0].double().numpy()
        assert p.shape == (HEADS, prefix + tokens, prefix + tokens)
        patch = p[:, prefix:, prefix:]
        expected = patch / patch.sum(-1, keepdims=True)
        q, k = (a.astype(np.float16).astype(np.float64).reshape(HEADS, tokens, HEAD_DIM) for a in (layer.q, layer.k))
        ours = softmax_np(q @ k.transpose(0, 2, 1) * layer.scale)
        np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=0)


def test_vit_mae_keeps_every_patch_in_order():
    model = build_model(get_spec("tiny-hf-mae"))
    tokens = GRID[0] * GRID[1]
    with torch.no_grad():
        out = model(image_for(16), **forward_kwargs(model, tokens))
    assert out.last_hidden_state.shape[1] == 1 + tokens
    assert not out.mask.any()
    assert out.ids_restore[0].tolist() == list(range(tokens))


def test_image_not_a_multiple_of_the_patch_size_is_refused():
    model = build_model(get_spec("tiny-hf-dinov2"))
    with pytest.raises(LdsError, match="multiple of the model's patch size 14; preprocess with --multiple 14"):
        extract_attention_hf(model, torch.randn(1, 3, 3 * 14, 5 * 16))


@pytest.mark.parametrize("form", ["folder", "safetensors"])
def test_weights_saved_by_the_library_load_back_with_identical_qkv(tmp_path, form):
    spec = get_spec("tiny-hf-clip")
    source = build_model(spec, seed=3)
    if form == "folder":
        path = tmp_path / "clip"
        source.save_pretrained(path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    image = image_for(16)
    expected = extract_attention_hf(source, image)
    got = extract_attention_hf(build_model(spec, weights=path), image)
    other = extract_attention_hf(build_model(spec), image)  # seed 0: the file must really have been used
    for a, b, c in zip(expected, got, other):
        for part in "qkv":
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
        assert not np.allclose(a.q, c.q)


def test_a_folder_of_another_architecture_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(LdsError, match="transformers 'bert' model; lds reads CLIPVisionModel"):
        build_model(get_spec("tiny-hf-vit"), weights=tmp_path)


def test_hub_model_offline_without_cache_raises_one_clear_line(offline_hub):
    spec = get_spec("hf:facebook/dino-vits16")
    assert spec.family == "hf" and spec.pretrained and spec.patch_size == 16 and spec.repo_id == "facebook/dino-vits16"
    with pytest.raises(LdsError) as error:
        build_model(spec)
    message = str(error.value)
    assert "hf:facebook/dino-vits16" in message and str(offline_hub) in message
    assert "HF_HUB_OFFLINE=1" in message and "--weights FOLDER" in message
    assert "\n" not in message


def test_hub_specs_guess_patch_size_and_input_from_the_name():
    assert get_spec("hf:facebook/dino-vits8").patch_size == 8
    assert get_spec("hf:facebook/dinov2-small").patch_size == 14
    clip = get_spec("hf:openai/clip-vit-base-patch16")
    assert clip.patch_size == 16 and clip.mean == (0.4815, 0.4578, 0.4082)
    assert get_spec("hf:facebook/vit-mae-base").image_size == 224


def lds(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_cli_extract_with_a_weights_folder_and_dataset_mode(tmp_path):
    """`lds extract --weights FOLDER`: what is stored is the saved model's Q, K, V (float16); with
    --concat-heads each token's heads are joined into one vector, stored as a single head."""
    spec = get_spec("tiny-hf-dinov2-reg")
    source = build_model(spec, seed=7)
    source.save_pretrained(tmp_path / "weights")
    store = tmp_path / "store"
    lds("preprocess", "--dataset", "synthetic-shapes:1", "--size", 56, "--multiple", 14, "--store", store, "--manifest", tmp_path / "p.json")
    runs = {}
    for label, extra in [("plain", []), ("dataset", ["--concat-heads", "--max-resolution", 4])]:
        manifest = tmp_path / f"{label}.json"
        lds("extract", "--input", tmp_path / "p.json", "--model", spec.name, "--weights", tmp_path / "weights", *extra, "--store", store, "--manifest", manifest)
        runs[label] = Store(store).open(ArtifactRef("extract", json.loads(manifest.read_text())["key"]))
    item = "shapes-0000"
    pre = Store(store).open(ArtifactRef("preprocess", json.loads((tmp_path / "p.json").read_text())["key"]))
    expected = extract_attention_hf(source, image_tensor(pre[f"items/{item}/rgb"][...], spec.mean, spec.std))
    assert runs["plain"][f"items/{item}"].attrs["grid"] == [4, 4]
    assert runs["plain"][f"items/{item}"].attrs["patch_size"] == 14
    for layer in expected:
        group = runs["plain"][f"items/{item}/layers/{layer.name}"]
        assert dict(group.attrs) == {"resolution": [4, 4], "heads": HEADS, "head_dim": HEAD_DIM, "scale": layer.scale}
        np.testing.assert_array_equal(group["q"][...], layer.q.astype(np.float16))
        joined = runs["dataset"][f"items/{item}/layers/{layer.name}"]
        assert joined.attrs["heads"] == 1 and joined.attrs["concatenated_heads"] == HEADS
        assert list(joined["k"].metadata.dimension_names) == ["head", "y", "x", "dim"]
        by_token = np.concatenate([layer.k[h] for h in range(HEADS)], axis=-1).astype(np.float16)
        np.testing.assert_array_equal(joined["k"][...], by_token[None])
    assert runs["plain"].attrs["weights"] == str(tmp_path / "weights") and runs["plain"].attrs["family"] == "hf"
