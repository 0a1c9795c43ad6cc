"""`lds solve`'s work on one image: its stored attention layers -> X, X_ortho, U and the measures of the
solution, and each layer's own X-Y R² (which layers carry position)."""

from __future__ import annotations

import numpy as np

from pipeline.extract.consumers import ARRAYS
from pipeline.extract.core import LayerAttention, stored_array
from pipeline.solve.graphs import GraphCache, Workspace, timestep_name
from pipeline.solve.layers import layer_xy_r2
from pipeline.solve.params import SolverParams
from pipeline.solve.per_image import AttentionBuffer, ExactOperator, exact_solution, solve_adam, solve_exact
from pipeline.store import ArraySpec, read_group


def read_layer_sets(item_group) -> list[list[LayerAttention]]:
    """The stored layers of one image (an extract item group), as one list of LayerAttention per attention
    set; its arrays read all at once (``read_group``).

    ViTs store (head, y, x, dim) arrays: one set. Stable Diffusion stores (timestep, head, y, x, dim):
    one set per timestep, its layers named ``<layer>@t<timestep>``.
    """
    stored, group_attrs = read_group(item_group["layers"])
    names = sorted(group_attrs)
    by_layer: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    for path, array in stored.items():  # 'block00/q' -> by_layer['block00']['q']
        layer, _, part = path.partition("/")
        if part:
            by_layer[layer][part] = array
    arrays = {name: tuple(stored_array(found, part) if part in found else None for part in ARRAYS) for name, found in by_layer.items()}
    scales = {name: group_attrs[name]["scale"] for name in names}
    first = LayerAttention("", *next(iter(arrays.values())), 1.0)
    if len(first.shape) == 4:
        return [[LayerAttention(name, *qkv, scales[name]) for name, qkv in arrays.items()]]
    timesteps = group_attrs[names[0]].get("timesteps", list(range(first.shape[0])))
    return [
        [LayerAttention(timestep_name(name, t), *(None if a is None else a[i] for a in qkv), scales[name]) for name, qkv in arrays.items()]
        for i, t in enumerate(timesteps)
    ]


def solve_image(layer_sets: list[list[LayerAttention]], params: SolverParams, device: str = "cpu",
                progress: bool = False, workspace: Workspace | None = None) -> tuple[dict, dict]:
    """Solve for X on the graphs of every selected head of every layer of one image (``layer_sets``: one
    list of layers per attention set, ``read_layer_sets``) -> (arrays, attributes) as `lds solve` stores
    them. ``device``: resolved (cpu, cuda, cuda:N); ``workspace``: memory for the graphs, reused when the
    same one is passed for each image in turn."""
    every_layer = [layer for layers in layer_sets for layer in layers]
    options = params.graphs
    # with diagnostics, each graph is built once for the operator, its measure and the layers' own; without,
    # the exact solver builds each into the same memory in turn and measures nothing (half the time on a CPU)
    cache = GraphCache(options, device, workspace=workspace) if params.layer_diagnostics else None
    u = None
    if params.solver == "exact" or params.init == "exact":
        u, _ = solve_exact(ExactOperator.from_layers(every_layer, options, device, cache=cache, workspace=workspace), params)
    if params.solver == "exact":
        result = exact_solution(u, every_layer, options, cache, measured=params.layer_diagnostics)
    else:
        result = solve_adam(AttentionBuffer.from_layers(layer_sets, params, device), params, progress, init=u)
    arrays = {
        "X": ArraySpec(result.x, ("channel", "y", "x"), {"description": "pseudo-eigenvectors X (adam: softmax over channels; exact: eigenvectors)"}),
        "X_ortho": ArraySpec(result.x_ortho, ("component", "y", "x"), {"description": "X re-orthogonalised by SVD (U S), decreasing order"}),
        "U": ArraySpec(result.u, ("component", "y", "x"), {"description": "orthonormal eigenvectors U, decreasing order"}),
        "losses": ArraySpec(result.losses, ("step",), {"description": "loss per Adam step (empty for exact)"}),
    }
    if result.eigenvalues is not None:
        arrays["eigenvalues"] = ArraySpec(result.eigenvalues, ("graph", "channel"), {"description": "diag(Zᵀ A Z) per graph (target 1)"})
        arrays["orthogonality"] = ArraySpec(result.orthogonality, ("graph",), {"description": "mean squared off-diagonal of Zᵀ Z (target 0)"})
    attrs = {"graphs": result.graph_names, "device": device, "attention_sets": len(layer_sets)}
    if params.layer_diagnostics:  # each layer's own spectral embedding (its first attention set): which layers carry position
        position = layer_xy_r2(layer_sets[0], options, params.channels, device, cache)
        arrays["layer_xy_r2"] = ArraySpec(np.array(list(position.values())), ("layer",), {"description": "X-Y regression R² of each layer's own top eigenvectors"})
        attrs["layers"] = list(position)
    return arrays, attrs
