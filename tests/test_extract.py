"""pipeline.extract.core and pipeline.models on the registered random "tiny-vit" (METHOD.md section 1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import LdsError
from pipeline.extract.core import LayerAttention, attention_modules, dequantise, extract_attention, image_tensor, to_numpy
from pipeline.extract.stage import ExtractParams, artifact_params, extract_image
from pipeline.models import get_spec
from pipeline.models.build import build_model
from pipeline.store import ArtifactRef, Store
from stages.cli import cli

PATCH = 16
HEADS, HEAD_DIM, DEPTH = 4, 16, 4  # tiny-vit: width 64, 4 heads, 4 layers


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(get_spec("tiny-vit"))


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def softmax_np(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_tiny_vit_spec_and_model_are_what_the_registry_says(model):
    spec = get_spec("tiny-vit")
    assert not spec.pretrained and spec.patch_size == PATCH
    assert "NOT pretrained" in spec.provenance()["weights"]
    assert not model.training
    assert len(attention_modules(model)) == DEPTH
    assert model.num_prefix_tokens == 1


def test_get_spec_unknown_name_raises():
    with pytest.raises(LdsError, match="unknown model 'no-such-model'"):
        get_spec("no-such-model")


def test_image_tensor_normalises_with_mean_and_std():
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.25, 0.25)
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 0, 51
    x = image_tensor(rgb, mean, std)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, (0.2 - 0.75) / 0.25], rtol=1e-6)


def test_extraction_does_not_change_the_model_output_and_removes_its_hooks(model, image):
    with torch.no_grad():
        before = model(image)
    outputs = []
    handle = model.register_forward_hook(lambda module, args, output: outputs.append(output.clone()))
    try:
        extract_attention(model, image, PATCH)
    finally:
        handle.remove()
    assert no_hooks_left(model)
    with torch.no_grad():
        after = model(image)
    assert len(outputs) == 1
    torch.testing.assert_close(outputs[0], before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_hooks_are_removed_when_the_forward_pass_fails(model):
    with pytest.raises(Exception):
        extract_attention(model, torch.randn(1, 5, 32, 32), PATCH)  # wrong number of channels
    assert no_hooks_left(model)


def test_non_square_image_gives_a_4x6_grid(model, image):
    layers = extract_attention(model, image, PATCH)
    assert [layer.name for layer in layers] == [f"block{i:02d}" for i in range(DEPTH)]
    for layer in layers:
        assert isinstance(layer, LayerAttention)
        assert layer.grid == (4, 6)
        assert layer.q.shape == layer.k.shape == layer.v.shape == (HEADS, 4, 6, HEAD_DIM)
        assert layer.scale == pytest.approx(HEAD_DIM**-0.5)


def test_qk_softmax_equals_the_models_own_attention_over_patch_tokens(model, image):
    """Reference path: timm's unfused attention computes softmax(q kᵀ scale) over all tokens (class
    token included) and hands it to ``attn_drop``; we capture that and the input of ``proj`` (= P V).
    Restricting a softmax to the patch tokens = renormalising the patch-to-patch block of P."""
    probabilities, mixed = {}, {}
    handles = []
    modules = attention_modules(model)
    for name, module in modules:
        module.fused_attn = False
        handles.append(module.attn_drop.register_forward_hook(
            lambda m, args, out, name=name: probabilities.__setitem__(name, args[0][0].double().numpy())))
        handles.append(module.proj.register_forward_pre_hook(
            lambda m, args, name=name: mixed.__setitem__(name, args[0][0].double().numpy())))
    try:
        layers = extract_attention(model, image, PATCH)
    finally:
        for handle in handles:
            handle.remove()
        for _, module in modules:
            module.fused_attn = True
    assert len(probabilities) == DEPTH
    tokens = 1 + 4 * 6
    for layer in layers:
        p = probabilities[layer.name]  # (head, tokens, tokens), rows sum to 1 over class + patch tokens
        assert p.shape == (HEADS, tokens, tokens)
        patch = p[:, 1:, 1:]
        reference = patch / patch.sum(-1, keepdims=True)
        q = layer.q.reshape(HEADS, 24, HEAD_DIM).astype(np.float64)
        k = layer.k.reshape(HEADS, 24, HEAD_DIM).astype(np.float64)
        ours = softmax_np(q @ k.transpose(0, 2, 1) * layer.scale)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)
        # values: the module's output before proj is P @ [v_cls; V]. Solve v_cls from the class-token row,
        # then every patch row must be reproduced from the returned V.
        v = layer.v.reshape(HEADS, 24, HEAD_DIM).astype(np.float64)
        out = mixed[layer.name].reshape(tokens, HEADS, HEAD_DIM).transpose(1, 0, 2)  # (head, tokens, dim)
        v_cls = (out[:, :1] - p[:, :1, 1:] @ v) / p[:, :1, :1]
        predicted = p[:, 1:, :1] @ v_cls + p[:, 1:, 1:] @ v
        np.testing.assert_allclose(predicted, out[:, 1:], rtol=1e-3, atol=1e-4)


def models_attention(model: torch.nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    """Each layer's attention probabilities among the patch tokens, as timm's unfused attention computes
    them (softmax over all tokens, handed to ``attn_drop``), renormalised over the patch tokens."""
    probabilities, handles = {}, []
    modules = attention_modules(model)
    for name, module in modules:
        module.fused_attn = False
        handles.append(module.attn_drop.register_forward_hook(
            lambda m, args, out, name=name: probabilities.__setitem__(name, args[0][0].double().numpy())))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
        for _, module in modules:
            module.fused_attn = True
    patches = {name: p[:, 1:, 1:] for name, p in probabilities.items()}
    return {name: p / p.sum(-1, keepdims=True) for name, p in patches.items()}


def test_extract_image_stores_qk_whose_softmax_is_the_models_attention(model):
    """`lds extract`'s work on one image, called directly: the stored (head, y, x, dim) arrays give the
    model's own attention back, float32 exactly as computed, int8 within its quantisation step."""
    spec = get_spec("tiny-vit")
    rgb = np.random.default_rng(3).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    reference = models_attention(model, image_tensor(rgb, spec.mean, spec.std))
    arrays, item_attrs, group_attrs = extract_image(model, rgb, spec, ExtractParams(dtype="float32"), "img")
    assert item_attrs == {"grid": [4, 6], "patch_size": PATCH, "image_size": [64, 96], "device": "cpu"}
    assert sorted(arrays) == sorted(f"layers/block{i:02d}/{part}" for i in range(DEPTH) for part in "qkv")
    int8, _, _ = extract_image(model, rgb, spec, ExtractParams(dtype="int8", arrays=("k", "q")), "img")
    assert sorted(int8) == sorted(f"layers/block{i:02d}/{part}" for i in range(DEPTH) for part in ("q", "q_scale", "k", "k_scale"))
    for name, attention in reference.items():
        group = f"layers/{name}"
        assert group_attrs[group] == {"resolution": [4, 6], "heads": HEADS, "head_dim": HEAD_DIM, "scale": pytest.approx(HEAD_DIM**-0.5)}
        q, k = (arrays[f"{group}/{part}"] for part in "qk")
        assert q.dims == ("head", "y", "x", "dim") and q.data.shape == (HEADS, 4, 6, HEAD_DIM) and q.data.dtype == np.float32
        logits = q.data.reshape(HEADS, 24, HEAD_DIM).astype(np.float64) @ k.data.reshape(HEADS, 24, HEAD_DIM).transpose(0, 2, 1)
        np.testing.assert_allclose(softmax_np(logits * group_attrs[group]["scale"]), attention, rtol=1e-4, atol=1e-6)
        for part in "qk":
            stored = int8[f"{group}/{part}"]
            assert stored.data.dtype == np.int8
            scale = int8[f"{group}/{part}_scale"].data
            np.testing.assert_allclose(dequantise(stored.data, scale), arrays[f"{group}/{part}"].data, atol=float(scale.max()) / 2 + 1e-6)


def test_extract_image_dataset_mode_keeps_coarse_layers_with_heads_joined(model):
    spec = get_spec("tiny-vit")
    rgb = np.random.default_rng(4).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    plain, _, _ = extract_image(model, rgb, spec, ExtractParams(dtype="float32", arrays=("v",)))
    joined, _, group_attrs = extract_image(model, rgb, spec, ExtractParams(dtype="float32", arrays=("v",), concat_heads=True, max_resolution=6))
    v = joined["layers/block01/v"]
    assert v.data.shape == (1, 4, 6, HEADS * HEAD_DIM) and group_attrs["layers/block01"]["concatenated_heads"] == HEADS
    np.testing.assert_array_equal(v.data[0, 2, 3], plain["layers/block01/v"].data[:, 2, 3].ravel())
    upsampled, item_attrs, _ = extract_image(model, rgb, spec, ExtractParams(arrays=("v",), upsample_to=8))
    assert upsampled["layers/block00/v"].data.shape == (HEADS, 8, 8, HEAD_DIM) and item_attrs["grid"] == [8, 8]
    with pytest.raises(LdsError, match="no attention layer of model tiny-vit on image img is 3x3 or coarser"):
        extract_image(model, rgb, spec, ExtractParams(max_resolution=3), "img")


def test_extract_params_check_the_arrays_and_the_artifact_params_name_what_makes_the_arrays(tmp_path):
    assert ExtractParams(arrays=("v", "q")).arrays == ("q", "v")
    with pytest.raises(LdsError, match="give a comma-separated subset of q, k, v"):
        ExtractParams(arrays=("x",))
    vit, sd = get_spec("tiny-vit"), get_spec("tiny-sd")
    assert artifact_params(ExtractParams(seed=3, device="cpu"), vit) == {
        "model": "tiny-vit", "weights_sha256": None, "seed": 3, "dtype": "float16", "arrays": ["q", "k", "v"]}
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    assert artifact_params(ExtractParams(seed=3, concat_heads=True), vit, weights)["seed"] is None  # the file makes the weights
    assert artifact_params(ExtractParams(timesteps=4, max_resolution=32, upsample_to=8), sd) == {
        "model": "tiny-sd", "weights_sha256": None, "seed": 0, "dtype": "float16", "arrays": ["q", "k", "v"], "timesteps": 4,
        "max_timestep": 250, "max_resolution": 32, "upsample_to": 8}


def test_bfloat16_forward_gives_nearly_the_float32_attention_under_its_own_key(model):
    """--precision bfloat16 runs the forward under autocast: float32 arrays stored, within bfloat16's
    rounding of the float32 forward's (not equal to them), and a key of its own; float32 keeps the
    key it had before the setting existed."""
    spec = get_spec("tiny-vit")
    rgb = np.random.default_rng(5).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    full, _, _ = extract_image(model, rgb, spec, ExtractParams(dtype="float32"))
    half, _, _ = extract_image(model, rgb, spec, ExtractParams(dtype="float32", precision="bfloat16"))
    for name, array in full.items():
        assert half[name].data.dtype == np.float32
        error = np.linalg.norm(half[name].data - array.data) / np.linalg.norm(array.data)
        assert 0 < error < 0.03, name
    assert "precision" not in artifact_params(ExtractParams(), spec)
    assert artifact_params(ExtractParams(precision="bfloat16"), spec) == {**artifact_params(ExtractParams(), spec), "precision": "bfloat16"}


@pytest.mark.parametrize("flags, native", [("fpu avx512f amx_bf16 amx_tile", True), ("fpu avx512f avx512_bf16", True),
                                           ("fpu sse4_2 avx2 avx512f", False), (None, True)])
def test_native_bfloat16_reads_the_cpu_flags(tmp_path, flags, native):
    from stages.extract import native_bfloat16

    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert native_bfloat16("cpu", cpuinfo) is native


def test_pretrained_spec_offline_without_cache_raises_a_clear_error(offline_hub):
    with pytest.raises(LdsError) as error:
        build_model(get_spec("dino-vits16"))
    message = str(error.value)
    assert "dino-vits16" in message
    assert "--weights" in message and str(offline_hub) in message
    assert "\n" not in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip_gives_identical_qkv(tmp_path, image, suffix):
    spec = get_spec("tiny-vit")
    source = build_model(spec, seed=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_model(spec, weights=path)
    default = build_model(spec)  # seed 0: different weights, so the file must really have been used
    expected = extract_attention(source, image, PATCH)
    got = extract_attention(loaded, image, PATCH)
    other = extract_attention(default, image, PATCH)
    for a, b, c in zip(expected, got, other):
        for name in ("q", "k", "v"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert not np.allclose(a.q, c.q)


def test_random_models_are_reproducible_from_the_seed(image):
    spec = get_spec("tiny-vit")
    a, b = (extract_attention(build_model(spec, seed=5), image, PATCH) for _ in range(2))
    np.testing.assert_array_equal(a[2].k, b[2].k)


def test_missing_unreadable_or_folder_weights_raise(tmp_path):
    spec = get_spec("tiny-vit")
    with pytest.raises(LdsError, match="does not exist"):
        build_model(spec, weights=tmp_path / "missing.pth")
    with pytest.raises(LdsError, match="is a folder; this model takes one state-dict file"):
        build_model(spec, weights=tmp_path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(LdsError, match="unreadable"):
        build_model(spec, weights=bad)


def test_upsample_layer_resizes_maps_bicubically_and_keeps_smooth_maps():
    from pipeline.extract.core import upsample_layer

    y, x = np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 1, 4), indexing="ij")
    ramp = np.stack([y, x], -1)[None].repeat(2, 0)  # (head, y, x, dim): linear in position
    layer = LayerAttention("l", ramp, 2 * ramp, 3 * ramp, 0.5)
    big = upsample_layer(layer, (8, 8))
    assert big.q.shape == (2, 8, 8, 2) and big.scale == 0.5 and big.grid == (8, 8)
    np.testing.assert_allclose(big.k, 2 * big.q, rtol=1e-5, atol=1e-6)
    # a ramp stays monotone and within its range; the centre keeps its value
    assert np.all(np.diff(big.q[0, :, 3, 0]) > 0) and np.all(np.diff(big.q[0, 3, :, 1]) > 0)
    assert big.q[..., 0].mean() == pytest.approx(0.5, abs=1e-5)
    assert upsample_layer(layer, (4, 4)) is layer



def test_to_numpy_gives_host_float32_from_any_dtype():
    """Every extractor converts captured projections through to_numpy, on the CPU as on a GPU."""
    half = torch.linspace(-1, 1, 6, dtype=torch.float16, requires_grad=True).reshape(2, 3)
    out = to_numpy(half)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, half.detach().numpy().astype(np.float32))


def lds(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_device_cpu_gives_the_default_artifact_and_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    """The device is not part of the key; each image records it. A missing GPU stops before any work."""
    runs = {}
    for label, extra in [("default", []), ("cpu", ["--device", "cpu"])]:
        store, pre, manifest = tmp_path / label, tmp_path / f"{label}-pre.json", tmp_path / f"{label}.json"
        assert lds("preprocess", "--dataset", "synthetic-shapes:2", "--size", 64, "--store", store, "--manifest", pre).exit_code == 0
        result = lds("extract", "--input", pre, "--model", "tiny-vit", *extra, "--store", store, "--manifest", manifest)
        assert result.exit_code == 0, result.output + repr(result.exception)
        key = json.loads(manifest.read_text())["key"]
        runs[label] = (key, Store(store).open(ArtifactRef("extract", key)))
    (key, default), (cpu_key, cpu) = runs["default"], runs["cpu"]
    assert cpu_key == key
    for item in ("shapes-0000", "shapes-0001"):
        assert cpu[f"items/{item}"].attrs["device"] == "cpu"
        for part in "qkv":
            name = f"items/{item}/layers/block03/{part}"
            np.testing.assert_array_equal(cpu[name][...], default[name][...])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    for device, message in [("cuda", "--device cuda: no CUDA device is available here"),
                            ("cuda:1", "--device cuda:1: no CUDA device is available here"),
                            ("gpu", "--device gpu: expected auto, cpu, cuda or cuda:N")]:
        refused = lds("extract", "--input", tmp_path / "cpu-pre.json", "--model", "tiny-vit", "--device", device,
                      "--store", tmp_path / "new", "--manifest", tmp_path / "new.json")
        assert refused.exit_code == 1 and message in refused.output and refused.output.count("\n") == 1
        assert not (tmp_path / "new").exists() and not (tmp_path / "new.json").exists()
