"""`lds solve-dataset`: one X per image, solved jointly over every image of a dataset (METHOD.md dataset mode).

All shards are solved together; the result is written as one artifact per input shard (stage
``solve-dataset``, items laid out as `lds solve` lays them out), so `lds decode`, `lds cluster` and
`lds evaluate` read each shard's artifact as they read a `lds solve` artifact. Training state is checkpointed after every
epoch to ``<store>/solve-dataset/<key>.checkpoint.pt`` (key: of all inputs and parameters); a killed
run resumes from it, and it is removed once every shard's artifact is published.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import click

from pipeline.errors import LdsError
from pipeline.extract.consumers import GRAPH_ARRAYS
from pipeline.solve.dataset import dataset_layers, load_checkpoint, save_checkpoint, solve_jointly
from pipeline.solve.params import DatasetSolverParams
from pipeline.store import ArtifactRef, Store
from pipeline.store.hashing import artifact_key
from stages.common import check_extract_arrays, log, provenance, read_manifest, run_stage, store_option
from stages.options import click_options, params_from
from stages.versions import STAGE_VERSIONS

STAGE = "solve-dataset"


def open_shards(store: Store, sources: list[ArtifactRef], graph: str) -> tuple[list[tuple[object, str]], list[list[str]], dict]:
    """The extract shards' images as (the shard's items group, item name) in input order, each shard's
    names, and the model's provenance; refused when the shards cannot be solved together."""
    for source in sources:
        check_extract_arrays(store, source, GRAPH_ARRAYS[graph], f"lds solve-dataset --graph {graph}")
    shard_items = [list(store.attrs(source)["items"]) for source in sources]
    images = [(store.open(source)["items"], names) for source, names in zip(sources, shard_items)]
    images = [(group, item) for group, names in images for item in names]
    if not images:
        raise LdsError("the inputs hold no images")
    if len({item for _, item in images}) < len(images):
        raise LdsError("the same image name appears in more than one input; pass each shard once")
    model = provenance(store, sources[0])
    if any(provenance(store, source) != model for source in sources[1:]):
        raise LdsError("the inputs come from different models; solve each model's shards separately")
    return images, shard_items, model


@click.command("solve-dataset")
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Extract manifests, one per shard; their order fixes the image order.")
@click_options(DatasetSolverParams)
@store_option
@click.option("--manifest", "manifests", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="One per --input, in the same order: that shard's solve manifest.")
def solve_dataset(input_manifests, store_root, manifests, **settings):
    """Solve for one X per image over all shards at once, on sparse kNN graphs across each batch of images."""
    from pipeline.solve.per_image import resolve_device

    params, store = params_from(DatasetSolverParams, settings), Store(store_root)
    sources = [read_manifest(path, "extract") for path in input_manifests]
    if manifests and len(manifests) != len(sources):
        raise LdsError(f"give one --manifest per --input ({len(sources)} inputs, {len(manifests)} manifests)")
    images, shard_items, model = open_shards(store, sources, params.graph)
    device = resolve_device(params.device)
    layers = dataset_layers(images[0][0][images[0][1]], params, f"extract/{sources[0].key}")
    run = {**params.solver_settings(), "layers": layers}
    joint = ArtifactRef(STAGE, artifact_key(STAGE, STAGE_VERSIONS[STAGE], run, [s.key for s in sources]))
    checkpoint, index = f"{STAGE}/{joint.key}.checkpoint.pt", {item: i for i, (_, item) in enumerate(images)}

    @cache
    def solved():
        with store.lock(joint):
            state = load_checkpoint(store, checkpoint)
            if state is not None:
                log(f"{STAGE}: resuming at epoch {state['epoch']} of {params.epochs} from {store.root}/{checkpoint}")
            return solve_jointly(images, layers, params, device, state, lambda s: save_checkpoint(store, s.state_dict(), checkpoint), sys.stderr.isatty())

    def trained_attrs() -> dict:  # the joint training runs once, before the first item of any shard to be made
        return (solved(), model)[1]

    def finish(writer):
        writer.write_root(solved().root_arrays())
        return {"dataset_inputs": [s.as_dict() for s in sources], "dataset_images": len(images)}

    for source, names, manifest in zip(sources, shard_items, manifests or [None] * len(sources)):
        run_stage(store, STAGE, run, [joint.key, source.key], [source], names,
                  lambda item: (solved().item_arrays(index[item]), {"layers": layers}, {}), trained_attrs, manifest, finish)
    store.delete_file(checkpoint)
