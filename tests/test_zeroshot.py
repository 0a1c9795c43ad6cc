"""CLIP zero-shot labels: planted text embeddings with known answers, and `lds zeroshot` on a tiny random
CLIP (NOT pretrained) built from a config, with a small tokenizer written here, scored by `lds evaluate`."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.errors import LdsError
from pipeline.decode.zeroshot import (
    ClassLabels, ZeroshotParams, class_embeddings, class_names, clip_repo, label_set, region_scores, to_dataset_labels, unit,
    zero_shot_labels, zeroshot_image, zeroshot_settings,
)
from stages.cli import cli


def planted_regions(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regions 0..3 on an 8 x 10 grid and token features (tokens, 6): each region's own direction plus noise."""
    rng = np.random.default_rng(seed)
    regions = np.zeros((8, 10), dtype=np.int64)
    regions[:4, :5], regions[4:, :5], regions[:, 5:8] = 1, 2, 3
    directions = unit(rng.normal(size=(4, 6)))
    features = directions[regions.ravel()] * 2 + rng.normal(size=(80, 6)) * 0.3
    return regions, features, directions


def test_regions_take_the_class_whose_text_is_their_mean_and_dissimilar_regions_are_background():
    regions, features, _ = planted_regions()
    means = np.stack([features[regions.ravel() == r].mean(0) for r in range(4)])
    # classes 1, 2, 3 of a 5-name label set have the text of regions 2, 0, 3; region 1 has no class
    labels, per_region, best = zero_shot_labels(features, regions, means[[2, 0, 3]], [1, 2, 3], background=0)
    np.testing.assert_allclose(best[[0, 2, 3]], 1)
    assert best[1] < 0.7
    np.testing.assert_array_equal(per_region, [2, 0, 1, 3])
    np.testing.assert_array_equal(labels, np.array([2, 0, 1, 3])[regions])
    # the threshold decides: below every similarity, region 1 takes its most similar class instead
    _, lowered, _ = zero_shot_labels(features, regions, means[[2, 0, 3]], [1, 2, 3], background=0, threshold=-1)
    assert lowered[1] == [1, 2, 3][int(np.argmax(unit(means[[2, 0, 3]]) @ unit(means[1])))]


def test_probability_scores_are_clips_softmax():
    means, text = np.array([[1.2, 1.6, 0]]), np.eye(3) * 5  # cosine similarities 0.6, 0.8, 0
    np.testing.assert_allclose(region_scores(means, text, "cosine", 10.0), [[0.6, 0.8, 0]])
    logits = np.array([6.0, 8.0, 0.0])
    np.testing.assert_allclose(region_scores(means, text, "probability", 10.0), [np.exp(logits) / np.exp(logits).sum()])


def test_class_embeddings_average_the_unit_prompt_embeddings():
    table = {"a {}": np.array([3.0, 0]), "b {}": np.array([0, 0.5])}

    def encode(prompts: list[str]) -> np.ndarray:
        return np.stack([table[p.replace("cat", "{}")] for p in prompts])

    np.testing.assert_allclose(class_embeddings(encode, ["cat"], ("a {}", "b {}")), [[2 ** -0.5, 2 ** -0.5]])


def test_background_is_a_label_but_never_a_prompt_and_names_map_to_the_dataset():
    assert label_set(["background", "cat", "dog"]) == (["background", "cat", "dog"], ["cat", "dog"], 0)
    assert label_set(["cat", "dog"]) == (["cat", "dog", "background"], ["cat", "dog"], 2)
    np.testing.assert_array_equal(to_dataset_labels(np.array([0, 1, 2]), ["dog", "cow", "background"], ["background", "cat", "dog"]), [2, 3, 0])


def test_zeroshot_image_labels_each_region_and_its_pixels():
    from types import SimpleNamespace

    regions, features, _ = planted_regions()
    means = np.stack([features[regions.ravel() == r].mean(0) for r in range(4)])
    identity = SimpleNamespace(project_values=lambda values: values, logit_scale=100.0)  # a CLIP whose joint space is the values'
    labels = ClassLabels.of(["background", "sky", "cow", "tree"])
    assert labels.ids == [1, 2, 3] and labels.background == 0
    arrays = zeroshot_image(features.reshape(8, 10, 6), regions, (16, 20), identity, means[[2, 0, 3]], labels, ZeroshotParams())
    expected = np.array([2, 0, 1, 3])  # regions 0, 2, 3 are the texts of classes 2, 1, 3; region 1 is unlike any
    np.testing.assert_array_equal(arrays["region_labels"].data, expected)
    np.testing.assert_array_equal(arrays["labels_tokens"].data, expected[regions])
    np.testing.assert_array_equal(arrays["labels"].data, np.kron(expected[regions], np.ones((2, 2), np.int32)))
    np.testing.assert_allclose(arrays["region_scores"].data[[0, 2, 3]], 1)
    assert arrays["region_scores"].attrs["description"] == "best cosine score of each region"
    # regions decoded on a coarser grid are resized to the values' grid (nearest)
    coarse = zeroshot_image(features.reshape(8, 10, 6), regions[::2, ::2], (8, 10), identity, means[[2, 0, 3]], labels, ZeroshotParams(threshold=-1))
    assert coarse["labels_tokens"].data.shape == (8, 10) and coarse["region_labels"].data[1] != 0  # threshold -1: no background


def test_zeroshot_class_names_clip_and_params_of_an_artifact():
    assert class_names(ZeroshotParams(classes=("cat",)), {"classes": ["dog"]}) == ["cat"]
    assert class_names(ZeroshotParams(), {"classes": ["dog"]}) == ["dog"]
    with pytest.raises(LdsError, match="dataset shapes names no classes"):
        class_names(ZeroshotParams(), {"dataset": "shapes", "classes": None})
    with pytest.raises(LdsError, match="no class to label regions with among background"):
        ClassLabels.of(["background"])
    assert clip_repo("my/clip", None, {"model": "tiny-vit"}) == "my/clip"
    assert clip_repo(None, None, {"model": "clip-vitb16"}) == "openai/clip-vit-base-patch16"
    assert clip_repo(None, "folder", {"model": "tiny-vit"}) is None
    with pytest.raises(LdsError, match="model tiny-vit is not a known CLIP model"):
        clip_repo(None, None, {"model": "tiny-vit"})
    labels = ClassLabels.of(["cat", "dog"])
    settings = zeroshot_settings(ZeroshotParams(), labels, "my/clip", None)
    assert {key: settings[key] for key in ("clip", "weights_sha256", "classes", "threshold", "score")} == {
        "clip": "my/clip", "weights_sha256": None, "classes": ["cat", "dog", "background"], "threshold": 0.7, "score": "cosine"}
    assert zeroshot_settings(ZeroshotParams(), labels, None, "abc")["clip"] is None


# ------------------------------------------------------------------------------------ tiny random CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel (vision tower as tiny-hf-clip's) and a character-level CLIP tokenizer, saved."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from pipeline.models.configs import tiny_hf

    symbols = list(string.ascii_lowercase + ".-")
    vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    vision = {k: v for k, v in tiny_hf("clip_vision_model", 16).items() if k != "model_type"}
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lds(*args, expect_ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def reference_region_scores(folder, rgb: np.ndarray, regions: np.ndarray, classes: list[str]) -> np.ndarray:
    """Cosine similarity (regions, classes) computed apart from lds: the model's own forward pass up to the
    last layer, then its layer norm, value and output projections, post-layernorm, visual projection."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    from pipeline.extract.core import image_tensor
    from pipeline.models import CLIP_MEAN, CLIP_STD
    from pipeline.decode.zeroshot import PROMPT_TEMPLATES

    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    vision = model.vision_model
    with torch.no_grad():
        hidden = vision(image_tensor(rgb, CLIP_MEAN, CLIP_STD), output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][0, 1:]
        last = vision.encoder.layers[-1]
        features = model.visual_projection(vision.post_layernorm(last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hidden))))).double().numpy()
        texts = []
        for name in classes:
            tokens = tokenizer([t.format(name) for t in PROMPT_TEMPLATES], padding=True, return_tensors="pt")
            embedded = model.text_projection(model.text_model(**tokens).pooler_output).double().numpy()
            texts.append(unit(unit(embedded).mean(0)))
    means = np.stack([features[regions.ravel() == r].mean(0) for r in np.unique(regions)])
    return unit(means) @ unit(np.stack(texts)).T


def test_zeroshot_round_trip_on_a_tiny_random_clip(tiny_clip, tmp_path):
    store = ["--store", tmp_path / "store"]
    m = {name: tmp_path / f"{name}.json" for name in ("preprocess", "extract", "solve", "decode", "zeroshot", "evaluate")}
    lds("preprocess", "--dataset", "synthetic-shapes:2", "--size", 64, "--shard-size", 2, *store, "--manifest", m["preprocess"])
    lds("extract", "--input", m["preprocess"], "--model", "tiny-hf-clip", "--weights", tiny_clip, "--dtype", "float32", *store, "--manifest", m["extract"])
    lds("solve", "--input", m["extract"], "--solver", "exact", "--channels", 4, *store, "--manifest", m["solve"])
    lds("decode", "--input", m["solve"], "--clusters", 3, *store, "--manifest", m["decode"])
    lds("zeroshot", "--input", m["decode"], "--weights", tiny_clip, "--threshold", -1, *store, "--manifest", m["zeroshot"])
    lds("evaluate", "--input", m["decode"], "--zeroshot", m["zeroshot"], "--metrics", tmp_path / "metrics.json", *store, "--manifest", m["evaluate"])
    import zarr

    labelled = zarr.open_group(json.loads(m["zeroshot"].read_text())["path"], mode="r")
    decoded = zarr.open_group(json.loads(m["decode"].read_text())["path"], mode="r")
    images = zarr.open_group(json.loads(m["preprocess"].read_text())["path"], mode="r")
    assert labelled.attrs["classes"] == ["background", "red", "blue", "yellow"] and labelled.attrs["background"] == 0
    assert labelled.attrs["pretrained"] is False and labelled.attrs["clip"] == f"local folder {tiny_clip}"
    item = "shapes-0000"
    regions = decoded[f"items/{item}/labels_tokens"][...]
    expected = reference_region_scores(tiny_clip, images[f"items/{item}/rgb"][...], regions, ["red", "blue", "yellow"])
    np.testing.assert_allclose(labelled[f"items/{item}/region_scores"][...], expected.max(1), atol=1e-4)
    np.testing.assert_array_equal(labelled[f"items/{item}/region_labels"][...], expected.argmax(1) + 1)
    assert labelled[f"items/{item}/labels"].shape == (64, 64)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["zeroshot_miou"] <= 1 and set(metrics["zeroshot_iou_per_class"]) == {"background", "red", "blue", "yellow"}
    assert metrics["zeroshot_iou_per_class"]["background"] == 0  # threshold -1: no region is background
    # at the default threshold 0.7 a random CLIP's similarities send every region to background
    lds("zeroshot", "--input", m["decode"], "--weights", tiny_clip, "--classes", "red,cat", *store, "--manifest", tmp_path / "z.json")
    strict = zarr.open_group(json.loads((tmp_path / "z.json").read_text())["path"], mode="r")
    assert strict.attrs["classes"] == ["red", "cat", "background"] and (strict[f"items/{item}/labels"][...] == 2).all()
    # the model is not a CLIP lds knows, and no weights are given
    refused = lds("zeroshot", "--input", m["decode"], *store, expect_ok=False)
    assert refused.exit_code != 0 and "not a known CLIP model" in refused.output


def test_hub_clip_offline_without_cache_raises_one_clear_line(offline_hub):
    from pipeline.models.clip import load_clip

    with pytest.raises(LdsError) as error:
        load_clip("openai/clip-vit-base-patch16", None)
    message = str(error.value)
    assert "openai/clip-vit-base-patch16" in message and "HF_HUB_OFFLINE=1" in message and "--weights FOLDER" in message
    assert "\n" not in message
