"""Aggregation of metrics across datasets x models: CSV, the paper-layout tables, the HTML index."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner

from pipeline.errors import LdsError
from pipeline.evaluate.report import RunLinks, csv_report, failures_table, markdown_report, read_run, run_links, tables
from stages.cli import cli

RUNS = [
    {"dataset": "coco-stuff", "model": "dino-vits8", "pretrained": True, "images": 10, "semantic_miou": 0.25, "semantic_pixel_accuracy": 0.5, "xy_regression_r2": 0.91},
    {"dataset": "voc", "model": "dino-vits8", "pretrained": True, "images": 5, "oracle_miou": 0.6, "box_ap50": 0.123, "xy_regression_r2": 0.8},
    {"dataset": "voc", "model": "tiny-vit", "pretrained": False, "images": 5, "oracle_miou": 0.1, "box_ap50": 0.01, "xy_regression_r2": 0.2},
]


def test_tables_put_models_down_and_datasets_across():
    by_title = {t.title.split(" (")[0]: t for t in tables(RUNS)}
    semantic = by_title["Unsupervised semantic segmentation"]
    assert semantic.columns == ["model", "coco-stuff mIoU", "coco-stuff Acc"]
    assert semantic.rows == [["dino-vits8", "25.0", "50.0"], ["tiny-vit (NOT pretrained)", "-", "-"]]
    xy = by_title["X-Y coordinate regression"]
    assert xy.columns == ["model", "coco-stuff X-Y R²", "coco-stuff X-Y error", "voc X-Y R²", "voc X-Y error"]
    assert xy.rows[0] == ["dino-vits8", "0.910", "-", "0.800", "-"]
    proposals = by_title["Class-agnostic object proposals"]
    assert proposals.rows[1][:2] == ["tiny-vit (NOT pretrained)", "1.0"]
    markdown = markdown_report(RUNS)
    assert "| dino-vits8 | 25.0 | 50.0 |" in markdown and "|---|---|---|" in markdown


def test_runs_that_left_images_out_get_a_table_naming_them_and_others_none():
    assert failures_table(RUNS) is None and "Images left out" not in markdown_report(RUNS)
    failed = {**RUNS[1], "images_failed": 1, "coverage": "evaluated 5 of 6 images, 1 failed (see summary)",
              "failed_images": {"img-3": "preprocess: cannot identify image file"}}
    table = failures_table([RUNS[0], failed])
    assert table.rows == [["voc", "dino-vits8", "evaluated 5 of 6 images, 1 failed (see summary)", "img-3 (preprocess: cannot identify image file)"]]
    assert "### Images left out" in markdown_report([RUNS[0], failed])


def test_csv_has_one_row_per_run_and_every_metric_column():
    rows = list(csv.DictReader(io.StringIO(csv_report(RUNS))))
    assert [(r["dataset"], r["model"], r["pretrained"]) for r in rows] == [
        ("coco-stuff", "dino-vits8", "True"), ("voc", "dino-vits8", "True"), ("voc", "tiny-vit", "False"),
    ]
    assert rows[0]["semantic_miou"] == "0.25" and rows[0]["box_ap"] == "" and rows[2]["box_ap50"] == "0.01"


def test_lds_report_writes_every_file_and_links_what_exists(tmp_path):
    run = tmp_path / "my data" / "tiny-vit"
    (run / "figures").mkdir(parents=True)
    (run / "shard-0").mkdir()
    for name in ("contact-sheet.png", "img <1>.png"):
        (run / "figures" / name).write_bytes(b"png")
    (run / "shard-0" / "instances.json").write_text("[]")
    metrics = {"model": "tiny-vit", "pretrained": False, "weights": "random initialisation (NOT pretrained)", "images": 2, "oracle_miou": 0.5}
    (run / "metrics.json").write_text(json.dumps(metrics))
    result = CliRunner().invoke(cli, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert runs == [{**metrics, "dataset": "my data", "model": "tiny-vit"}]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("my data,tiny-vit,False,")
    assert "| tiny-vit (NOT pretrained) | 50.0 |" in (tmp_path / "metrics.md").read_text()
    page = (tmp_path / "index.html").read_text()
    assert "<img class='sheet' src='my data/tiny-vit/figures/contact-sheet.png'" in page
    assert "href='my data/tiny-vit/figures/img &lt;1&gt;.png'>img &lt;1&gt;</a>" in page
    assert "href='my data/tiny-vit/shard-0/instances.json'" in page
    assert "NOT pretrained" in page and "<td>50.0</td>" in page


def test_lds_report_without_metrics_says_what_to_run(tmp_path):
    result = CliRunner().invoke(cli, ["report", "--results", str(tmp_path)])
    assert result.exit_code != 0 and "no metrics found" in result.output and "lds evaluate" in result.output


def test_a_baseline_run_is_its_own_row_labelled_with_its_method():
    runs = [RUNS[1], {**RUNS[1], "baseline": "maskcut", "box_ap50": 0.06}]
    proposals = {t.title.split(" (")[0]: t for t in tables(runs)}["Class-agnostic object proposals"]
    assert [row[:2] for row in proposals.rows] == [["dino-vits8", "12.3"], ["dino-vits8 (MaskCut)", "6.0"]]
    rows = list(csv.DictReader(io.StringIO(csv_report(runs))))
    assert [(r["model"], r["baseline"]) for r in rows] == [("dino-vits8", ""), ("dino-vits8", "maskcut")]


def test_a_run_is_named_by_its_folders_and_links_only_the_files_beside_it(tmp_path):
    run = tmp_path / "voc" / "dino-vits8+maskcut"
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "img-1.png").write_bytes(b"png")
    (run / "metrics.json").write_text(json.dumps({"baseline": "maskcut", "images": 3}))
    metrics = read_run(run / "metrics.json")
    assert (metrics["dataset"], metrics["model"]) == ("voc", "dino-vits8+maskcut")  # no model recorded: the folder's name
    links = run_links(run / "metrics.json", {**metrics, "model": "dino-vits8"}, "model dino-vits8 (w)", lambda p: p.relative_to(tmp_path).as_posix())
    assert links == RunLinks("voc", "dino-vits8 (MaskCut)", "model dino-vits8 (w); 3 images", "voc/dino-vits8+maskcut/metrics.json",
                             None, [("img-1", "voc/dino-vits8+maskcut/figures/img-1.png")], [])
    (run / "broken.json").write_text("{")
    with pytest.raises(LdsError, match="cannot read metrics .*broken.json"):
        read_run(run / "broken.json")
