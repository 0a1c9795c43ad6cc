"""pipeline.data.preprocess (resizing, METHOD.md section 4) and pipeline.data (dataset specs, records)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data import FileImage, SyntheticImage, list_images, num_shards, safe_id, shard
from pipeline.errors import LdsError
from pipeline.data.preprocess import resize_image

# ------------------------------------------------------------------------------------------ preprocess


def striped(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertical bands of 3 labels (plus an ignore band) and an image whose colour encodes the label."""
    labels = np.zeros((height, width), dtype=np.int32)
    labels[:, width // 4 : width // 2] = 1
    labels[:, width // 2 : 3 * width // 4] = 7
    labels[: height // 3, 3 * width // 4 :] = -1
    colours = {0: (255, 0, 0), 1: (0, 255, 0), 7: (0, 0, 255), -1: (255, 255, 255)}
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    for label, colour in colours.items():
        rgb[labels == label] = colour
    return rgb, labels


@pytest.mark.parametrize(
    "shape, size, multiple",
    [((120, 200), 64, 16), ((200, 120), 64, 16), ((97, 131), 45, 8), ((50, 50), 40, 14), ((300, 90), 32, 16)],
)
def test_short_side_resize_gives_patch_multiples_and_keeps_the_aspect(shape, size, multiple):
    rgb, labels = striped(*shape)
    out, out_labels = resize_image(rgb, labels, size, "short-side", multiple)
    height, width = out.shape[:2]
    assert out.dtype == np.uint8 and out.shape[2] == 3
    assert height % multiple == 0 and width % multiple == 0
    assert size - multiple < min(height, width) <= size
    long_expected = max(shape) * size / min(shape)
    assert long_expected - multiple < max(height, width) <= long_expected + 0.5
    assert (height >= width) == (shape[0] >= shape[1])
    assert out_labels.shape == (height, width) and out_labels.dtype == np.int32
    # nearest neighbour: no new label values are invented (ignore = -1 survives)
    assert set(np.unique(out_labels)) <= set(np.unique(labels))
    assert -1 in out_labels


def test_labels_stay_aligned_with_the_image():
    rgb, labels = striped(90, 170)
    out, out_labels = resize_image(rgb, labels, 48, "short-side", 16)
    colours = {0: (255, 0, 0), 1: (0, 255, 0), 7: (0, 0, 255), -1: (255, 255, 255)}
    agree = np.zeros(out_labels.shape, dtype=bool)
    for label, colour in colours.items():
        close = np.abs(out.astype(int) - colour).max(-1) < 60
        agree |= (out_labels == label) & close
    assert agree.mean() > 0.9  # only pixels at band boundaries may disagree


@pytest.mark.parametrize("shape", [(120, 200), (200, 120), (64, 64)])
def test_center_crop_gives_a_square_of_the_size(shape):
    rgb, labels = striped(*shape)
    out, out_labels = resize_image(rgb, labels, 40, "center-crop", 8)
    assert out.shape == (40, 40, 3) and out_labels.shape == (40, 40)
    out, _ = resize_image(rgb, None, 45, "center-crop", 8)
    assert out.shape == (40, 40, 3)


def test_center_crop_keeps_the_centre():
    rgb, labels = striped(40, 160)  # bands at x in [0, 40), [40, 80), [80, 120), [120, 160)
    _, out_labels = resize_image(rgb, labels, 40, "center-crop", 8)
    # the central square covers x in [60, 100): half label 1, half label 7
    assert set(np.unique(out_labels)) == {1, 7}
    assert np.all(out_labels[:, :18] == 1) and np.all(out_labels[:, 22:] == 7)


def test_resize_without_labels_and_bad_mode():
    rgb, _ = striped(30, 40)
    out, none = resize_image(rgb, None, 32, multiple=16)
    assert none is None and out.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="mode"):
        resize_image(rgb, None, 32, mode="stretch")


# ------------------------------------------------------------------------------------------------ data


def test_synthetic_shapes_are_deterministic_and_labelled():
    records = list_images("synthetic-shapes:3")
    assert [r.id for r in records] == ["shapes-0000", "shapes-0001", "shapes-0002"]
    again = list_images("synthetic-shapes:3")
    for a, b in zip(records, again):
        sample_a, sample_b = a.load(), b.load()
        rgb_a, labels_a = sample_a.rgb, sample_a.labels
        np.testing.assert_array_equal(rgb_a, sample_b.rgb)
        np.testing.assert_array_equal(labels_a, sample_b.labels)
        assert a.content_hash() == b.content_hash()
        assert rgb_a.shape == (96, 96, 3) and rgb_a.dtype == np.uint8
        assert labels_a.shape == (96, 96) and labels_a.dtype == np.int32
        assert set(np.unique(labels_a)) <= {0, 1, 2, 3} and len(np.unique(labels_a)) >= 2
        # one object per visible shape, exactly where its label is
        present = [c for c in (1, 2, 3) if np.any(labels_a == c)]
        np.testing.assert_array_equal(sample_a.instances, np.stack([labels_a == c for c in present]))
        assert sample_a.crowd.shape == (len(present),) and not sample_a.crowd.any()
    assert len({r.content_hash() for r in records}) == 3
    assert len(list_images("synthetic-shapes")) == 8


def test_synthetic_shape_colours_follow_their_labels():
    sample = SyntheticImage("x", 0).load()
    rgb, labels = sample.rgb, sample.labels
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)
    assert np.mean(red[labels == 1]) > 0.95
    assert np.mean(red[labels != 1]) < 0.01


def write_png(path, rgb):
    Image.fromarray(rgb).save(path)


def test_folder_lists_images_sorted_and_loads_them(tmp_path):
    b = np.full((5, 7, 3), 200, dtype=np.uint8)
    a = np.zeros((4, 6, 3), dtype=np.uint8)
    a[0, 0] = (1, 2, 3)
    write_png(tmp_path / "b.png", b)
    write_png(tmp_path / "a.PNG", a)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "c.png").mkdir()  # a folder with an image suffix is not an image
    records = list_images(f"folder:{tmp_path}")
    assert [r.id for r in records] == ["a", "b"]
    assert all(isinstance(r, FileImage) for r in records)
    sample = records[0].load()
    assert sample.labels is None and sample.instances is None
    np.testing.assert_array_equal(sample.rgb, a)
    np.testing.assert_array_equal(records[1].load().rgb, b)
    assert records[0].content_hash() != records[1].content_hash()


def test_grayscale_files_load_as_rgb_with_labels(tmp_path):
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), mode="L").save(tmp_path / "g.png")
    Image.fromarray(np.array([[0, 1, 2, 3]] * 3, dtype=np.uint8), mode="L").save(tmp_path / "g_labels.png")
    record = FileImage("g", tmp_path / "g.png", tmp_path / "g_labels.png")
    sample = record.load()
    rgb, labels = sample.rgb, sample.labels
    assert rgb.shape == (3, 4, 3)
    np.testing.assert_array_equal(rgb[..., 1], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(labels, [[0, 1, 2, 3]] * 3)
    assert labels.dtype == np.int32
    # the label file is part of the content hash: changing it changes the preprocess key
    before = record.content_hash()
    Image.fromarray(np.array([[0, 1, 2, 4]] * 3, dtype=np.uint8), mode="L").save(tmp_path / "g_labels.png")
    assert record.content_hash() != before


def test_glob_recurses_and_names_items_by_their_path_below_the_pattern(tmp_path):
    for name in ("a/x.png", "a/b/y.JPG", "c/x.png", "c/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            (tmp_path / name).write_text("not an image")
        else:
            Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / name, format="PNG")
    records = list_images(f"glob:{tmp_path}/**/*")
    assert [r.id for r in records] == ["a_b_y", "a_x", "c_x"]
    assert [r.path for r in records] == [tmp_path / "a/b/y.JPG", tmp_path / "a/x.png", tmp_path / "c/x.png"]
    assert [r.id for r in list_images(f"glob:{tmp_path}/a/*.png")] == ["x"]
    with pytest.raises(LdsError, match="matches no image files"):
        list_images(f"glob:{tmp_path}/*.gif")


def test_folder_errors(tmp_path):
    with pytest.raises(LdsError, match="holds no images"):
        list_images(f"folder:{tmp_path}")
    with pytest.raises(LdsError, match="does not exist"):
        list_images(f"folder:{tmp_path / 'missing'}")
    write_png(tmp_path / "x y.png", np.zeros((2, 2, 3), np.uint8))
    write_png(tmp_path / "x_y.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(LdsError, match="same name 'x_y'"):
        list_images(f"folder:{tmp_path}")


@pytest.mark.parametrize(
    "spec", ["imagenet", "folder:", "folder", "skimage-samples:extra", "synthetic-shapes:abc", "synthetic-shapes:0", ""]
)
def test_unknown_specs_raise(spec):
    with pytest.raises(LdsError, match="unknown dataset"):
        list_images(spec)


def test_corrupt_or_truncated_image_raises_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(LdsError, match="corrupt.png"):
        list_images(f"folder:{tmp_path}")[0].load()
    good = tmp_path / "whole.png"
    write_png(good, np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(LdsError, match="truncated.png"):
        FileImage("truncated", truncated).load()
    with pytest.raises(LdsError, match="gone.png"):
        FileImage("gone", tmp_path / "gone.png").load()
    with pytest.raises(LdsError, match="gone.png"):
        FileImage("gone", tmp_path / "gone.png").content_hash()


def test_skimage_samples_are_listed_and_load_as_rgb():
    records = list_images("skimage-samples")
    assert [r.id for r in records] == ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera"]
    camera = records[-1]
    if not camera.path.is_file():
        pytest.skip("scikit-image sample files not installed")
    sample = camera.load()  # a grayscale file
    assert sample.rgb.ndim == 3 and sample.rgb.shape[2] == 3 and sample.labels is None


def test_safe_id():
    assert safe_id("my photo (1)") == "my_photo__1_"
    assert safe_id("._hidden") == "hidden"
    assert safe_id("...") == "image"


def test_shards_partition_the_listing_in_order():
    records = list_images("synthetic-shapes:5")
    assert num_shards(5, 2) == 3 and num_shards(4, 2) == 2 and num_shards(1, 10) == 1 and num_shards(0, 3) == 1
    shards = [shard(records, i, 2) for i in range(num_shards(len(records), 2))]
    assert [[r.id for r in s] for s in shards] == [
        ["shapes-0000", "shapes-0001"],
        ["shapes-0002", "shapes-0003"],
        ["shapes-0004"],
    ]
    assert [r for s in shards for r in s] == records
    with pytest.raises(LdsError, match="shard 3 is empty"):
        shard(records, 3, 2)
    with pytest.raises(LdsError, match="bad shard"):
        shard(records, 0, 0)
    with pytest.raises(LdsError, match="bad shard"):
        shard(records, -1, 2)
