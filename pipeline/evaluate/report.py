"""Aggregating the metrics of every dataset x model (x graph kind): rows, CSV, tables in the layout of
the paper's (models down, datasets across), the what/where table, and an HTML index that links the
figures and the explorer."""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.errors import LdsError
from pipeline.evaluate.explorer import SORT_SCRIPT, STYLE, Explorer, explorer_section

# Scalar metrics in report order: (key, header, format). Percentages as in the paper's tables.
METRICS = (
    ("semantic_miou", "mIoU", "pct"),
    ("semantic_pixel_accuracy", "Acc", "pct"),
    ("crossimage_kmeans_miou", "mIoU", "pct"),
    ("crossimage_kmeans_pixel_accuracy", "Acc", "pct"),
    ("oracle_miou", "oracle mIoU", "pct"),
    ("oracle_pixel_accuracy", "oracle Acc", "pct"),
    ("matched_miou", "per-image mIoU", "pct"),
    ("zeroshot_miou", "zero-shot mIoU", "pct"),
    ("zeroshot_pixel_accuracy", "zero-shot Acc", "pct"),
    ("box_ap50", "box AP50", "pct"),
    ("box_ap", "box AP", "pct"),
    ("box_ar100", "box AR100", "pct"),
    ("mask_ap50", "mask AP50", "pct"),
    ("mask_ap", "mask AP", "pct"),
    ("mask_ar100", "mask AR100", "pct"),
    ("xy_regression_r2", "X-Y R²", "float"),
    ("xy_regression_error", "X-Y error", "float"),
)
TABLES = (
    ("Unsupervised semantic segmentation (dataset-level solver, K-Means on X_ortho, Hungarian matching)", ("semantic_miou", "semantic_pixel_accuracy")),
    ("K-Means across per-image solves (not the paper's dataset level; Hungarian matching)", ("crossimage_kmeans_miou", "crossimage_kmeans_pixel_accuracy")),
    ("Region quality (oracle decoding) and per-image matched mIoU", ("oracle_miou", "oracle_pixel_accuracy", "matched_miou")),
    ("Zero-shot semantic segmentation (CLIP labels by class name, no matching)", ("zeroshot_miou", "zeroshot_pixel_accuracy")),
    ("Class-agnostic object proposals (COCOeval)", ("box_ap50", "box_ap", "box_ar100", "mask_ap50", "mask_ap", "mask_ar100")),
    ("X-Y coordinate regression (32 x 32 grid, 80/20 split)", ("xy_regression_r2", "xy_regression_error")),
)
# The paper's finding, a row per dataset x model x graph kind: does the graph carry position ("where")
# or object classes ("what")?
WHAT_WHERE = (
    ("xy_regression_r2", "X-Y R²"),
    ("xy_regression_error", "X-Y error"),
    ("oracle_miou", "oracle mIoU"),
    ("semantic_miou", "semantic mIoU"),
    ("crossimage_kmeans_miou", "K-Means across images mIoU"),
    ("box_ar100", "box AR100"),
    ("mask_ar100", "mask AR100"),
)
WHAT_WHERE_NOTE = (
    "How to read it: compare the graph kinds of one model. A high X-Y R² (low error) means the eigenvectors "
    "encode position: that graph carries 'where'. A high semantic mIoU (and oracle mIoU) means its regions follow "
    "object classes: it carries 'what'. kq: key-query attention; vv: value-value similarity (the dataset-level "
    "solver's kq: normalised queries against normalised keys)."
)
BASELINE_NAMES = {"tokencut": "TokenCut", "maskcut": "MaskCut"}  # as the paper's tables name them
HEADERS = {key: header for key, header, _ in METRICS}
FORMATS = {key: kind for key, _, kind in METRICS}


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""  # a sentence under the title

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""] + ([self.note, ""] if self.note else [])
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        note = f"<p>{html.escape(self.note)}</p>\n" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>\n{note}<table><tr>{head}</tr>{body}</table>\n"


def run_name(run: dict[str, Any]) -> str:
    """The model, and the graph kind of a solver's run or the baseline of a baseline's run:
    'dino-vits16 (vv)', 'dino-vits16 (MaskCut)'."""
    baseline = run.get("baseline")
    tag = BASELINE_NAMES.get(baseline, baseline) if baseline else run.get("graph")
    return f"{run['model']} ({tag})" if tag else run["model"]


def not_pretrained(run: dict[str, Any]) -> str:
    return "" if run.get("pretrained") else " (NOT pretrained)"


def model_label(run: dict[str, Any]) -> str:
    return run_name(run) + not_pretrained(run)


def fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if FORMATS.get(key) == "pct" else f"{value:.3f}"


def tables(runs: list[dict[str, Any]]) -> list[Table]:
    """One table per task: a row per model, per dataset the task's metrics (tables with no value are
    left out)."""
    models = sorted({model_label(r) for r in runs})
    out = []
    for title, keys in TABLES:
        datasets = sorted({r["dataset"] for r in runs if any(k in r for k in keys)})
        if not datasets:
            continue
        columns = ["model"] + [f"{d} {HEADERS[k]}" for d in datasets for k in keys]
        by = {(model_label(r), r["dataset"]): r for r in runs}
        rows = [[m] + [fmt(k, by.get((m, d), {}).get(k)) for d in datasets for k in keys] for m in models]
        out.append(Table(title, columns, rows))
    return out


def what_where_table(runs: list[dict[str, Any]]) -> Table | None:
    """A row per dataset x model x graph kind (runs that record one): position against classes, the
    columns no run has left out; None without such runs."""
    solved = sorted((r for r in runs if r.get("graph")), key=lambda r: (r["dataset"], r["model"], r["graph"]))
    if not solved:
        return None
    keys = [(key, header) for key, header in WHAT_WHERE if any(key in r for r in solved)]
    rows = [[r["dataset"], r["model"] + not_pretrained(r), r["graph"]] + [fmt(key, r.get(key)) for key, _ in keys] for r in solved]
    return Table("What and where: which graph carries position, which carries classes", ["dataset", "model", "graph"] + [h for _, h in keys], rows, WHAT_WHERE_NOTE)


def failures_table(runs: list[dict[str, Any]]) -> Table | None:
    """A row per run that left images out (max_failed): its coverage and the images with their reasons;
    None when every run evaluated every image."""
    failing = sorted((r for r in runs if r.get("images_failed")), key=lambda r: (r["dataset"], run_name(r)))
    if not failing:
        return None
    rows = [[r["dataset"], run_name(r), r.get("coverage", ""), "; ".join(f"{item} ({why})" for item, why in r.get("failed_images", {}).items())]
            for r in failing]
    return Table("Images left out", ["dataset", "run", "coverage", "failed images"], rows,
                 "Images a stage could not process (within max_failed): the metrics above leave them out.")


def all_tables(runs: list[dict[str, Any]]) -> list[Table]:
    """The what/where table (when some run records its graph kind), the task tables, then the images left
    out (when some run left one out)."""
    first, failures = what_where_table(runs), failures_table(runs)
    return ([first] if first else []) + tables(runs) + ([failures] if failures else [])


def markdown_report(runs: list[dict[str, Any]]) -> str:
    intro = (
        "# lds metrics\n\nPercentages (mIoU, accuracy, AP, AR) and X-Y regression R² / error; "
        "'-' where the dataset has no ground truth for that task. docs/metrics.md says what each one means.\n\n"
    )
    return intro + "\n".join(t.markdown() for t in all_tables(runs))


def csv_report(runs: list[dict[str, Any]]) -> str:
    """One row per dataset x model (x graph kind or baseline): identification, then every scalar metric
    (empty when absent)."""
    fields = ["dataset", "model", "pretrained", "weights", "images", "baseline", "graph"] + [k for k, _, _ in METRICS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow({k: run.get(k, "") for k in fields})
    return buffer.getvalue()


@dataclass(frozen=True)
class RunLinks:
    """Files of one dataset x model (x baseline), relative to the index page."""

    dataset: str
    model: str  # run_name: the model, and the baseline when the run is one
    caption: str
    metrics: str
    contact_sheet: str | None
    figures: list[tuple[str, str]]  # (image name, path)
    proposals: list[str]  # COCO results json files


def read_run(path: Path) -> dict:
    """A run's metrics.json, <results>/<dataset>/<run folder>/metrics.json: the dataset named by its folder,
    the model by the name it records (a folder spells a hub name's "/" as "--"; a baseline's run, in
    <model folder>+<method>, records its method as ``baseline``; a run on value graphs, in <model folder>@vv,
    records ``graph``)."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LdsError(f"cannot read metrics {path} ({error})") from None
    return {**metrics, "dataset": path.parent.parent.name, "model": metrics.get("model", path.parent.name)}


def run_links(path: Path, run: dict[str, Any], caption: str, relative: Callable[[Path], str]) -> RunLinks:
    """The files of the run whose metrics.json is ``path`` that exist beside it: its contact sheet, decode's
    figure per image and the COCO results json of each shard. ``caption``: the model's, as figures say it;
    ``relative``: a path as the index page links it."""
    folder = path.parent
    sheet = folder / "figures" / "contact-sheet.png"
    figures = sorted(p for p in (folder / "figures").glob("*.png") if p.name != "contact-sheet.png")
    return RunLinks(
        run["dataset"], run_name(run), f"{caption}; {run.get('images', '?')} images", relative(path),
        relative(sheet) if sheet.is_file() else None, [(p.stem, relative(p)) for p in figures],
        [relative(p) for p in sorted(folder.glob("shard-*/instances.json"))],
    )


def html_index(runs: list[dict[str, Any]], links: list[RunLinks], explorers: Sequence[Explorer] = ()) -> str:
    """A page that shows the metrics tables; per dataset x model its explorer (per-layer agreement and a
    sortable table of its images, each linking its page); and per run its contact sheet and links to
    every figure and file."""
    parts = [
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>lds results</title>",
        STYLE.replace("</style>", "img.sheet{max-width:100%;border:1px solid #ccc}.warn{color:#a00}</style>") + "</head><body>",
        "<h1>lds results</h1>",
        "<p><a href='metrics.md'>metrics.md</a> · <a href='metrics.csv'>metrics.csv</a> · <a href='metrics.json'>metrics.json</a></p>",
        *(t.html() for t in all_tables(runs)),
        *(explorer_section(explorer) for explorer in explorers),
    ]
    for run in links:
        warn = " class='warn'" if "NOT pretrained" in run.caption else ""
        parts.append(f"<h2>{html.escape(run.dataset)} / {html.escape(run.model)}</h2>")
        parts.append(f"<p{warn}>{html.escape(run.caption)}</p>")
        files = [f"<a href='{html.escape(run.metrics)}'>metrics.json</a>"] + [
            f"<a href='{html.escape(p)}'>{html.escape(p.rsplit('/', 2)[-2])} proposals (COCO results json)</a>" for p in run.proposals
        ]
        parts.append("<p>" + " · ".join(files) + "</p>")
        if run.contact_sheet:
            parts.append(f"<p><a href='{html.escape(run.contact_sheet)}'><img class='sheet' src='{html.escape(run.contact_sheet)}' alt='contact sheet'></a></p>")
        if run.figures:
            items = " · ".join(f"<a href='{html.escape(path)}'>{html.escape(name)}</a>" for name, path in run.figures)
            parts.append(f"<p>Figures per image: {items}</p>")
    parts.append(SORT_SCRIPT)
    parts.append("</body></html>\n")
    return "\n".join(parts)
