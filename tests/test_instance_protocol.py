"""Instance metrics at the original resolution against the dataset's own annotations (METHOD.md section 6):
known answers on a hand-made COCO dataset, and `lds evaluate` against pycocotools on decode's results json."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.data import open_dataset
from pipeline.errors import LdsError
from pipeline.evaluate.scoring import original_detections, original_truth, preprocessed_detections
from pipeline.evaluate.metrics import coco_evaluate, instance_ground_truth
from pipeline.data.preprocess import Geometry, plan, resize_nearest
from pipeline.store import Store
from stages.cli import cli
from stages.common import read_manifest

SIZE, MULTIPLE = 16, 8  # preprocess: 32 x 68 -> resized 16 x 34 -> cropped 16 x 32 (a column off each side)
GEOMETRY = plan(32, 68, SIZE, "short-side", MULTIPLE)


def lds(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def mask(top: int, left: int, bottom: int, right: int, shape: tuple[int, int] = (32, 68)) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[top:bottom, left:right] = True
    return out


def rle(values: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(values.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}


def uncompressed(values: np.ndarray) -> dict:
    flat = values.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(values.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


# COCO's json lists category 1, the category of the class-agnostic results (with useCats = 0 COCOeval still
# keeps only the results of listed categories); the objects here are all of another
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]


def write_coco(root: Path, images: dict[int, tuple[np.ndarray, list[tuple[dict | list, int]]]]) -> Path:
    """A COCO val2017 layout: per image id, its RGB and its (segmentation, iscrowd) annotations, each
    segmentation an RLE or a polygon list; areas and boxes by pycocotools, as in COCO's own json."""
    from pycocotools import mask as mask_utils

    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    records, annotations = [], []
    for image_id, (rgb, objects) in images.items():
        name = f"{image_id:012d}.jpg"
        Image.fromarray(rgb).save(root / "val2017" / name, quality=95)
        height, width = rgb.shape[:2]
        records.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for segmentation, crowd in objects:
            if isinstance(segmentation, list):  # polygons
                encoded = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation["counts"], list):  # uncompressed RLE
                encoded = mask_utils.frPyObjects(segmentation, height, width)
            else:
                encoded = segmentation
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 18, "segmentation": segmentation,
                "area": float(mask_utils.area(encoded)), "bbox": mask_utils.toBbox(encoded).tolist(), "iscrowd": crowd,
            })
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": CATEGORIES}))
    return path


# Image 42: a block, and a line one pixel wide on a column the resize never samples (the preprocessed
# masks lose it). Image 7: a block reaching into the cropped-away left margin, and a crowd region.
BLOCK, LINE = mask(8, 10, 24, 30), mask(4, 40, 28, 41)
BORDER, CROWD = mask(8, 0, 24, 12), mask(0, 50, 32, 64)


def thin_and_cropped_coco(root: Path) -> Path:
    rgb = np.random.default_rng(0).integers(0, 255, (32, 68, 3), dtype=np.uint8)
    return write_coco(root, {
        42: (rgb, [(rle(BLOCK), 0), (rle(LINE), 0)]),
        7: (rgb, [(rle(BORDER), 0), (uncompressed(CROWD), 1)]),
    })


def add(into: tuple[list, list, list], truth: tuple[dict, list[dict]], results: list[dict]) -> None:
    """One image's COCO record, annotations and results appended to the lists of ``into``."""
    into[0].append(truth[0])
    into[1].extend(truth[1])
    into[2].extend(results)


def test_thin_and_cropped_objects_count_at_original_size_but_not_in_the_resized_masks(tmp_path):
    thin_and_cropped_coco(tmp_path / "coco")
    store = Store(tmp_path / "store")
    lds("preprocess", "--dataset", f"coco:{tmp_path / 'coco'}", "--size", SIZE, "--multiple", MULTIPLE, "--store", store.root, "--manifest", tmp_path / "p.json")
    images = store.open(read_manifest(tmp_path / "p.json"))["items"]
    records = {r.image_id: r for r in open_dataset(f"coco:{tmp_path / 'coco'}").records}
    # proposals: each object as the model saw it (its resized, cropped mask; one "token" per pixel), the block first
    proposals = {42: (BLOCK, 0.9), 7: (BORDER, 0.8)}
    new: tuple[list, list, list] = ([], [], [])  # COCO images, annotations, results
    old: tuple[list, list, list] = ([], [], [])
    for image_id, (obj, score) in proposals.items():
        group = images[f"{image_id:012d}"]
        geometry = Geometry.from_dict(group.attrs)
        assert geometry == GEOMETRY and group.attrs["image_id"] == image_id
        seen, scores = resize_nearest(obj, geometry)[None], np.array([score])
        add(new, original_truth(records[image_id], geometry), original_detections(seen, scores, geometry, image_id))
        add(old, instance_ground_truth(image_id, group["instances"][...], group["instance_crowd"][...]),
            preprocessed_detections(seen, scores, geometry.size, image_id))
    # the resized masks lost the line: 3 objects there (one a crowd), 4 in the json
    assert len(old[1]) == 3 and len(new[1]) == 4 and sum(a["iscrowd"] for a in new[1]) == 1
    assert new[0] == [{"id": 42, "height": 32, "width": 68}, {"id": 7, "height": 32, "width": 68}]
    # the old protocol: both objects found exactly
    assert coco_evaluate(*old) == {kind: {"ap": 1.0, "ap50": 1.0, "ar100": 1.0} for kind in ("bbox", "segm")}
    # at original size the line is missed and the border block, mapped back, covers 10 of its 12 columns
    # (IoU 0.83: a hit at IoU 0.50-0.80, 7 of 10 thresholds). COCO's 101 recall points: 2 of 3 objects
    # found at precision 1 -> 67/101; 1 of 3 -> 34/101.
    expected = {"ap": (7 * 67 + 3 * 34) / 1010, "ap50": 67 / 101, "ar100": (7 * 2 / 3 + 3 * 1 / 3) / 10}
    for kind, scores in coco_evaluate(*new).items():
        assert scores == pytest.approx(expected), kind


def test_original_truth_keeps_the_json_annotations_and_checks_the_size(tmp_path):
    path = thin_and_cropped_coco(tmp_path)
    records = {r.image_id: r for r in open_dataset(f"coco:{tmp_path}").records}
    image, annotations = original_truth(records[7], GEOMETRY)
    in_json = [a for a in json.loads(path.read_text())["annotations"] if a["image_id"] == 7]
    assert annotations == [{**a, "category_id": 1} for a in in_json]  # uncompressed RLE, area, iscrowd as written
    with pytest.raises(LdsError, match=r"image 000000000007 is 68x32 in .*instances_val2017.json but was preprocessed from 60x30"):
        original_truth(records[7], plan(30, 60, SIZE, "short-side", MULTIPLE))


def test_original_truth_of_other_readers_is_their_object_masks_at_original_size():
    from pycocotools import mask as mask_utils

    record = open_dataset("synthetic-shapes:1").records[0]
    sample = record.load()
    image, annotations = original_truth(record, plan(96, 96, 40, "short-side", 16))
    assert image == {"id": 0, "height": 96, "width": 96} and len(annotations) == len(sample.instances) > 0
    decoded = mask_utils.decode([a["segmentation"] for a in annotations])
    np.testing.assert_array_equal(np.moveaxis(decoded, -1, 0), sample.instances)


# ------------------------------------------------------------------------------------ end to end


def shapes_coco(root: Path) -> Path:
    """Two images of flat coloured rectangles on noise, annotated as a polygon, an RLE and a crowd."""
    rng = np.random.default_rng(1)
    images = {}
    for image_id, (height, width) in ((5, (90, 130)), (11, (120, 100))):
        rgb = rng.normal(120, 20, (height, width, 3))
        (top, left, bottom, right), second = (10, 8, 60, 50), mask(30, 60, height - 5, width - 10, (height, width))
        rgb[top:bottom, left:right], rgb[second] = (230, 30, 30), (30, 40, 220)
        images[image_id] = (np.clip(rgb, 0, 255).astype(np.uint8), [
            ([[left, top, right, top, right, bottom, left, bottom]], 0), (rle(second), 0),
            (uncompressed(mask(height - 12, 0, height, 20, (height, width))), 1),
        ])
    return write_coco(root, images)


def direct_cocoeval(annotations: Path, results: list[dict], image_ids: list[int]) -> dict[str, list[float]]:
    """pycocotools on its own: the original json, the results loaded as they are, class-agnostic."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        detections = truth.loadRes(results)
        for kind in ("bbox", "segm"):
            evaluation = COCOeval(truth, detections, kind)
            evaluation.params.useCats, evaluation.params.imgIds = 0, image_ids
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            stats[kind] = evaluation.stats.tolist()
    return stats


def test_evaluate_scores_decode_coco_results_as_pycocotools_does(tmp_path):
    annotations = shapes_coco(tmp_path / "coco")
    store = ["--store", tmp_path / "store"]
    decoded, results = [], []
    for shard in range(2):  # one image per shard
        m = {stage: tmp_path / f"{stage}{shard}.json" for stage in ("preprocess", "extract", "solve", "decode")}
        lds("preprocess", "--dataset", f"coco:{tmp_path / 'coco'}", "--shard", shard, "--shard-size", 1, "--size", 64, *store, "--manifest", m["preprocess"])
        lds("extract", "--input", m["preprocess"], "--model", "tiny-vit", *store, "--manifest", m["extract"])
        lds("solve", "--input", m["extract"], "--solver", "exact", "--channels", 6, *store, "--manifest", m["solve"])
        lds("decode", "--input", m["solve"], "--clusters", 3, "--instances", "--coco-results", tmp_path / f"instances{shard}.json", *store, "--manifest", m["decode"])
        decoded += ["--input", m["decode"]]
        results += json.loads((tmp_path / f"instances{shard}.json").read_text())
    lds("evaluate", *decoded, "--metrics", tmp_path / "metrics.json", *store, "--manifest", tmp_path / "evaluate.json")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["instance_protocol"] == f"original resolution, annotations from {annotations}"
    assert metrics["images"] == 2 and metrics["objects"] == 6 and len(results) == 2 * metrics["proposals_per_image"] > 0
    direct = direct_cocoeval(annotations, results, [5, 11])
    for kind, prefix in (("bbox", "box"), ("segm", "mask")):
        assert [metrics[f"{prefix}_{name}"] for name in ("ap", "ap50", "ar100")] == [direct[kind][i] for i in (0, 1, 8)], kind
    assert metrics["mask_ar100"] > 0  # the flat rectangles are found, at least in part

    # the dataset gone: the stored resized masks, said in the metrics and cached apart
    annotations.rename(annotations.with_suffix(".moved"))
    out = lds("evaluate", *decoded, "--metrics", tmp_path / "fallback.json", *store, "--manifest", tmp_path / "evaluate-fallback.json")
    assert "dataset unreachable: COCO annotations not found" in out.output and "made" in out.output
    fallback = json.loads((tmp_path / "fallback.json").read_text())
    assert fallback["instance_protocol"].startswith("preprocessed resolution, stored resized masks (dataset unreachable: COCO annotations not found:")
    assert str(annotations) in fallback["instance_protocol"] and fallback["xy_regression_r2"] == metrics["xy_regression_r2"]
