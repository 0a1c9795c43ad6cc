"""Self-attention extraction from a Stable Diffusion UNet on the registered random "tiny-sd"
(METHOD.md sections 1, 3 and 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import LdsError
from pipeline.extract.core import image_tensor
from pipeline.extract.diffusion import (
    encode,
    extract_attention_sd,
    item_generator,
    sample_timesteps,
    self_attention_modules,
)
from pipeline.models import get_spec
from pipeline.models.build import build_model
from pipeline.models.diffusion import empty_prompt_ids, random_parts
from pipeline.solve.params import SolverParams
from pipeline.store import ArtifactRef, Store
from stages.cli import cli
from pipeline.extract.stage import TIMESTEP_POOL
from stages.extract import extract

HEADS = 8
# tiny-sd on a 64 x 96 image: latent 8 x 12; self-attention in run order (down, mid, up)
LAYERS = [
    ("00-down0.0.t0", (8, 12), 4), ("01-down1.0.t0", (4, 6), 8), ("02-mid0.t0", (2, 3), 8),
    ("03-up1.0.t0", (4, 6), 8), ("04-up1.1.t0", (4, 6), 8), ("05-up2.0.t0", (8, 12), 4), ("06-up2.1.t0", (8, 12), 4),
]
TIMESTEPS = [3, 120, 250]


@pytest.fixture(scope="module")
def spec():
    return get_spec("tiny-sd")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1


def softmax_np(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_tiny_sd_is_random_and_preprocessed_as_stable_diffusion(spec):
    assert spec.family == "diffusers" and not spec.pretrained
    assert "NOT pretrained" in spec.provenance()["weights"] and spec.provenance()["pretrained"] is False
    assert spec.image_size == 512 and spec.preprocess_mode == "center-crop" and spec.mean == spec.std == (0.5, 0.5, 0.5)
    assert image_tensor(np.full((2, 2, 3), 255, np.uint8), spec.mean, spec.std).eq(1).all()  # [0, 255] -> [-1, 1]


def test_only_self_attention_is_captured_with_a_leading_timestep_axis(spec, image):
    sd = build_model(spec)
    layers = extract_attention_sd(sd, image, TIMESTEPS, torch.Generator().manual_seed(0))
    attn1 = [path for path, _ in sd.unet.named_modules() if path.endswith(".attn1")]
    assert len(self_attention_modules(sd.unet)) == len(attn1) == len(LAYERS)
    assert [(layer.name, layer.grid) for layer in layers] == [(name, grid) for name, grid, _ in LAYERS]
    for layer, (_, grid, dim) in zip(layers, LAYERS):
        assert layer.q.shape == layer.k.shape == layer.v.shape == (len(TIMESTEPS), HEADS, *grid, dim)
        assert layer.q.dtype == np.float16 and layer.timesteps == tuple(TIMESTEPS)
        assert layer.scale == pytest.approx(dim**-0.5)


def test_stored_qk_give_the_unets_own_attention_and_the_output_is_unchanged(spec, image):
    """Reference: diffusers' classic AttnProcessor computes the probabilities with
    ``attn.get_attention_scores``; we record them in the same forward passes as the extraction."""
    from diffusers.models.attention_processor import AttnProcessor

    sd = build_model(spec)
    sd.unet.set_attn_processor(AttnProcessor())
    recorded = []
    for _, module in self_attention_modules(sd.unet):
        original = module.get_attention_scores
        module.get_attention_scores = lambda q, k, mask=None, original=original: recorded.append(original(q, k, mask)) or recorded[-1]
    inputs, outputs = [], []
    hooks = hook_count(sd.unet)
    handles = [
        sd.unet.register_forward_pre_hook(lambda m, args, kwargs: inputs.append((args, kwargs)), with_kwargs=True),
        sd.unet.register_forward_hook(lambda m, args, out: outputs.append(out.sample.clone())),
    ]
    try:
        layers = extract_attention_sd(sd, image, TIMESTEPS, torch.Generator().manual_seed(1))
    finally:
        for handle in handles:
            handle.remove()
    assert hook_count(sd.unet) == hooks and len(recorded) == len(TIMESTEPS) * len(LAYERS)
    for step in range(len(TIMESTEPS)):
        for index, layer in enumerate(layers):
            p = recorded[step * len(LAYERS) + index].double().numpy()  # (head, N, N), batch of one
            q, k = (a[step].astype(np.float64).reshape(HEADS, -1, a.shape[-1]) for a in (layer.q, layer.k))
            np.testing.assert_allclose(softmax_np(q @ k.transpose(0, 2, 1) * layer.scale), p, atol=2e-3, rtol=0)
    with torch.no_grad():  # the same inputs without the extraction's hooks give the same output
        for (args, kwargs), output in zip(inputs, outputs):
            torch.testing.assert_close(sd.unet(*args, **kwargs).sample, output, rtol=0, atol=0)


def test_unet_sees_the_noised_scaled_latent_and_the_empty_prompt(spec, image):
    """METHOD.md section 3: latent = VAE posterior mean x scaling factor, noised at each sampled timestep
    with the training schedule; the UNet's text condition is the empty prompt's embedding."""
    sd = build_model(spec)
    seen = []
    handle = sd.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        generator = item_generator(0, "img")
        steps = sample_timesteps(3, 250, generator)
        extract_attention_sd(sd, image, steps, generator)
    finally:
        handle.remove()
    with torch.no_grad():
        latent = sd.vae.encode(image).latent_dist.mean * 0.18215
    torch.testing.assert_close(encode(sd.vae, image), latent)
    replay = item_generator(0, "img")
    assert sample_timesteps(3, 250, replay) == steps
    alphas = sd.scheduler.alphas_cumprod
    noises = []
    for (args, kwargs), t in zip(seen, steps, strict=True):
        noises.append(torch.randn(latent.shape, generator=replay))
        expected = alphas[t].sqrt() * latent + (1 - alphas[t]).sqrt() * noises[-1]
        torch.testing.assert_close(args[0], expected)
        assert args[1].tolist() == [t]
        torch.testing.assert_close(kwargs["encoder_hidden_states"], sd.prompt_embedding)
    correlation = torch.corrcoef(torch.stack(noises).flatten(1))
    assert (correlation - torch.eye(3)).abs().max() < 0.5  # each timestep its own noise
    assert sd.prompt_embedding.shape == (1, 77, 32)


def test_empty_prompt_without_a_tokenizer_is_bos_eos_then_padding(spec):
    from transformers import CLIPTextConfig

    ids = empty_prompt_ids(None, CLIPTextConfig(**spec.config["text_encoder"]))
    assert ids.tolist() == [[0, 2] + [1] * 75]


def test_timesteps_are_a_pool_of_20_distinct_in_range_and_reproducible_per_image():
    """METHOD.md section 3: a timestep per forward pass; the stored pool of 20 stands in, larger than the buffer."""
    assert extract.params[[p.name for p in extract.params].index("timesteps")].default == TIMESTEP_POOL == 20
    assert TIMESTEP_POOL > SolverParams().buffer
    a = sample_timesteps(TIMESTEP_POOL, 250, item_generator(0, "a"))
    assert a == sorted(set(a)) and len(a) == 20 and 0 <= a[0] and a[-1] <= 250
    assert a == sample_timesteps(TIMESTEP_POOL, 250, item_generator(0, "a"))
    assert a != sample_timesteps(TIMESTEP_POOL, 250, item_generator(0, "b"))
    assert sample_timesteps(251, 250, item_generator(0, "a")) == list(range(251))
    assert sample_timesteps(4, 3, item_generator(0, "a")) == [0, 1, 2, 3]
    with pytest.raises(LdsError, match="--timesteps 5 must be between 1 and --max-timestep"):
        sample_timesteps(5, 3, item_generator(0, "a"))


def test_weights_folder_loads_back_with_identical_qkv(spec, image, tmp_path):
    for name, part in random_parts(spec.config, seed=3).items():
        part.save_pretrained(tmp_path / name)
    source = build_model(spec, seed=3)
    loaded = build_model(spec, weights=tmp_path)
    other = build_model(spec)  # seed 0: the folder must really have been used
    torch.testing.assert_close(loaded.prompt_embedding, source.prompt_embedding, rtol=0, atol=0)
    expected, got, different = (
        extract_attention_sd(sd, image, [7], torch.Generator().manual_seed(0)) for sd in (source, loaded, other)
    )
    for a, b, c in zip(expected, got, different):
        for part in "qkv":
            np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
        assert not np.array_equal(a.q, c.q)
    with pytest.raises(LdsError, match="must be a folder in the diffusers layout"):
        build_model(spec, weights=tmp_path / "unet" / "config.json")


def test_stable_diffusion_offline_without_cache_raises_one_clear_line(offline_hub):
    with pytest.raises(LdsError) as error:
        build_model(get_spec("sd15"))
    message = str(error.value)
    assert "sd15" in message and "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert str(offline_hub) in message and "HF_HUB_OFFLINE=1" in message and "--weights FOLDER" in message
    assert "\n" not in message


def lds(*args, expect_ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_cli_stores_timesteps_and_dataset_mode_keeps_coarse_layers_with_heads_joined(spec, tmp_path):
    store = tmp_path / "store"
    lds("preprocess", "--dataset", "synthetic-shapes:1", "--size", 64, "--mode", "center-crop", "--multiple", spec.patch_size,
        "--store", store, "--manifest", tmp_path / "p.json")
    common = ["--input", tmp_path / "p.json", "--model", "tiny-sd", "--timesteps", 2, "--store", store]
    lds("extract", *common, "--manifest", tmp_path / "all.json")
    lds("extract", *common, "--max-resolution", 4, "--concat-heads", "--manifest", tmp_path / "coarse.json")
    full, coarse = (Store(store).open(ArtifactRef("extract", json.loads((tmp_path / f"{m}.json").read_text())["key"]))
                    for m in ("all", "coarse"))
    item = full["items/shapes-0000"]
    steps = item.attrs["timesteps"]
    assert steps == sample_timesteps(2, 250, item_generator(0, "shapes-0000"))
    assert item.attrs["grid"] == [8, 8] and item.attrs["patch_size"] == 8
    layer = item["layers/00-down0.0.t0"]
    assert list(layer["q"].metadata.dimension_names) == ["timestep", "head", "y", "x", "dim"]
    assert layer["q"].shape == (2, HEADS, 8, 8, 4) and layer["q"].chunks == (1, HEADS, 8, 8, 4)
    assert dict(layer.attrs) == {"resolution": [8, 8], "heads": HEADS, "head_dim": 4, "scale": 0.5, "timesteps": steps}
    kept = sorted(name for name, _ in coarse["items/shapes-0000/layers"].groups())
    assert kept == ["01-down1.0.t0", "02-mid0.t0", "03-up1.0.t0", "04-up1.1.t0"]
    joined = coarse["items/shapes-0000/layers/02-mid0.t0"]
    assert joined["v"].shape == (2, 1, 2, 2, HEADS * 8) and joined.attrs["concatenated_heads"] == HEADS
    per_head = full["items/shapes-0000/layers/02-mid0.t0/v"][...]
    np.testing.assert_array_equal(joined["v"][...][:, 0], np.concatenate(list(per_head.transpose(1, 0, 2, 3, 4)), axis=-1))
    shown = lds("inspect", tmp_path / "all.json", "--store", store).output
    assert "resolution=8x8 heads=8 head_dim=4" in shown and "dims=(timestep,head,y,x,dim)" in shown
    refused = lds("extract", *common, "--max-resolution", 1, expect_ok=False)
    assert refused.exit_code != 0 and "no attention layer of model tiny-sd" in refused.output
    # lds solve on the timestep pool: accumulate auto resolves to 20 passes per step and is recorded as such
    solve = ["solve", "--input", tmp_path / "all.json", "--steps", 2, "--channels", 4, "--store", store]
    solved = lds(*solve, "--manifest", tmp_path / "s.json")
    assert "holds 2 attention sets (timesteps), not more than --buffer 5" in solved.output
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["params"]["accumulate"] == 20 and record["params"]["buffer"] == 5
    assert Store(store).open(ArtifactRef("solve", record["key"])).attrs["params"]["accumulate"] == 20
    assert "solve: cached" in lds(*solve, "--accumulate", 20).output  # auto and its value: one artifact
    three = lds(*solve, "--accumulate", 3, "--manifest", tmp_path / "s3.json")
    assert "solve: made" in three.output and json.loads((tmp_path / "s3.json").read_text())["params"]["accumulate"] == 3
    assert "expected auto or an integer >= 1" in lds(*solve, "--accumulate", "0", expect_ok=False).output
