"""`lds baseline`: TokenCut / MaskCut on ONE affinity of one attention layer, per image, as an artifact
that stands in for a solve artifact (`lds decode` and `lds evaluate` read it unchanged)."""

from __future__ import annotations

from dataclasses import asdict

import click

from pipeline.baselines import (
    AFFINITIES, DEFAULT_EIGENVECTORS, DEFAULT_MASKS, DEFAULT_TAU, METHODS, BaselineParams, degenerate_warning,
)
from pipeline.consumers import BASELINE_ARRAYS
from pipeline.solver_params import GraphOptions
from pipeline.store import ArraySpec, Store
from stages.common import (
    check_extract_arrays, input_option, manifest_option, provenance, read_manifest, run_stage, store_option,
)


@click.command()
@input_option
@click.option("--method", type=click.Choice(METHODS), default="tokencut", show_default=True, help="tokencut: one normalised cut, one foreground mask; maskcut: N cuts, the found tokens masked out after each.")
@click.option("--affinity", type=click.Choice(AFFINITIES), default="attention", show_default=True, help="attention: the layer's key-query attention, symmetrised, mean over heads; features: cosine similarity of the layer's keys, binarised at --tau.")
@click.option("--layer", default="-2", show_default=True, help="The attention layer: a name (block10) or an index (-1: the last; -2, the default, measured best on DINOv2 photos).")
@click.option("--eigenvectors", type=click.IntRange(1), default=None, help="m, eigenvectors stored as X  [default: tokencut 8, maskcut 15].")
@click.option("--masks", type=click.IntRange(1), default=None, help="MaskCut's N, masks per image  [default: 3; tokencut: 1].")
@click.option("--tau", type=float, default=None, help="Binarisation threshold of the features affinity  [default: tokencut 0.2, maskcut 0.15].")
@click.option("--centre/--no-centre", default=True, show_default=True, help="Features affinity: subtract the image's mean key before the cosine similarity (DINOv2's keys are all alike without it).")
@click.option("--artifacts", type=float, default=5.0, show_default=True, help="Tokens whose key norm has a robust z-score above this leave the graph and take their nearest kept neighbour's values (inf: keep all).")
@store_option
@manifest_option
def baseline(input_manifest, method, affinity, layer, eigenvectors, masks, tau, centre, artifacts, store_root, manifest):
    """Normalised-cut eigenvectors (as X and X_ortho) and TokenCut / MaskCut masks (as proposals) of one
    layer's affinity graph, per image."""
    if method == "tokencut" and masks not in (None, 1):
        raise click.UsageError("--masks is MaskCut's N; tokencut makes one mask")
    settings = BaselineParams(
        method, affinity, eigenvectors or DEFAULT_EIGENVECTORS[method], masks or DEFAULT_MASKS[method],
        DEFAULT_TAU[method] if tau is None else tau, centre, artifacts,
    )
    params = {"layer": layer, **asdict(settings)}
    store = Store(store_root)
    source = read_manifest(input_manifest, "extract")
    check_extract_arrays(store, source, BASELINE_ARRAYS[affinity], f"lds baseline --affinity {affinity}")
    images = store.open(source)["items"]

    def compute(item: str):
        from pipeline.baselines import run_baseline
        from pipeline.graphs import select
        from stages.solve import read_layer_sets

        layers = read_layer_sets(images[item])[0]  # Stable Diffusion: the first stored timestep
        (chosen,) = select(layers, GraphOptions(layers=(layer,)))
        result = run_baseline(chosen, settings)
        chunks = (max(len(result.masks), 1), *result.masks.shape[1:])
        arrays = {
            "X": ArraySpec(result.x, ("channel", "y", "x"), {"description": f"normalised-cut eigenvectors of {chosen.name}'s {affinity} affinity, smallest eigenvalue first (the constant one left out)"}),
            "X_ortho": ArraySpec(result.x, ("component", "y", "x"), {"description": "the same eigenvectors (already D-orthonormal)"}),
            "eigenvalues": ArraySpec(result.eigenvalues, ("channel",), {"description": "eigenvalues λ of (D - W) x = λ D x"}),
            "proposals": ArraySpec(result.masks, ("proposal", "y", "x"), {"description": f"{method} masks per token, in the order found"}, chunks=chunks),
            "proposal_scores": ArraySpec(result.scores, ("proposal",), {"description": "1 for the first mask, then 1 - i / N (rank, not confidence)"}, chunks=chunks[:1]),
        }
        item_attrs = {"layer": chosen.name, "grid": list(chosen.grid), "affinity": affinity,
                      "artifact_tokens_dropped": int(result.artifacts.sum())}
        if result.edges_above_tau is not None:
            item_attrs["edges_above_tau"] = round(result.edges_above_tau, 4)
        return arrays, item_attrs, {}

    ref = run_stage(
        store,
        "baseline",
        params,
        input_keys=[source.key],
        inputs=[source],
        items=list(store.attrs(source)["items"]),
        compute_item=compute,
        attrs=provenance(store, source) | {"proposals_from": method},
        manifest=manifest,
    )
    made = store.open(ref)["items"]
    warning = degenerate_warning([made[item].attrs.get("edges_above_tau") for item in store.attrs(ref)["items"]], settings.tau)
    if warning:
        click.echo(f"lds baseline: warning: {warning}", err=True)
