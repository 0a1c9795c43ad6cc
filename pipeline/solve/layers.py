"""Which layers and heads carry what: each graph's agreement with the joint eigenvectors (its stored
diag(Zᵀ A Z)), and how well each layer's own spectral embedding encodes position (X-Y R²)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np

from pipeline.extract.core import LayerAttention
from pipeline.solve.graphs import GraphCache, select, stored_name
from pipeline.evaluate.metrics import xy_regression
from pipeline.solve.params import GraphOptions, SolverParams


def layer_head(graph: str) -> tuple[str, str]:
    """A graph's name as the solver stores it -> (layer, head): 'block03/head2' -> ('block03', 'head2');
    a Stable Diffusion attention set's '@t<timestep>' is dropped, so its timesteps average together."""
    layer, _, head = graph.rpartition("/")
    return stored_name(layer), head


def agreement(graphs: list[str], eigenvalues: np.ndarray) -> dict[tuple[str, str], float]:
    """Per (layer, head): diag(Zᵀ A Z) of ``eigenvalues`` (graph, channel) averaged over the channels (and
    over the timesteps of a layer): 1 when every joint eigenvector is one of that graph's, lower the less
    the graph agrees with them."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for graph, row in zip(graphs, np.asarray(eigenvalues, dtype=np.float64)):
        values[layer_head(graph)].append(float(row.mean()))
    return {key: float(np.mean(row)) for key, row in values.items()}


def mean_over_images(tables: list[dict]) -> dict:
    """The mean of each key over the per-image tables that have it (in the order the keys first appear)."""
    values: dict = defaultdict(list)
    for table in tables:
        for key, value in table.items():
            values[key].append(value)
    return {key: float(np.mean(row)) for key, row in values.items()}


EMBEDDING_TOL = 1e-6  # a layer's own eigenvectors: 30% fewer products than converged, its X-Y R² within 3e-4


def single_layer_embedding(layer: LayerAttention, options: GraphOptions, channels: int, device: str = "cpu",
                           cache: GraphCache | None = None) -> np.ndarray:
    """The top eigenvectors (component, y, x) of one layer's graphs alone (every head summed and
    symmetrised, as the exact solver does for all layers, from ``cache`` if given): the layer's own
    spectral embedding."""
    from pipeline.solve.per_image import ExactOperator, solve_exact

    tokens = layer.grid[0] * layer.grid[1]
    operator = ExactOperator.from_layers([layer], GraphOptions(options.kind, options.variant), device, cache=cache)
    u, _ = solve_exact(operator, SolverParams(channels=min(channels, tokens - 1)), EMBEDDING_TOL)
    return u


def layer_xy_r2(layers: list[LayerAttention], options: GraphOptions, channels: int, device: str = "cpu",
                cache: GraphCache | None = None) -> dict[str, float]:
    """X-Y regression R² (``xy_regression``) of each selected layer's own spectral embedding, by stored
    layer name: the layers whose graphs carry position score high."""
    return {stored_name(layer.name): xy_regression(single_layer_embedding(layer, options, channels, device, cache))["r2"]
            for layer in select(layers, options)}


LAYER_FIELDS = ("graph", "layer", "head", "agreement", "layer_xy_r2")


def layers_csv(graph: str, profile: dict[str, list]) -> str:
    """One row per layer and head: the run's graph kind, the head's agreement with the joint
    eigenvectors and its layer's own X-Y R² (``profile`` as lds evaluate stores it)."""
    position = dict(profile["xy_r2"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LAYER_FIELDS)
    for layer, head, value in profile["agreement"]:
        writer.writerow([graph, layer, head, f"{value:.6f}", f"{position[layer]:.6f}" if layer in position else ""])
    return buffer.getvalue()


def read_layers_csv(text: str) -> list[dict[str, str | float | None]]:
    """The rows of ``layers_csv``, numbers parsed (None where empty)."""
    return [{**row, **{key: float(row[key]) if row[key] else None for key in ("agreement", "layer_xy_r2")}}
            for row in csv.DictReader(io.StringIO(text))]
