"""What and where (issue 17): a run per graph kind on one shared extract, the report keeping kq and vv
runs of a model apart, and per-layer agreement and single-layer X-Y R² singling out planted layers."""

import csv
import io
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from pipeline.extract.core import LayerAttention
from pipeline.solve.layers import agreement, layer_xy_r2, layers_csv, mean_over_images, read_layers_csv
from pipeline.evaluate.report import csv_report, markdown_report, tables, what_where_table
from pipeline.solve.params import GraphOptions
from pipeline.store import ArraySpec, ArtifactRef, Store
from stages.cli import cli
from workflow_runs import TINY, dry_run

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- report

KQ = {"dataset": "voc", "model": "dino-vits16", "pretrained": True, "images": 5, "graph": "kq", "xy_regression_r2": 0.91,
      "xy_regression_error": 0.08, "oracle_miou": 0.40, "box_ar100": 0.12, "mask_ar100": 0.09}
VV = {**KQ, "graph": "vv", "xy_regression_r2": 0.35, "xy_regression_error": 0.25, "oracle_miou": 0.55, "box_ar100": 0.10, "mask_ar100": 0.07}
MASKCUT = {"dataset": "voc", "model": "dino-vits16", "pretrained": True, "images": 5, "baseline": "maskcut", "oracle_miou": 0.2}


def test_the_report_keeps_the_kq_and_vv_runs_of_one_model_apart():
    table = what_where_table([VV, MASKCUT, KQ])
    assert table.columns == ["dataset", "model", "graph", "X-Y R²", "X-Y error", "oracle mIoU", "box AR100", "mask AR100"]
    assert table.rows == [["voc", "dino-vits16", "kq", "0.910", "0.080", "40.0", "12.0", "9.0"],
                          ["voc", "dino-vits16", "vv", "0.350", "0.250", "55.0", "10.0", "7.0"]]
    assert "'where'" in table.note and "'what'" in table.note
    regions = {t.title.split(" (")[0]: t for t in tables([KQ, VV, MASKCUT])}["Region quality"]
    assert [row[:2] for row in regions.rows] == [["dino-vits16 (MaskCut)", "20.0"], ["dino-vits16 (kq)", "40.0"], ["dino-vits16 (vv)", "55.0"]]
    markdown = markdown_report([KQ, VV])
    assert markdown.index("### What and where") < markdown.index("### Region quality")
    assert "| voc | dino-vits16 | vv | 0.350 | 0.250 | 55.0 | 10.0 | 7.0 |" in markdown
    rows = list(csv.DictReader(io.StringIO(csv_report([KQ, VV, MASKCUT]))))
    assert [(r["model"], r["graph"], r["baseline"], r["xy_regression_r2"]) for r in rows] == [
        ("dino-vits16", "kq", "", "0.91"), ("dino-vits16", "vv", "", "0.35"), ("dino-vits16", "", "maskcut", "")]
    assert what_where_table([MASKCUT]) is None  # runs without a graph kind (older metrics, baselines): no such table


def test_lds_report_reads_a_model_folder_and_its_vv_folder_as_two_runs(tmp_path):
    for folder, metrics in (("tiny-vit", KQ), ("tiny-vit@vv", VV)):
        (tmp_path / "voc" / folder).mkdir(parents=True)
        (tmp_path / "voc" / folder / "metrics.json").write_text(json.dumps({**metrics, "model": "tiny-vit", "pretrained": False}))
    result = CliRunner().invoke(cli, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert [(r["dataset"], r["model"], r["graph"]) for r in runs] == [("voc", "tiny-vit", "kq"), ("voc", "tiny-vit", "vv")]
    markdown = (tmp_path / "metrics.md").read_text()
    assert "| voc | tiny-vit (NOT pretrained) | kq | 0.910 |" in markdown and "| voc | tiny-vit (NOT pretrained) | vv | 0.350 |" in markdown
    page = (tmp_path / "index.html").read_text()
    assert "voc / tiny-vit: kq and vv" in page and "not in a store reachable from here" in page  # no store: no image pages


# ------------------------------------------------------------------------------------ planted layers

GRID = (8, 8)
REGIONS = np.zeros(GRID, dtype=np.int64)
REGIONS[:, 4:] = 1
REGIONS[4:, :4] = 2


def noise_layer(name: str, rng: np.random.Generator) -> LayerAttention:
    """Weak random queries and keys: nearly uniform attention, no structure."""
    q, k = (0.3 * rng.normal(size=(2, *GRID, 6)) for _ in range(2))
    return LayerAttention(name, q, k, rng.normal(size=(2, *GRID, 6)), 1.0)


def regions_layer(name: str, rng: np.random.Generator) -> LayerAttention:
    """Attention (almost) only within the own one of three regions."""
    onehot = np.eye(3)[REGIONS]
    q = np.stack([8 * onehot + 0.03 * rng.normal(size=onehot.shape) for _ in range(2)])
    k = np.stack([onehot + 0.03 * rng.normal(size=onehot.shape) for _ in range(2)])
    return LayerAttention(name, q, k, k.copy(), 1.0)


def position_layer(name: str, width: float = 1.5) -> LayerAttention:
    """Attention to the neighbours: softmax(q_i · k_j) = softmax(-|p_i - p_j|² / width²) over j."""
    y, x = np.mgrid[: GRID[0], : GRID[1]].astype(np.float64)
    q = np.stack([2 * y, 2 * x, -np.ones_like(y)], axis=-1) / width**2
    k = np.stack([y, x, y**2 + x**2], axis=-1)
    return LayerAttention(name, np.stack([q, q]), np.stack([k, k]), np.stack([k, k]), 1.0)


def planted_extract(store: Store, layers: list[LayerAttention]) -> ArtifactRef:
    """An extract artifact of one image holding ``layers``, as `lds extract` stores them."""
    pre, ref = ArtifactRef("preprocess", "planted-pre"), ArtifactRef("extract", "planted")
    writer = store.writer(pre, {"params": {}}, [])
    writer.write_item("image", {"rgb": ArraySpec(np.zeros((32, 32, 3), np.uint8), ("y", "x", "channel"))})
    writer.publish(["image"])
    writer = store.writer(ref, {"params": {}, "model": "planted", "pretrained": False}, [pre])
    arrays = {f"layers/{layer.name}/{name}": ArraySpec(getattr(layer, name).astype(np.float32), ("head", "y", "x", "dim"))
              for layer in layers for name in "qkv"}
    writer.write_item("image", arrays, {}, {f"layers/{layer.name}": {"scale": layer.scale} for layer in layers})
    writer.publish(["image"])
    return ref


def test_the_agreement_of_a_planted_layer_with_the_joint_eigenvectors_ranks_it_first(tmp_path):
    rng = np.random.default_rng(0)
    store = Store(tmp_path / "store")
    extract = planted_extract(store, [noise_layer("block00", rng), noise_layer("block01", rng), regions_layer("block02", rng), noise_layer("block03", rng)])
    (tmp_path / "extract.json").write_text(json.dumps({"stage": "extract", "key": extract.key, "path": store.path(extract)}))
    result = CliRunner().invoke(cli, ["solve", "--input", str(tmp_path / "extract.json"), "--solver", "exact", "--channels", "4",
                                      "--store", str(store.root), "--manifest", str(tmp_path / "solve.json")])
    assert result.exit_code == 0, result.output
    solved = store.open(ArtifactRef("solve", json.loads((tmp_path / "solve.json").read_text())["key"]))["items/image"]
    heads = agreement(solved.attrs["graphs"], solved["eigenvalues"][...])
    assert sorted(heads) == [(f"block0{i}", f"head{h}") for i in range(4) for h in range(2)]
    by_layer = mean_over_images([{layer: value} for (layer, _), value in heads.items()])
    assert max(by_layer, key=by_layer.get) == "block02"
    assert by_layer["block02"] > 0.7 > 0.4 > max(v for layer, v in by_layer.items() if layer != "block02")
    # what lds evaluate writes as layers.csv: one row per layer and head, with the layer's own X-Y R²
    position = dict(zip(solved.attrs["layers"], solved["layer_xy_r2"][...]))
    rows = read_layers_csv(layers_csv("kq", {"agreement": [[*key, value] for key, value in heads.items()], "xy_r2": list(position.items())}))
    assert len(rows) == 8 and rows[4]["layer"] == "block02" and rows[4]["agreement"] == round(heads["block02", "head0"], 6)
    assert rows[4]["layer_xy_r2"] == round(float(position["block02"]), 6)


def test_the_single_layer_embedding_of_a_layer_attending_to_its_neighbours_carries_position_best():
    rng = np.random.default_rng(1)
    layers = [noise_layer("block00", rng), regions_layer("block01", rng), position_layer("block02"), noise_layer("block03", rng)]
    r2 = layer_xy_r2(layers, GraphOptions("kq"), channels=6)
    assert list(r2) == ["block00", "block01", "block02", "block03"]
    assert max(r2, key=r2.get) == "block02" and r2["block02"] > 0.9 > max(r2["block00"], r2["block03"])
    assert list(layer_xy_r2(layers, GraphOptions("kq", layers=("-2",)), channels=6)) == ["block02"]  # the solver's layer selection


# ------------------------------------------------------------------------------------------ workflow

CONFIG = {**TINY, "solve": {"solver": "exact", "channels": 4}, "extract": {"keep": "until-consumed"}}


def test_the_workflow_solves_kq_and_vv_by_default_on_one_shared_extract(tmp_path):
    run = dry_run(tmp_path, CONFIG)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    lines = log.splitlines()
    extracts = [line for line in lines if " -m stages extract " in line]
    solves = sorted(line for line in lines if " -m stages solve " in line)
    assert len(extracts) == 2 and len(solves) == 4 and all("--arrays q,k,v" in line for line in extracts)
    for shard in (0, 1):
        shared = f"--input results/shapes/tiny-vit/shard-{shard}/extract.json"
        assert sum(shared in line and "--graph kq" in line and f"tiny-vit/shard-{shard}/solve.json" in line for line in solves) == 1
        assert sum(shared in line and "--graph vv" in line and f"tiny-vit@vv/shard-{shard}/solve.json" in line for line in solves) == 1
    evaluates = [line for line in lines if " -m stages evaluate " in line]
    assert sorted(line.split("--layers-csv ")[1].split()[0] for line in evaluates) == ["results/shapes/tiny-vit/layers.csv", "results/shapes/tiny-vit@vv/layers.csv"]
    report = next(line for line in lines if " -m stages report " in line)
    assert "results/shapes/tiny-vit/metrics.json" in report and "results/shapes/tiny-vit@vv/metrics.json" in report
    release = [line for line in lines if " cache release " in line]  # the shared attention outlives both solves
    assert len(release) == 2 and all("tiny-vit/shard-" in line and "tiny-vit@vv/shard-" in line for line in release)


def test_a_list_of_graph_kinds_for_the_dataset_level_solver_is_refused_by_the_schema(tmp_path):
    run = dry_run(tmp_path, {**CONFIG, "solve": {"level": "dataset"}, "solve_dataset": {"graph": ["vv", "kq"]}})
    assert run.returncode != 0 and "graph" in run.stdout + run.stderr


def test_layer_figure_clips_r2_below_minus_one_and_draws_runs_without_per_layer_r2(tmp_path):
    from pipeline.evaluate.figures import R2_FLOOR, layer_r2_points, save_layer_figure

    rows = read_layers_csv(layers_csv("kq", {"agreement": [["block00", "head0", 0.5], ["block01", "head0", 0.9]],
                                             "xy_r2": [["block00", -4.0], ["block01", 0.8]]}))
    points = layer_r2_points(rows, ["block00", "block01", "block02"])
    assert points[0] == R2_FLOOR == -1 and points[1] == 0.8 and np.isnan(points[2])
    lean = read_layers_csv(layers_csv("vv", {"agreement": [["block00", "head0", 0.4]], "xy_r2": []}))
    assert np.isnan(layer_r2_points(lean, ["block00"])).all()
    save_layer_figure(tmp_path / "layers.png", {"vv": lean}, "no per-layer R²")  # solve.layer_diagnostics: false
    assert (tmp_path / "layers.png").stat().st_size > 0
