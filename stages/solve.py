"""`lds solve`: pseudo-eigenvectors X and X_ortho shared by every attention graph of an image."""

from __future__ import annotations

import click

from pipeline.solver_params import SOLVERS, SolverParams
from pipeline.store import ArraySpec, Store
from stages.common import input_option, manifest_option, provenance, read_manifest, run_stage, store_option


def read_layers(item_group):
    """The LayerAttention list stored for one image by `lds extract`."""
    from pipeline.extract import LayerAttention

    layers = item_group["layers"]
    return [
        LayerAttention(name, group["q"][...], group["k"][...], group["v"][...], group.attrs["scale"])
        for name, group in sorted(layers.groups())
    ]


@click.command()
@input_option
@click.option("--solver", type=click.Choice(SOLVERS), default="adam", show_default=True, help="adam: the paper's optimisation; exact: eigenvectors of the summed graphs.")
@click.option("--channels", type=click.IntRange(2), default=15, show_default=True, help="Number of eigenvectors m.")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True, help="Adam steps.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=False, help="A progress bar over solver steps.")
@store_option
@manifest_option
def solve(input_manifest, solver, channels, steps, lr, seed, progress, store_root, manifest):
    """Solve for X on the key-query graphs of every head of every layer, per image."""
    store = Store(store_root)
    source = read_manifest(input_manifest)
    params = {"solver": solver, "channels": channels, "seed": seed}
    if solver == "adam":
        params |= {"steps": steps, "lr": lr, "weight_eig": 2.0, "weight_ortho": 2.0}
    settings = SolverParams(channels=channels, steps=steps, lr=lr, seed=seed)
    images = store.open(source)["items"]

    def compute(item: str):
        from pipeline.solver import key_query_graphs, solve_adam, solve_exact

        graphs = key_query_graphs(read_layers(images[item]))
        result = solve_adam(graphs, settings, progress) if solver == "adam" else solve_exact(graphs, settings)
        arrays = {
            "X": ArraySpec(result.x, ("channel", "y", "x"), {"description": "pseudo-eigenvectors X (softmax over channels)"}),
            "X_ortho": ArraySpec(result.x_ortho, ("component", "y", "x"), {"description": "X re-orthogonalised by SVD (U S), decreasing order"}),
            "eigenvalues": ArraySpec(result.eigenvalues, ("graph", "channel"), {"description": "diag(Zᵀ A Z) per graph"}),
            "orthogonality": ArraySpec(result.orthogonality, ("graph",), {"description": "mean squared off-diagonal of Zᵀ Z"}),
            "losses": ArraySpec(result.losses, ("step",), {"description": "loss per Adam step"}),
        }
        return arrays, {"graphs": result.graph_names}, {}

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
