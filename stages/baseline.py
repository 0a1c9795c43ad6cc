"""`lds baseline`: TokenCut / MaskCut on ONE affinity of one attention layer, per image, as an artifact
that stands in for a solve artifact (`lds decode` and `lds evaluate` read it unchanged)."""

from __future__ import annotations

import click

from pipeline.extract.consumers import BASELINE_ARRAYS
from pipeline.solve.baselines import BaselineParams, baseline_image, baseline_settings, degenerate_warning
from pipeline.store import Store
from stages.common import check_extract_arrays, input_option, manifest_option, provenance, read_manifest, run_stage, store_option
from stages.options import click_options, params_from


@click.command()
@input_option
@click_options(BaselineParams)
@store_option
@manifest_option
def baseline(input_manifest, store_root, manifest, **settings):
    """Normalised-cut eigenvectors (as X and X_ortho) and TokenCut / MaskCut masks (as proposals) of one
    layer's affinity graph, per image."""
    params = params_from(BaselineParams, settings)
    if params.method == "tokencut" and params.masks not in (None, 1):
        raise click.UsageError("--masks is MaskCut's N; tokencut makes one mask")
    params = params.resolved()
    store = Store(store_root)
    source = read_manifest(input_manifest, "extract")
    check_extract_arrays(store, source, BASELINE_ARRAYS[params.affinity], f"lds baseline --affinity {params.affinity}")
    images = store.open(source)["items"]

    def compute(item: str):
        from pipeline.solve.stage import read_layer_sets

        return *baseline_image(read_layer_sets(images[item])[0], params), {}  # Stable Diffusion: the first stored timestep

    items = list(store.attrs(source)["items"])
    attrs = provenance(store, source) | {"proposals_from": params.method}
    ref = run_stage(store, "baseline", baseline_settings(params), [source.key], [source], items, compute, attrs, manifest)
    made = store.open(ref)["items"]
    warning = degenerate_warning([made[item].attrs.get("edges_above_tau") for item in store.attrs(ref)["items"]], params.tau)
    if warning:
        click.echo(f"lds baseline: warning: {warning}", err=True)
