"""The results explorer: static HTML pages opened from disk (no server): per dataset x model a sortable
table of its images by metric, and a page per image with every graph kind's eigenvectors, regions,
proposals and metrics."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from urllib.parse import quote

# per-image metrics of lds evaluate, in table order: (key, header, format)
IMAGE_METRICS = (("xy_r2", "X-Y R²", "{:.3f}"), ("xy_error", "X-Y error", "{:.3f}"), ("matched_miou", "matched mIoU", "{:.1%}"))
STYLE = (
    "<style>body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
    "table.sortable th{cursor:pointer;background:#eee}th[data-order=ascending]::after{content:' ▲'}"
    "th[data-order=descending]::after{content:' ▼'}img.figure{max-width:100%;border:1px solid #ccc}</style>"
)
# Clicking a header of a sortable table orders its rows by that column (numbers high to low first, then
# low to high; names A to Z first); empty cells stay last.
SORT_SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach(function (header) {
  header.addEventListener("click", function () {
    var table = header.closest("table"), body = table.tBodies[0], column = header.cellIndex;
    var numeric = header.dataset.kind === "number";
    var first = numeric ? "descending" : "ascending";
    var order = header.dataset.order === first ? (first === "ascending" ? "descending" : "ascending") : first;
    table.querySelectorAll("th").forEach(function (other) { delete other.dataset.order; });
    header.dataset.order = order;
    var sign = order === "ascending" ? 1 : -1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
      if (x === "" || y === "") { return (x === "") - (y === ""); }
      return sign * (numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y));
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
</script>"""


def href(path: str) -> str:
    """A relative path as an attribute value: percent-encoded, then HTML-escaped."""
    return html.escape(quote(path))


def number(value: float | None, pattern: str) -> tuple[str, str]:
    """(data-value, shown text) of a metric cell; empty for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", "-"
    return repr(float(value)), pattern.format(value)


@dataclass(frozen=True)
class ImageEntry:
    """One image of an explorer: its page (relative to the page that links it) and its metrics per graph kind."""

    name: str
    page: str
    metrics: dict[str, dict[str, float | None]]  # graph -> metric key -> value


def image_columns(graphs: list[str], images: list[ImageEntry]) -> list[tuple[str, str, str, str]]:
    """(graph, key, header, format) of each metric column: every graph kind's metrics that some image has."""
    return [(graph, key, f"{header} ({graph})", pattern) for graph in graphs for key, header, pattern in IMAGE_METRICS
            if any(image.metrics.get(graph, {}).get(key) is not None for image in images)]


def image_table(graphs: list[str], images: list[ImageEntry]) -> str:
    """A sortable table (``SORT_SCRIPT``): a row per image linking its page, a column per metric and graph kind."""
    columns = image_columns(graphs, images)
    head = "<th data-kind='text'>image</th>" + "".join(f"<th data-kind='number'>{html.escape(title)}</th>" for _, _, title, _ in columns)
    rows = []
    for image in images:
        cells = [f"<td data-value='{html.escape(image.name)}'><a href='{href(image.page)}'>{html.escape(image.name)}</a></td>"]
        for graph, key, _, pattern in columns:
            value, text = number(image.metrics.get(graph, {}).get(key), pattern)
            cells.append(f"<td data-value='{value}'>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>\n"


def image_page(title: str, image: ImageEntry, graphs: list[str], figures: list[tuple[str, str]], links: list[tuple[str, str]],
               index: str, previous: str | None, following: str | None) -> str:
    """One image's page: navigation, its metrics per graph kind, its figures ((caption, path)) and links
    ((label, path)) to each run's own figure; every path relative to the page."""
    nav = [f"<a href='{href(index)}'>index</a>"]
    nav += [f"<a href='{href(page)}'>{label}</a>" for label, page in (("previous", previous), ("next", following)) if page]
    metrics = [(key, header, pattern) for key, header, pattern in IMAGE_METRICS if any(image.metrics.get(g, {}).get(key) is not None for g in graphs)]
    head = "<th>graph</th>" + "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in metrics)
    rows = "".join(
        f"<tr><td>{html.escape(graph)}</td>" + "".join(f"<td>{number(image.metrics.get(graph, {}).get(key), pattern)[1]}</td>" for key, _, pattern in metrics) + "</tr>"
        for graph in graphs
    )
    parts = [
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(image.name)}: {html.escape(title)}</title>{STYLE}</head><body>",
        f"<p>{' · '.join(nav)}</p>",
        f"<h1>{html.escape(image.name)}</h1>\n<p>{html.escape(title)}</p>",
        f"<table><tr>{head}</tr>{rows}</table>",
        *(f"<h3>{html.escape(caption)}</h3>\n<p><a href='{href(path)}'><img class='figure' src='{href(path)}' alt='{html.escape(caption)}'></a></p>" for caption, path in figures),
    ]
    if links:
        parts.append("<p>" + " · ".join(f"<a href='{href(path)}'>{html.escape(label)}</a>" for label, path in links) + "</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


@dataclass(frozen=True)
class Explorer:
    """The explorer of one dataset x model: its graph kinds' runs, per-layer figure and files, and images
    (pages relative to the index page)."""

    dataset: str
    model: str
    graphs: list[str]
    layers_figure: str | None
    layers_files: list[tuple[str, str]]  # (graph, layers.csv)
    images: list[ImageEntry]
    note: str | None = None  # why some or all image pages are missing


def explorer_section(explorer: Explorer) -> str:
    """The index page's part for one dataset x model: the per-layer agreement figure and the sortable
    table of its images."""
    parts = [f"<h2>{html.escape(explorer.dataset)} / {html.escape(explorer.model)}: {' and '.join(map(html.escape, explorer.graphs))}</h2>"]
    if explorer.layers_figure:
        files = " · ".join(f"<a href='{href(path)}'>{html.escape(graph)} layers.csv</a>" for graph, path in explorer.layers_files)
        parts.append(
            "<p>Per-layer agreement: each head's mean diag(Zᵀ A Z) with the joint eigenvectors (1: it agrees with all of "
            f"them), and the X-Y R² of each layer's own eigenvectors (high: the layer carries position). {files}</p>"
        )
        parts.append(f"<p><a href='{href(explorer.layers_figure)}'><img class='figure' src='{href(explorer.layers_figure)}' alt='per-layer agreement'></a></p>")
    if explorer.note:
        parts.append(f"<p>{html.escape(explorer.note)}</p>")
    if explorer.images:
        parts.append(f"<p>{len(explorer.images)} images, a page each; click a column to sort.</p>")
        parts.append(image_table(explorer.graphs, explorer.images))
    return "\n".join(parts)
