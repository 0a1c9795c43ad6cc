"""Dataset readers on small fake datasets built in each standard layout, read back through
`lds preprocess` into the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.data import IGNORE, open_dataset
from pipeline.data.cityscapes import CITYSCAPES_27
from pipeline.data.coco import COCO_STUFF_27, FINE_TO_COARSE_27
from pipeline.data.voc import VOC_CLASSES
from pipeline.errors import LdsError
from pipeline.data.preprocess import Geometry, plan, resize_nearest, to_original
from pipeline.store import ArtifactRef, Store
from pipeline.store.maintenance import verify
from stages.cli import cli


def save(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:  # VOC's label files are palette PNGs: the stored indices are the labels
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        image.putdata(array.ravel().tolist())
    image.save(path)


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def lds(*args) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)


# ----------------------------------------------------------------------------------------------- COCO


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def make_coco(root: Path) -> dict[str, list[np.ndarray]]:
    """Two images; objects as compressed RLE, uncompressed RLE (a crowd) and a polygon."""
    from pycocotools import mask as mask_utils

    def rle(mask: np.ndarray) -> dict:
        encoded = mask_utils.encode(np.asfortranarray(mask))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}

    def uncompressed(mask: np.ndarray) -> dict:
        flat = mask.ravel(order="F")
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}

    a = [box_mask(40, 60, 5, 10, 20, 30), box_mask(40, 60, 25, 0, 40, 60)]
    b = [box_mask(30, 20, 10, 4, 20, 16)]
    save(root / "val2017" / "000000000009.jpg", rgb(40, 60))
    save(root / "val2017" / "000000000003.jpg", rgb(30, 20, 1))
    dataset = {
        "images": [
            {"id": 9, "file_name": "000000000009.jpg", "height": 40, "width": 60},
            {"id": 3, "file_name": "000000000003.jpg", "height": 30, "width": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 18, "segmentation": rle(a[0]), "area": 300.0, "bbox": [10, 5, 20, 15], "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 1, "segmentation": uncompressed(a[1]), "area": 900.0, "bbox": [0, 25, 60, 15], "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 1, "segmentation": [[4, 10, 16, 10, 16, 20, 4, 20]], "area": 120.0, "bbox": [4, 10, 12, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(dataset))
    return {"000000000009": a, "000000000003": b}


def test_coco_instances_are_read_as_class_agnostic_masks_with_crowd_flags(tmp_path):
    expected = make_coco(tmp_path)
    data = open_dataset(f"coco:{tmp_path}")
    assert data.instances and data.classes is None
    assert [(r.id, r.image_id) for r in data.records] == [("000000000003", 3), ("000000000009", 9)]
    first, second = (r.load() for r in data.records)
    assert first.labels is None and first.rgb.shape == (30, 20, 3)
    # a polygon is rasterised by pycocotools: the box's inside, give or take its border
    polygon = first.instances[0]
    assert first.instances.shape == (1, 30, 20) and polygon[11:19, 5:15].all() and polygon.sum() <= 13 * 11
    np.testing.assert_array_equal(second.instances, np.stack(expected["000000000009"]).astype(bool))
    np.testing.assert_array_equal(second.crowd, [False, True])
    assert data.records[0].content_hash() != data.records[1].content_hash()


def test_coco_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(LdsError, match=f"COCO root folder not found: {tmp_path / 'nowhere'} is missing"):
        open_dataset(f"coco:{tmp_path / 'nowhere'}")
    make_coco(tmp_path)
    with pytest.raises(LdsError, match=r"annotations/instances_train2017.json is missing"):
        open_dataset(f"coco:{tmp_path}:train2017")
    (tmp_path / "val2017" / "000000000003.jpg").unlink()
    with pytest.raises(LdsError, match=r"COCO image not found: .*000000000003.jpg is missing"):
        open_dataset(f"coco:{tmp_path}")
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": 3}')
    with pytest.raises(LdsError, match="not a COCO instances json"):
        open_dataset(f"coco:{tmp_path}")


def test_coco_through_preprocess_keeps_objects_aligned_and_maps_back(tmp_path):
    expected = make_coco(tmp_path / "coco")
    store = tmp_path / "store"
    lds("preprocess", "--dataset", f"coco:{tmp_path / 'coco'}", "--size", 32, "--multiple", 8, "--store", store, "--manifest", tmp_path / "p.json")
    ref = ArtifactRef("preprocess", json.loads((tmp_path / "p.json").read_text())["key"])
    group = Store(store).open(ref)
    assert group.attrs["classes"] is None and group.attrs["ignore_index"] == IGNORE
    item = group["items/000000000009"]
    geometry = Geometry.from_dict(item.attrs)
    assert geometry == plan(40, 60, 32, "short-side", 8) and item.attrs["image_id"] == 9
    instances = item["instances"][...]
    assert instances.shape == (2, *item["rgb"].shape[:2]) and instances.dtype == bool
    for stored, original in zip(instances, expected["000000000009"]):
        np.testing.assert_array_equal(stored, resize_nearest(original.astype(bool), geometry))
        # back on the original image: the object again, up to a pixel at its edges
        back = to_original(stored, geometry)
        assert (back != original.astype(bool)).mean() < 0.06
    np.testing.assert_array_equal(item["instance_crowd"][...], [False, True])
    assert "labels" not in item


# ---------------------------------------------------------------------------------------- COCO-Stuff


def make_coco_stuff(root: Path, curated: list[str] | None = None) -> np.ndarray:
    fine = np.array([[0, 0, 156, 156], [181, 255, 93, 8]], dtype=np.uint8)
    for i, stem in enumerate(["000000000005", "000000000001", "000000000002"]):
        save(root / "images" / "val2017" / f"{stem}.jpg", rgb(2, 4, i))
        save(root / "annotations" / "val2017" / f"{stem}.png", fine)
    if curated is not None:
        (root / "curated" / "val2017").mkdir(parents=True)
        (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(curated) + "\n")
    return fine


def test_coco_stuff_maps_182_fine_classes_to_27(tmp_path):
    make_coco_stuff(tmp_path)
    data = open_dataset(f"coco-stuff27:{tmp_path}")
    assert data.classes == COCO_STUFF_27 and len(data.classes) == 27 and not data.instances
    assert [(r.id, r.image_id) for r in data.records] == [("000000000001", 1), ("000000000002", 2), ("000000000005", 5)]
    labels = data.records[0].load().labels
    # person -> person (9), sky-other -> sky (23), wood -> solid (24), unlabelled stays ignored,
    # branch -> plant (22), boat -> vehicle (11)
    np.testing.assert_array_equal(labels, [[9, 9, 23, 23], [24, IGNORE, 22, 11]])
    assert [COCO_STUFF_27[c] for c in (9, 23, 24, 22, 11)] == ["person", "sky", "solid", "plant", "vehicle"]
    assert len(FINE_TO_COARSE_27) == 182 and set(FINE_TO_COARSE_27) == set(range(27))


def test_coco_stuff_uses_the_curated_list_when_present(tmp_path):
    make_coco_stuff(tmp_path, curated=["000000000005", "000000000002"])
    assert [r.id for r in open_dataset(f"coco-stuff27:{tmp_path}").records] == ["000000000005", "000000000002"]
    (tmp_path / "annotations" / "val2017" / "000000000002.png").unlink()
    with pytest.raises(LdsError, match=r"COCO-Stuff label map not found: .*annotations/val2017/000000000002.png is missing"):
        open_dataset(f"coco-stuff27:{tmp_path}")
    with pytest.raises(LdsError, match=r"COCO-Stuff image folder not found: .*images/train2017 is missing"):
        open_dataset(f"coco-stuff27:{tmp_path}:train2017")


# ---------------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_map_to_27_classes(tmp_path):
    ids = np.array([[7, 8, 26, 33], [0, 6, 34, 23]], dtype=np.uint8)
    for city, name in (("lindau", "lindau_000001_000019"), ("frankfurt", "frankfurt_000000_000294")):
        save(tmp_path / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png", rgb(2, 4))
        save(tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", ids)
    data = open_dataset(f"cityscapes27:{tmp_path}")
    assert data.classes == CITYSCAPES_27 and len(data.classes) == 27
    assert [r.id for r in data.records] == ["frankfurt_000000_000294", "lindau_000001_000019"]
    labels = data.records[0].load().labels
    np.testing.assert_array_equal(labels, [[0, 1, 19, 26], [IGNORE, IGNORE, IGNORE, 16]])
    assert [CITYSCAPES_27[c] for c in (0, 1, 19, 26, 16)] == ["road", "sidewalk", "car", "bicycle", "sky"]
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(LdsError, match=r"Cityscapes label map not found: .*lindau_000001_000019_gtFine_labelIds.png is missing"):
        open_dataset(f"cityscapes27:{tmp_path}")
    with pytest.raises(LdsError, match=r"Cityscapes gtFine folder not found: .*gtFine/train is missing"):
        save(tmp_path / "leftImg8bit" / "train" / "x" / f"x_1_1{'_leftImg8bit.png'}", rgb(2, 2))
        open_dataset(f"cityscapes27:{tmp_path}:train")


# --------------------------------------------------------------------------------------- PASCAL VOC


def make_voc(root: Path) -> tuple[np.ndarray, np.ndarray]:
    voc = root / "VOCdevkit" / "VOC2012"
    classes = np.zeros((24, 40), dtype=np.uint8)
    objects = np.zeros((24, 40), dtype=np.uint8)
    classes[4:12, 4:14], objects[4:12, 4:14] = 15, 1  # a person
    classes[14:22, 20:36], objects[14:22, 20:36] = 12, 2  # a dog
    classes[3, 3:15] = objects[3, 3:15] = IGNORE  # a boundary
    for name in ("2007_000033", "2007_000042"):
        save(voc / "JPEGImages" / f"{name}.jpg", rgb(24, 40))
        save(voc / "SegmentationClass" / f"{name}.png", classes, palette=True)
        save(voc / "SegmentationObject" / f"{name}.png", objects, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000042\n2007_000033\n")
    return classes, objects


def test_voc_reads_class_and_object_maps(tmp_path):
    classes, objects = make_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        data = open_dataset(f"voc2012:{root}")
        assert [r.id for r in data.records] == ["2007_000042", "2007_000033"]
    assert data.classes == VOC_CLASSES and data.instances
    sample = data.records[0].load()
    np.testing.assert_array_equal(sample.labels, classes)
    np.testing.assert_array_equal(sample.instances, np.stack([objects == 1, objects == 2]))
    assert not sample.crowd.any() and VOC_CLASSES[15] == "person" and VOC_CLASSES[12] == "dog"


def test_voc_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(LdsError, match=f"no JPEGImages folder in {tmp_path}"):
        (tmp_path / "empty").mkdir()
        open_dataset(f"voc2012:{tmp_path / 'empty'}")
    make_voc(tmp_path)
    with pytest.raises(LdsError, match=r"PASCAL VOC split list not found: .*ImageSets/Segmentation/train.txt is missing"):
        open_dataset(f"voc2012:{tmp_path}:train")
    (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationObject" / "2007_000033.png").unlink()
    with pytest.raises(LdsError, match=r"PASCAL VOC object map not found: .*SegmentationObject/2007_000033.png is missing"):
        open_dataset(f"voc2012:{tmp_path}")


def test_voc_through_preprocess_stores_labels_and_objects_with_the_image_crop(tmp_path):
    classes, objects = make_voc(tmp_path / "voc")
    store = tmp_path / "store"
    lds("preprocess", "--dataset", f"voc2012:{tmp_path / 'voc'}", "--size", 16, "--multiple", 8, "--store", store, "--manifest", tmp_path / "p.json")
    ref = ArtifactRef("preprocess", json.loads((tmp_path / "p.json").read_text())["key"])
    group = Store(store).open(ref)
    assert group.attrs["classes"] == list(VOC_CLASSES)
    item = group["items/2007_000033"]
    geometry = plan(24, 40, 16, "short-side", 8)
    assert Geometry.from_dict(item.attrs) == geometry and geometry.size == (16, 24) and geometry.left == 1
    labels = item["labels"][...]
    assert labels.shape == item["rgb"].shape[:2] == (16, 24)
    np.testing.assert_array_equal(labels, resize_nearest(classes.astype(np.int32), geometry))
    assert set(np.unique(labels)) == {0, 12, 15, IGNORE}
    instances = item["instances"][...]
    np.testing.assert_array_equal(instances, np.stack([resize_nearest(objects == v, geometry) for v in (1, 2)]))
    # objects lie on their class: the person's pixels are labelled person
    assert np.all(labels[instances[0]] == 15) and np.all(labels[instances[1]] == 12)
    assert verify(Store(store), ref) == []


def test_unknown_dataset_lists_every_reader():
    with pytest.raises(LdsError, match="coco:ROOT.*coco-stuff27:ROOT.*cityscapes27:ROOT.*voc2012:ROOT"):
        open_dataset("imagenet:/data")
