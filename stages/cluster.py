"""`lds cluster`: one K-Means over the tokens of every image of a dataset (all shards).

On `lds solve-dataset` artifacts it clusters the first K components of their X_ortho (U S of one SVD
over the whole dataset, METHOD.md section 5), so a cluster means the same thing in every image: the
paper's dataset-level semantic segmentation. On per-image solves (`lds solve`, `lds baseline`) each
image's channels mean something else, so it projects X on the dataset's leading singular vectors and
clusters that; evaluate and report score it under its own name, "K-Means across per-image solves",
never as the paper's semantic segmentation. X is read lazily from the store as dask arrays; the
computations run on a dask.distributed cluster or local threads (pipeline.decode.dataset_kmeans)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.decode.dataset_kmeans import ClusterParams, DatasetClustering
from pipeline.errors import LdsError
from pipeline.store import ArtifactRef, Store
from stages.common import dask_scheduler_option, log, manifest_option, provenance, read_manifest, run_stage, store_option, upstream
from stages.options import click_options, params_from


def dataset_level_inputs(sources: list[ArtifactRef]) -> bool:
    """True when the inputs are `lds solve-dataset` artifacts (one basis for the whole dataset), False when
    they are per-image solves; a mix is an error."""
    dataset_level = {source.stage == "solve-dataset" for source in sources}
    if len(dataset_level) > 1:
        raise LdsError("lds cluster takes the shards of one solver: all `lds solve-dataset` manifests, or all per-image ones")
    return dataset_level.pop()


def shard_groups(store: Store, sources: list[ArtifactRef]) -> dict[str, tuple]:
    """Every image of the solve artifacts ``sources`` -> (the items of its solve artifact, of its preprocess artifact)."""
    groups, count = {}, 0
    for ref in sources:
        solved, images = store.open(ref)["items"], store.open(upstream(store, ref, "preprocess"))["items"]
        for item in store.attrs(ref)["items"]:
            groups[item], count = (solved, images), count + 1
    if len(groups) < count:
        raise LdsError("the solve manifests given to lds cluster share images; give each shard once")
    return groups


@click.command()
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Solve manifests (one per shard): all of `lds solve-dataset`, or all per-image.")
@click_options(ClusterParams)
@dask_scheduler_option
@store_option
@manifest_option
def cluster(input_manifests, dask_scheduler, store_root, manifest, **settings):
    """Fit K-Means on every token of the dataset (started from a seeded sample, then Lloyd over the
    dataset) on the leading components of X_ortho (solve-dataset) or of the dataset's SVD of X (per-image
    solves), and store each image's cluster map (tokens and pixels)."""
    import dask.array as da

    from pipeline.dask_compute import dask_scheduler as scheduler

    store = Store(store_root)
    sources = [read_manifest(path, "solve") for path in input_manifests]
    dataset_level = dataset_level_inputs(sources)
    groups = shard_groups(store, sources)
    if not dataset_level:
        log("cluster: per-image solves: their channels mean different things in every image, so these clusters are scored as "
            "'K-Means across per-image solves', not the paper's dataset level (solve.level: dataset)")
    items = list(groups)

    def features(item: str):  # read lazily
        return da.from_zarr(groups[item][0][item]["X_ortho" if dataset_level else "X"])

    work = DatasetClustering(params_from(ClusterParams, settings), features, items, dataset_level, groups[items[0]][0][items[0]]["X"].shape[0])

    def compute(item: str):
        return work.image(item, groups[item][1][item]["rgb"].shape[:2]), {}, {}

    with scheduler(dask_scheduler):
        run_stage(store, "cluster", work.settings(), [s.key for s in sources], sources, items, compute,
                  lambda: provenance(store, sources[0]) | work.fit(), manifest, lambda writer: writer.write_root(work.root_arrays()))
