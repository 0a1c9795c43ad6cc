"""The results explorer's files, written by `lds report`: per dataset x model (its runs on each graph
kind) the per-layer figure, and a page per image with its figures, read from the runs' metrics.json,
layers.csv and, through the evaluate artifact metrics.json names, the store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from pipeline.evaluate.explorer import Explorer, ImageEntry, image_page
from pipeline.store import ArtifactRef, Store
from stages.common import upstream, write_text_atomic
from pipeline.evaluate.figures import model_caption

EXPLORER = "explorer"  # the folder under the results folder


@dataclass
class RunImages:
    """One run's images as the store holds them: zarr groups per item and the per-image metrics."""

    groups: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)  # item -> (decoded, solved, preprocessed)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # item -> metric key -> value


def evaluated_images(artifact: str | None) -> RunImages | None:
    """The images of the evaluate artifact at path ``artifact`` (metrics.json's), with their metrics;
    None when no such artifact is reachable from here."""
    if not artifact or not artifact.rstrip("/").endswith(".zarr"):
        return None
    root, stage, name = artifact.rstrip("/").rsplit("/", 2)
    store, ref = Store(root), ArtifactRef(stage, name[: -len(".zarr")])
    if not store.exists(ref):
        return None
    attrs, group = store.attrs(ref), store.open(ref)
    names = attrs.get("image_names", [])
    per_image = {key: group[key][...] for key in ("xy_r2", "xy_error", "matched_miou") if key in group}
    found = RunImages(metrics={name: {key: float(values[i]) for key, values in per_image.items()} for i, name in enumerate(names)})
    for source in attrs["inputs"]:
        if source["stage"] != "decode":
            continue
        decoded = ArtifactRef("decode", source["key"])
        parts = [store.open(ref)["items"] for ref in (decoded, upstream(store, decoded, "solve"), upstream(store, decoded, "preprocess"))]
        found.groups |= {item: tuple(parts) for item in store.attrs(decoded)["items"] if item in found.metrics}
    return found


def image_figures(folder: Path, name: str, runs: dict[str, RunImages], title: str) -> list[tuple[str, str]]:
    """Write one image's eigenvector and region figures (a row per graph kind) into ``folder``; their
    (caption, file name)."""
    from pipeline.evaluate.figures import ImageView, save_regions_figure, save_what_where_figure, truth_outlines
    from pipeline.decode.instances import pixel_masks

    x_orthos, views, truth = {}, {}, None
    for graph, run in runs.items():
        decoded, solved, images = (group[name] for group in run.groups[name])
        rgb = images["rgb"][...]
        proposals = scores = None
        if "proposals" in decoded:
            proposals = pixel_masks(decoded["proposals"][...], rgb.shape[:2])
            scores = decoded["proposal_scores"][...]
        x_orthos[graph] = solved["X_ortho"][...]
        views[graph] = ImageView(name, rgb, decoded["labels"][...], proposals, scores)
    # every run of a model reads one preprocess artifact: the ground truth of the last one is theirs
    truth = truth_outlines(images["labels"][...] if "labels" in images else None, images["instances"][...] if "instances" in images else None)
    files = [("eigenvectors of each graph kind: components of X_ortho as RGB", f"{name}.eigenvectors.png"),
             ("K-Means regions and proposals of each graph kind", f"{name}.regions.png")]
    save_what_where_figure(folder / files[0][1], next(iter(views.values())).rgb, x_orthos, f"{name} | {title}")
    save_regions_figure(folder / files[1][1], views, truth, f"{name} | {title}")
    return files


def build_explorers(results_dir: Path, runs: list[tuple[Path, dict]], relative: Callable[[Path], str],
                    limit: int | None = None) -> list[Explorer]:
    """Per dataset x model with runs on a graph kind (``runs``: (metrics.json path, its metrics)): the
    per-layer figure from each run's layers.csv, and a page per image with its figures under
    RESULTS/explorer/<dataset>/<model>/, for the first ``limit`` images only if given. ``relative``: a
    path as the index page links it."""
    from pipeline.evaluate.figures import save_layer_figure
    from pipeline.solve.layers import read_layers_csv

    groups: dict[tuple[str, str], dict[str, tuple[Path, dict]]] = {}
    for path, run in runs:
        if run.get("graph") and not run.get("baseline"):
            groups.setdefault((run["dataset"], run["model"]), {})[run["graph"]] = (path, run)
    explorers = []
    for (dataset, model), by_graph in sorted(groups.items()):
        graphs = sorted(by_graph)
        folder = results_dir / EXPLORER / dataset / model.replace("/", "--")
        title = model_caption(next(iter(by_graph.values()))[1])
        layer_files = [(graph, by_graph[graph][0].parent / "layers.csv") for graph in graphs]
        layer_files = [(graph, path) for graph, path in layer_files if path.is_file()]
        layers_figure = None
        if layer_files:
            layers_figure = folder / "layers.png"
            save_layer_figure(layers_figure, {graph: read_layers_csv(path.read_text()) for graph, path in layer_files}, f"{dataset} | {title}")
        found = {graph: evaluated_images(by_graph[graph][1].get("artifact")) for graph in graphs}
        found = {graph: images for graph, images in found.items() if images is not None}
        names = list(dict.fromkeys(name for images in found.values() for name in images.groups))
        shown = names[:limit]
        entries = [ImageEntry(name, relative(folder / f"{name}.html"), {g: found[g].metrics[name] for g in found if name in found[g].groups}) for name in shown]
        for index, entry in enumerate(entries):
            present = {graph: found[graph] for graph in entry.metrics}
            figures = image_figures(folder, entry.name, present, title)
            links = [(f"{graph} run's figure", by_graph[graph][0].parent / "figures" / f"{entry.name}.png") for graph in present]
            links = [(label, os.path.relpath(path, folder)) for label, path in links if path.is_file()]
            neighbours = [f"{entries[i].name}.html" if 0 <= i < len(entries) else None for i in (index - 1, index + 1)]
            page = image_page(f"{dataset} / {title}", entry, list(present), figures, links,
                              os.path.relpath(results_dir / "index.html", folder), *neighbours)
            write_text_atomic(folder / f"{entry.name}.html", page)
        missing = sorted(set(graphs) - set(found))
        notes = [f"No image pages for {', '.join(missing)}: the evaluate artifact its metrics.json names is not in a store reachable from here."] if missing else []
        if len(shown) < len(names):
            notes.append(f"Pages for the first {len(shown)} of {len(names)} images (report.explorer_images, lds report --explorer-images).")
        note = " ".join(notes) or None
        explorers.append(Explorer(dataset, model, graphs, relative(layers_figure) if layers_figure else None,
                                  [(graph, relative(path)) for graph, path in layer_files], entries, note))
    return explorers
