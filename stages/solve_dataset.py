"""`lds solve-dataset`: one X per image, solved jointly over every image of a dataset (METHOD.md dataset mode).

All shards are solved together; the result is written as one artifact per input shard (stage
``solve-dataset``, items laid out as `lds solve` lays them out), so `lds decode`, `lds cluster` and
`lds evaluate` read each shard's artifact as they read a `lds solve` artifact. Training state is checkpointed after every
epoch to ``<store>/solve-dataset/<key>.checkpoint.pt`` (key: of all inputs and parameters); a killed
run resumes from it, and it is removed once every shard's artifact is published.
"""

from __future__ import annotations

import io
import sys
from dataclasses import asdict
from functools import cache
from pathlib import Path

import click
import numpy as np

from pipeline.consumers import GRAPH_ARRAYS
from pipeline.errors import LdsError
from pipeline.hashing import artifact_key
from pipeline.store import ArraySpec, ArtifactRef, Store
from stages.common import check_extract_arrays, log, provenance, read_manifest, run_stage, store_option
from stages.versions import STAGE_VERSIONS

STAGE = "solve-dataset"


def layer_grid(array) -> tuple[int, int]:
    """The token grid of a stored q/k/v array: (head, y, x, dim), (timestep, head, y, x, dim), or heads
    already concatenated (y, x, dim)."""
    return tuple(array.shape[-3:-1])


def read_operands(image, layers: list[str], graph: str, resolution: int, item: str, pick: np.random.Generator) -> dict:
    """The graph operands (heads concatenated) of one image's chosen layers, from `lds extract` arrays.
    Where several timesteps are stored (Stable Diffusion), ``pick`` draws one, the same for every layer."""
    from pipeline.dataset_solver import concat_heads, operand_names
    from pipeline.extract import stored_array

    stored = image["layers"]
    missing = [name for name in layers if name not in stored]
    if missing:
        raise LdsError(f"image {item} has no layer {missing[0]}; all shards must come from the same model")
    left_name, right_name = operand_names(graph)
    first = stored[layers[0]][left_name]
    timestep = int(pick.integers(first.shape[0])) if first.ndim == 5 else ...

    def read(name: str, array: str) -> np.ndarray:
        return concat_heads(stored_array(stored[name], array, timestep))

    operands = {}
    for name in layers:
        left = read(name, left_name)
        right = left if right_name == left_name else read(name, right_name)
        if max(left.shape[:2]) > resolution:
            raise LdsError(f"layer {name} of image {item} is {left.shape[0]}x{left.shape[1]}, finer than --resolution {resolution}")
        operands[name] = (left, right)
    return operands


def pick_layers(coarse: list[str], wanted: str | None) -> list[str]:
    """The layers a comma-separated ``--layers`` names (stored names, or indices among ``coarse``, the
    layers at the solver's resolution or coarser); all of ``coarse`` when it names none."""
    if not wanted:
        return coarse
    picked = []
    for name in (part.strip() for part in wanted.split(",") if part.strip()):
        if name in coarse:
            picked.append(name)
        elif name.lstrip("-").isdigit() and -len(coarse) <= int(name) < len(coarse):
            picked.append(coarse[int(name)])
        else:
            raise LdsError(f"layer {name!r} is not among the layers at the solver's resolution or coarser: {', '.join(coarse)}")
    return list(dict.fromkeys(picked))


def save_checkpoint(store: Store, state: dict, name: str) -> None:
    """Write the solver state into the store, whole or not at all."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_file(name, buffer.getvalue())


def load_checkpoint(store: Store, name: str) -> dict | None:
    """The solver state saved under ``name``, or None when there is none."""
    import torch

    data = store.read_file(name)
    return None if data is None else torch.load(io.BytesIO(data), weights_only=True)


@click.command("solve-dataset")
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Extract manifests, one per shard; their order fixes the image order.")
@click.option("--graph", type=click.Choice(["vv", "qk"]), default="vv", show_default=True, help="vv: value-value ('what'); qk: normalised query against normalised key ('where').")
@click.option("--channels", type=click.IntRange(2), default=100, show_default=True, help="Channels C of X per image.")
@click.option("--resolution", type=click.IntRange(1), default=32, show_default=True, help="X is C x R x R; layers finer than R x R are skipped.")
@click.option("--batch-size", type=click.IntRange(1), default=40, show_default=True, help="Images per batch (per kNN graph).")
@click.option("--iterations", type=click.IntRange(1), default=5, show_default=True, help="AdamW steps per batch.")
@click.option("--epochs", type=click.IntRange(1), default=100, show_default=True, help="Passes over the dataset.")
@click.option("--partitions", type=click.IntRange(1), default=2, show_default=True, help="Fixed shuffles of the images into batches, cycled over the epochs; each batch's graphs are built once and kept in memory.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-2, show_default=True)
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=0.99, show_default=True, help="Decay of the moving average of X, one update per batch.")
@click.option("--layers", "layer_names", default=None, help="Comma-separated layer names or indices among those at --resolution or coarser (default: all).")
@click.option("--intra", type=click.IntRange(0), default=50, show_default=True, help="Neighbours per token in its own image.")
@click.option("--inter", type=click.IntRange(0), default=50, show_default=True, help="Neighbours per token in the batch's other images.")
@click.option("--threshold", type=float, default=0.1, show_default=True, help="Similarities at or below it are dropped.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu, cuda, cuda:N.")
@store_option
@click.option("--manifest", "manifests", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="One per --input, in the same order: that shard's solve manifest.")
def solve_dataset(input_manifests, graph, channels, resolution, batch_size, iterations, epochs, partitions, lr, ema,
                  layer_names, intra, inter, threshold, seed, device, store_root, manifests):
    """Solve for one X per image over all shards at once, on sparse kNN graphs across each batch of images."""
    from pipeline.dataset_solver import (
        DatasetSolver, DatasetSolverParams, coarse_layers, dataset_orthogonalise, operand_names,
    )
    from pipeline.solver import resolve_device

    store = Store(store_root)
    sources = [read_manifest(path, "extract") for path in input_manifests]
    if manifests and len(manifests) != len(sources):
        raise LdsError(f"give one --manifest per --input ({len(sources)} inputs, {len(manifests)} manifests)")
    for source in sources:
        check_extract_arrays(store, source, GRAPH_ARRAYS[graph], f"lds solve-dataset --graph {graph}")
    groups = [store.open(source)["items"] for source in sources]
    shard_items = [list(store.attrs(source)["items"]) for source in sources]
    items = [item for shard in shard_items for item in shard]
    if not items:
        raise LdsError("the inputs hold no images")
    if len(set(items)) < len(items):
        raise LdsError("the same image name appears in more than one input; pass each shard once")
    model = provenance(store, sources[0])
    if any(provenance(store, source) != model for source in sources[1:]):
        raise LdsError("the inputs come from different models; solve each model's shards separately")
    device = resolve_device(device)

    settings = DatasetSolverParams(graph=graph, channels=channels, resolution=resolution, batch_size=batch_size,
                                   iterations=iterations, epochs=epochs, partitions=partitions, lr=lr, ema=ema, intra=intra, inter=inter,
                                   threshold=threshold, seed=seed)
    first = groups[0][items[0]]["layers"]
    grids = {name: layer_grid(group[operand_names(graph)[0]]) for name, group in sorted(first.groups())}
    coarse = coarse_layers(grids, resolution)
    if not coarse:
        coarsest = min(grids.values(), key=lambda g: g[0] * g[1]) if grids else None
        raise LdsError(f"extract/{sources[0].key} has no attention layer at {resolution}x{resolution} or coarser "
                       f"(coarsest: {coarsest}); preprocess to a smaller size or raise --resolution")
    layers = pick_layers(coarse, layer_names)

    params = {**asdict(settings), "layers": layers}
    joint = ArtifactRef(STAGE, artifact_key(STAGE, STAGE_VERSIONS[STAGE], params, [s.key for s in sources]))
    checkpoint = f"{STAGE}/{joint.key}.checkpoint.pt"
    location = [(groups[shard], item) for shard, names in enumerate(shard_items) for item in names]
    index = {item: i for i, item in enumerate(items)}

    def load_batch(rows: list[int], draw: int) -> list[dict]:
        return [
            read_operands(location[r][0][location[r][1]], layers, graph, resolution, location[r][1],
                          np.random.default_rng([seed, draw, r]))
            for r in rows
        ]

    @cache
    def solved() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        solver = DatasetSolver(len(items), settings, device)
        with store.lock(joint):
            state = load_checkpoint(store, checkpoint)
            if state is not None:
                solver.load_state_dict(state)
                log(f"{STAGE}: resuming at epoch {solver.epoch} of {epochs} from {store.root}/{checkpoint}")
            solver.train(load_batch, lambda s: save_checkpoint(store, s.state_dict(), checkpoint), sys.stderr.isatty())
        x = solver.solution()
        return x, dataset_orthogonalise(x), np.array(solver.losses, dtype=np.float32)

    def compute(item: str):
        x, x_ortho, _ = solved()
        i = index[item]
        arrays = {
            "X": ArraySpec(x[i], ("channel", "y", "x"), {"description": "pseudo-eigenvectors X (softmax over channels), EMA of the dataset-level solver"}),
            "X_ortho": ArraySpec(x_ortho[i], ("component", "y", "x"), {"description": "X re-orthogonalised by one SVD over the whole dataset (U S), decreasing order"}),
        }
        return arrays, {"layers": layers}, {}

    def trained_attrs() -> dict:
        """The artifact's attributes, after the joint training: it runs once, before any item, and only
        when a shard is to be made (a failure stops the stage instead of failing every item)."""
        solved()
        return model

    def finish(writer):
        writer.write_root({"losses": ArraySpec(solved()[2], ("epoch", "batch"), {"description": "loss at the last iteration of each batch"})})
        return {"dataset_inputs": [s.as_dict() for s in sources], "dataset_images": len(items)}

    for source, names, manifest in zip(sources, shard_items, manifests or [None] * len(sources)):
        run_stage(store, STAGE, params, [joint.key, source.key], [source], names, compute, trained_attrs, manifest, finish)
    store.delete_file(checkpoint)
