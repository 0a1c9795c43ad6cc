"""`lds solve`: pseudo-eigenvectors X and X_ortho shared by every attention graph of an image."""

from __future__ import annotations

from dataclasses import asdict

import click
import numpy as np

from pipeline.solver_params import (
    DEVICES, GRAPH_KINDS, INITS, PARAMETERISATIONS, SOLVERS, STABLE_DIFFUSION_PASSES, VARIANTS, GraphOptions,
    SolverParams, resolve_accumulate,
)
from pipeline.consumers import ARRAYS, GRAPH_ARRAYS
from pipeline.store import ArraySpec, Store
from stages.common import (
    check_extract_arrays, input_option, log, manifest_option, provenance, read_manifest, run_stage, store_option,
)

DEFAULTS = SolverParams()


def read_layer_sets(item_group) -> list:
    """The stored layers of one image, as one list of LayerAttention per attention set.

    ViTs store (head, y, x, dim) arrays: one set. Stable Diffusion stores (timestep, head, y, x, dim):
    one set per timestep, its layers named ``<layer>@t<timestep>``.
    """
    from pipeline.extract import LayerAttention, stored_array
    from pipeline.graphs import timestep_name

    groups = sorted(item_group["layers"].groups())
    arrays = {name: tuple(stored_array(group, part) if part in group else None for part in ARRAYS) for name, group in groups}
    scales = {name: group.attrs["scale"] for name, group in groups}
    first = LayerAttention("", *next(iter(arrays.values())), 1.0)
    if len(first.shape) == 4:
        return [[LayerAttention(name, *qkv, scales[name]) for name, qkv in arrays.items()]]
    timesteps = groups[0][1].attrs.get("timesteps", list(range(first.shape[0])))
    return [
        [LayerAttention(timestep_name(name, t), *(None if a is None else a[i] for a in qkv), scales[name]) for name, qkv in arrays.items()]
        for i, t in enumerate(timesteps)
    ]


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip()) if value else ()


class PassCount(click.ParamType):
    """``auto`` or an integer >= 1 (``--accumulate``)."""

    name = "auto|N"

    def convert(self, value, param, ctx) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) >= 1:
            return int(value)
        self.fail(f"expected auto or an integer >= 1, got {value!r}", param, ctx)


@click.command()
@input_option
@click.option("--solver", type=click.Choice(SOLVERS), default="adam", show_default=True, help="adam: the paper's optimisation; exact: eigenvectors of the summed graphs (fast).")
@click.option("--channels", type=click.IntRange(2), default=DEFAULTS.channels, show_default=True, help="Number of eigenvectors m.")
@click.option("--graph", "kind", type=click.Choice(GRAPH_KINDS), default=DEFAULTS.graphs.kind, show_default=True, help="kq: key-query attention ('where'); vv: value-value cosine similarity ('what').")
@click.option("--variant", type=click.Choice(VARIANTS), default=DEFAULTS.graphs.variant, show_default=True, help="Graph normalisation.")
@click.option("--layers", default=None, help="Comma-separated layer names or indices (default: all).")
@click.option("--heads", default=None, help="Comma-separated head indices (default: all).")
@click.option("--steps", type=click.IntRange(1), default=DEFAULTS.steps, show_default=True, help="Adam steps.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=DEFAULTS.lr, show_default=True, help="Adam learning rate.")
@click.option("--weight-eig", type=click.FloatRange(0), default=DEFAULTS.weight_eig, show_default=True, help="Weight of the eigenvalue term mean|diag(Zᵀ A Z) - 1|.")
@click.option("--weight-ortho", type=click.FloatRange(0), default=DEFAULTS.weight_ortho, show_default=True, help="Weight of the orthogonality term mean(offdiag(Zᵀ Z)²).")
@click.option("--parameterisation", type=click.Choice(PARAMETERISATIONS), default=DEFAULTS.parameterisation, show_default=True, help="convnet: the reference code's conv net over a learned input; free: X's logits optimised directly.")
@click.option("--init", type=click.Choice(INITS), default=DEFAULTS.init, show_default=True, help="exact: warm-start Adam from the exact solver's eigenvectors (free features only).")
@click.option("--accumulate", type=PassCount(), default=DEFAULTS.accumulate, show_default=True, help=f"Passes per Adam step, each drawing an attention set; auto: {STABLE_DIFFUSION_PASSES} when the images have several (Stable Diffusion timesteps), else 1.")
@click.option("--buffer", type=click.IntRange(1), default=DEFAULTS.buffer, show_default=True, help="Attention sets (timesteps) kept in the buffer.")
@click.option("--refresh", type=click.FloatRange(0, 1), default=DEFAULTS.refresh, show_default=True, help="Probability that a pass draws a new attention set, one not in the buffer.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device, show_default=True, help="auto: CUDA when present.")
@click.option("--progress/--no-progress", default=False, help="A progress bar over solver steps.")
@store_option
@manifest_option
def solve(input_manifest, solver, channels, kind, variant, layers, heads, steps, lr, weight_eig, weight_ortho,
          parameterisation, init, accumulate, buffer, refresh, seed, device, progress, store_root, manifest):
    """Solve for X on the attention graphs of every selected head of every layer, per image; also the X-Y
    regression R² of each layer's own top eigenvectors (which layers carry position)."""
    if init == "exact" and parameterisation != "free":
        raise click.UsageError("--init exact warm-starts free features only; use --parameterisation free")
    if heads and not all(h.isdigit() for h in _csv(heads)):
        raise click.BadParameter(f"expected comma-separated integers, got {heads!r}", param_hint="--heads")
    from pipeline.solver import resolve_device

    on = resolve_device(device)
    store = Store(store_root)
    source = read_manifest(input_manifest, "extract")
    check_extract_arrays(store, source, GRAPH_ARRAYS[kind], f"lds solve --graph {kind}")
    images = store.open(source)["items"]
    attention_sets = store.attrs(source)["params"].get("timesteps") or 1  # Stable Diffusion: the pool of timesteps
    options = GraphOptions(kind, variant, _csv(layers), tuple(int(h) for h in _csv(heads)))
    settings = SolverParams(
        channels=channels, steps=steps, lr=lr, weight_eig=weight_eig, weight_ortho=weight_ortho, seed=seed,
        parameterisation=parameterisation, init=init, accumulate=resolve_accumulate(accumulate, attention_sets),
        buffer=buffer, refresh=refresh, device=device, graphs=options,
    )
    params = {"solver": solver, "channels": channels, "graphs": asdict(options)}
    if solver == "adam":  # accumulate as resolved: auto and its value make the same artifact
        params |= {key: value for key, value in asdict(settings).items() if key not in ("device", "graphs")}
        if 1 < attention_sets <= buffer:
            log(f"solve: warning: the extract artifact holds {attention_sets} attention sets (timesteps), not more than "
                f"--buffer {buffer}, so once all are buffered no pass sees a new one; extract with more --timesteps")

    def compute(item: str):
        from pipeline.graphs import GraphCache
        from pipeline.layers import layer_xy_r2
        from pipeline.solver import AttentionBuffer, ExactOperator, exact_solution, solve_adam, solve_exact

        layer_sets = read_layer_sets(images[item])
        every_layer = [layer for layers in layer_sets for layer in layers]
        cache = GraphCache(options, on)  # each graph built once for the operator, its measure and the layers' own
        u = None
        if solver == "exact" or init == "exact":
            u, _ = solve_exact(ExactOperator.from_layers(every_layer, options, on, cache=cache), settings)
        if solver == "exact":
            result = exact_solution(u, every_layer, options, cache)
        else:
            result = solve_adam(AttentionBuffer.from_layers(layer_sets, settings, on), settings, progress, init=u)
        arrays = {
            "X": ArraySpec(result.x, ("channel", "y", "x"), {"description": "pseudo-eigenvectors X (adam: softmax over channels; exact: eigenvectors)"}),
            "X_ortho": ArraySpec(result.x_ortho, ("component", "y", "x"), {"description": "X re-orthogonalised by SVD (U S), decreasing order"}),
            "U": ArraySpec(result.u, ("component", "y", "x"), {"description": "orthonormal eigenvectors U, decreasing order"}),
            "eigenvalues": ArraySpec(result.eigenvalues, ("graph", "channel"), {"description": "diag(Zᵀ A Z) per graph (target 1)"}),
            "orthogonality": ArraySpec(result.orthogonality, ("graph",), {"description": "mean squared off-diagonal of Zᵀ Z (target 0)"}),
            "losses": ArraySpec(result.losses, ("step",), {"description": "loss per Adam step (empty for exact)"}),
        }
        # each layer's own spectral embedding (its first attention set): which layers carry position
        position = layer_xy_r2(layer_sets[0], options, channels, on, cache)
        arrays["layer_xy_r2"] = ArraySpec(np.array(list(position.values())), ("layer",), {"description": "X-Y regression R² of each layer's own top eigenvectors"})
        return arrays, {"graphs": result.graph_names, "layers": list(position), "device": on, "attention_sets": len(layer_sets)}, {}

    run_stage(
        store,
        "solve",
        params,
        input_keys=[source.key],
        inputs=[source],
        items=list(store.attrs(source)["items"]),
        compute_item=compute,
        attrs=provenance(store, source),
        manifest=manifest,
    )
