"""`lds evaluate`: the metrics of a dataset x model over all its shards, stored and written as JSON,
and a contact sheet of its images. The work is pipeline/evaluate/stage.py's; this module opens the store."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import click
import numpy as np

from pipeline.evaluate.stage import (
    EvaluateParams, EvaluationInputs, Shard, cluster_prefix, evaluate_dataset, instance_truth, layers_text, metrics_record,
    run_facts, save_run_contact_sheet, without_failed,
)
from pipeline.errors import LdsError
from pipeline.failures import failed_lineage
from pipeline.store import ArtifactRef, Store
from pipeline.store.maintenance import reachable
from stages.common import (
    dask_scheduler_option, log, manifest_option, provenance, read_manifest, run_stage, store_option, upstream,
    write_json_atomic, write_text_atomic,
)
from pipeline.evaluate.figures import model_caption
from stages.options import click_options, params_from


@click.command()
@click.option("--input", "input_manifests", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=Path), help="Decode manifests (one per shard).")
@click.option("--semantic", "semantic_manifest", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Manifest of `lds cluster` (dataset-level clusters) to score as the semantic segmentation.")
@click.option("--zeroshot", "zeroshot_manifests", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifests of `lds zeroshot` (one per shard) to score as named classes, without matching.")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the metrics as JSON here.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write contact-sheet.png here.")
@click.option("--layers-csv", "layers_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the per-layer agreement (diag(Zᵀ A Z) per layer and head) and single-layer X-Y R² as CSV here (runs of lds solve).")
@click_options(EvaluateParams)
@dask_scheduler_option
@store_option
@manifest_option
def evaluate(input_manifests, semantic_manifest, zeroshot_manifests, metrics_path, figures, layers_path, dask_scheduler, store_root, manifest, **settings):
    """X-Y regression of X_ortho; where labels exist, oracle, per-image matched and dataset-level
    semantic mIoU; where objects exist, class-agnostic COCO AP of the proposals mapped back to the
    original images against the dataset's own annotations (read afresh from the dataset files). Each
    image is scored by a dask task reading the store lazily, and the results are summed by a dask
    reduction. Runs of lds solve also get each layer and head's agreement with the joint eigenvectors
    and each layer's own X-Y R², averaged over the images."""
    from pipeline.dask_compute import dask_scheduler as scheduler

    store = Store(store_root)
    sources = [read_manifest(path, "decode") for path in input_manifests]
    semantic = [read_manifest(semantic_manifest, "cluster")] if semantic_manifest else []
    zeroshot = [read_manifest(path, "zeroshot") for path in zeroshot_manifests]
    inputs = open_inputs(store, sources, semantic, zeroshot)
    truth = instance_truth(inputs)
    if truth.at == "preprocessed":
        log(f"evaluate: instance metrics at {truth.protocol}")
    params = replace(params_from(EvaluateParams, settings), instances_at=truth.at)

    def finish(writer) -> dict:
        evaluation = evaluate_dataset(inputs, params, truth)
        writer.write_root(evaluation.arrays)
        return evaluation.attrs()

    refs = sources + semantic + zeroshot
    with scheduler(dask_scheduler):
        ref = run_stage(store, "evaluate", asdict(params), [r.key for r in refs], refs, [], lambda item: None, provenance(store, sources[0]), manifest, finish)
    log(f"evaluate: {store.attrs(ref)['metrics']['coverage']}")
    write_outputs(store, ref, sources[0], inputs, metrics_path, layers_path, figures)


def open_inputs(store: Store, sources: list[ArtifactRef], semantic: list[ArtifactRef], zeroshot: list[ArtifactRef]) -> EvaluationInputs:
    """The items groups of the decode artifacts ``sources`` and of the solve and preprocess artifacts they
    come from, of `lds cluster`'s artifact (``semantic``, one or none), and the images their lineage left
    out; the zero-shot artifacts' confusion is read when the evaluate artifact is made."""
    preprocessed = [upstream(store, ref, "preprocess") for ref in sources]
    shards = [
        Shard(store.open(ref)["items"], store.open(upstream(store, ref, "solve"))["items"], store.open(pre)["items"], store.attrs(ref)["items"])
        for ref, pre in zip(sources, preprocessed)
    ]
    classes = store.attrs(preprocessed[0]).get("classes")
    # images a stage left out (max_failed): not scored, but counted and named in the metrics
    lineage = reachable(store, sources + semantic + zeroshot)
    failed = failed_lineage([{"stage": ref.stage, "failed": store.attrs(ref).get("failed", {})} for ref in lineage])
    return EvaluationInputs(
        shards=without_failed(shards, failed),
        specs=[store.attrs(pre).get("dataset") for pre in preprocessed],
        classes=classes,
        semantic=store.open(semantic[0])["items"] if semantic else None,
        prefix=cluster_prefix(store.attrs(semantic[0]) if semantic else None),
        failed=failed,
        zeroshot=(lambda: zeroshot_confusion(store, zeroshot, classes)) if zeroshot else (lambda: None),
    )


def write_outputs(store: Store, ref: ArtifactRef, source: ArtifactRef, inputs: EvaluationInputs,
                  metrics_path: Path | None, layers_path: Path | None, figures: Path | None) -> None:
    """metrics.json, layers.csv (removed for a run without one: an older run's must not stand for it) and
    the contact sheet of the evaluate artifact ``ref``, whose first decode input is ``source``."""
    attrs, model_attrs = store.attrs(ref), provenance(store, source)
    solved = upstream(store, source, "solve")
    facts = run_facts(solved.stage, store.attrs(solved)["params"])
    if metrics_path is not None:
        dataset_spec = store.attrs(upstream(store, source, "preprocess")).get("dataset")
        write_json_atomic(metrics_path, metrics_record(model_attrs, facts, attrs["metrics"], dataset_spec, store.path(ref)))
        click.echo(f"metrics: {metrics_path}", err=True)
    text = layers_text(facts, attrs["layers"]) if layers_path is not None else None
    if text is not None:
        write_text_atomic(layers_path, text)
        click.echo(f"per-layer agreement: {layers_path}", err=True)
    elif layers_path is not None:
        layers_path.unlink(missing_ok=True)
    if figures is not None:
        save_run_contact_sheet(figures / "contact-sheet.png", inputs, model_caption(model_attrs), facts)


def zeroshot_confusion(store: Store, refs: list[ArtifactRef], classes: list[str] | None) -> np.ndarray | None:
    """(truth class, predicted class + a last column for names the dataset lacks) over every labelled
    image of the zero-shot artifacts ``refs``; None when no image has labels."""
    from pipeline.evaluate.metrics import confusion_matrix
    from pipeline.decode.zeroshot import to_dataset_labels

    if not classes:
        raise LdsError("zero-shot labels are scored by class name, and this dataset names no classes")
    total = None
    for ref in refs:
        attrs = store.attrs(ref)
        labelled = store.open(ref)["items"]
        images = store.open(upstream(store, ref, "preprocess"))["items"]
        for item in attrs["items"]:
            if "labels" in images[item]:
                predicted = to_dataset_labels(labelled[item]["labels"][...], attrs["classes"], classes)
                part = confusion_matrix(images[item]["labels"][...], predicted, len(classes), len(classes) + 1)
                total = part if total is None else total + part
    return total
