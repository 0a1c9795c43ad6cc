"""`lds solve`: pseudo-eigenvectors X and X_ortho shared by every attention graph of an image."""

from __future__ import annotations

from dataclasses import replace

import click

from pipeline.extract.consumers import GRAPH_ARRAYS
from pipeline.solve.graphs import Workspace
from pipeline.solve.params import SolverParams, resolve_accumulate
from pipeline.solve.stage import read_layer_sets, solve_image
from pipeline.store import Store
from stages.common import check_extract_arrays, input_option, log, manifest_option, provenance, read_manifest, run_stage, store_option
from stages.options import click_options, params_from


@click.command()
@input_option
@click_options(SolverParams)
@click.option("--progress/--no-progress", default=False, help="A progress bar over solver steps.")
@store_option
@manifest_option
def solve(input_manifest, progress, store_root, manifest, **settings):
    """Solve for X on the attention graphs of every selected head of every layer, per image; also the X-Y
    regression R² of each layer's own top eigenvectors (which layers carry position)."""
    params = params_from(SolverParams, settings)
    if params.init == "exact" and params.parameterisation != "free":
        raise click.UsageError("--init exact warm-starts free features only; use --parameterisation free")
    if any(head < 0 for head in params.heads):
        raise click.BadParameter(f"expected comma-separated integers >= 0, got {','.join(map(str, params.heads))}", param_hint="--heads")
    from pipeline.solve.per_image import resolve_device

    on, store, source = resolve_device(params.device), Store(store_root), read_manifest(input_manifest, "extract")
    check_extract_arrays(store, source, GRAPH_ARRAYS[params.kind], f"lds solve --graph {params.kind}")
    attention_sets = store.attrs(source)["params"].get("timesteps") or 1  # Stable Diffusion: the pool of timesteps
    params = replace(params, accumulate=resolve_accumulate(params.accumulate, attention_sets))
    if params.solver == "adam" and 1 < attention_sets <= params.buffer:
        log(f"solve: warning: the extract artifact holds {attention_sets} attention sets (timesteps), not more than "
            f"--buffer {params.buffer}, so once all are buffered no pass sees a new one; extract with more --timesteps")
    images, workspace = store.open(source)["items"], Workspace(on)
    run_stage(store, "solve", params.artifact_params(), input_keys=[source.key], inputs=[source], items=list(store.attrs(source)["items"]),
              compute_item=lambda item: (*solve_image(read_layer_sets(images[item]), params, on, progress, workspace), {}),
              attrs=provenance(store, source), manifest=manifest)
