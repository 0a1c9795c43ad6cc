"""The `lds` command: a subcommand per stage, plus `inspect`, `models` and `cache`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from pipeline.errors import LdsError
from pipeline.store import ArtifactRef, Store, walk_arrays
from pipeline.store.maintenance import reachable, release, verify
from stages.common import find_manifests, read_manifest, stale_manifests, store_option, write_json_atomic

STARTED = time.time()  # when lds was first imported: this process's start, but for Python's own
# Each stage's command is imported when it is called (or listed), so a stage that needs no torch starts
# without importing it: 0.3 s instead of 1.6 s for each Snakemake job of preprocess, decode, evaluate.
STAGE_COMMANDS = {
    "preprocess": "stages.preprocess:preprocess", "extract": "stages.extract:extract", "solve": "stages.solve:solve",
    "solve-dataset": "stages.solve_dataset:solve_dataset", "baseline": "stages.baseline:baseline", "decode": "stages.decode:decode",
    "zeroshot": "stages.zeroshot:zeroshot", "cluster": "stages.cluster:cluster", "evaluate": "stages.evaluate:evaluate",
    "report": "stages.report:report", "summary": "stages.summary:summary", "bench": "stages.bench:bench",
}


class LdsGroup(click.Group):
    """Turns an LdsError anywhere below into one line on stderr and exit status 1 (click's usage errors
    exit with 2); loads the stage commands of ``STAGE_COMMANDS`` when first asked for."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *STAGE_COMMANDS})

    def get_command(self, ctx, name):
        if name in STAGE_COMMANDS and name not in self.commands:
            import importlib

            module, attribute = STAGE_COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
        except LdsError as error:
            raise click.ClickException(str(error)) from None
        if ctx.invoked_subcommand in STAGE_COMMANDS and ctx.invoked_subcommand != "bench":
            log_usage(ctx.invoked_subcommand)
        return result


def log_usage(command: str) -> None:
    """One line on stderr: the seconds since lds started and the CPU seconds this process spent (every
    thread, its imports and children included; `lds bench workflow` sums them per stage)."""
    import resource

    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(usage.ru_utime + usage.ru_stime for usage in usages)
    wall = time.time() - STARTED
    click.echo(f"lds {command}: done in {wall:.1f} s, {cpu:.1f} core-s", err=True)


@click.group(cls=LdsGroup)
def cli():
    """lds: layer-distributed spectral clustering of the attention inside vision models."""


def resolve_ref(store: Store, target: str) -> ArtifactRef:
    """An artifact named by a manifest file, a path to it, 'stage/key', or a unique key prefix."""
    path = Path(target)
    if path.suffix == ".json" and path.is_file():
        return read_manifest(path)
    if path.name.endswith(".zarr"):
        return ArtifactRef(path.parent.name, path.name[: -len(".zarr")])
    if "/" in target:
        stage, key = target.split("/", 1)
        return ArtifactRef(stage, key)
    matches = [ref for ref in store.artifacts() if ref.key.startswith(target)]
    if len(matches) != 1:
        raise LdsError(f"{target!r} names {len(matches)} artifacts in store {store.root}; give a longer key or stage/key")
    return matches[0]


@cli.command()
@click.argument("target")
@store_option
def inspect(target, store_root):
    """Print an artifact's arrays (shape, dtype, chunks, dims) and attributes."""
    store = Store(store_root)
    ref = resolve_ref(store, target)
    if target.endswith(".zarr"):  # a path to an artifact names its store, too
        store = Store(target.rstrip("/").rsplit("/", 2)[0])
    group = store.open(ref)
    click.echo(f"{ref.stage}/{ref.key}  {store.path(ref)}")
    attrs = dict(group.attrs)
    click.echo(json.dumps({k: v for k, v in attrs.items() if k != "items"}, indent=2, sort_keys=True))
    items = attrs.get("items", [])
    click.echo(f"items: {len(items)} {items[:10]}{' ...' if len(items) > 10 else ''}")
    shown = group["items"][items[0]] if items else group
    click.echo(f"arrays{' of item ' + items[0] if items else ''}:")
    for name, array in walk_arrays(shown):
        dims = ",".join(array.metadata.dimension_names or ())
        click.echo(f"  {name:40s} {str(array.shape):22s} {str(array.dtype):8s} chunks={array.chunks} dims=({dims})")
    if items and "layers" in shown:
        click.echo("layers (q, k, v alike):")
        for layer, layer_group in sorted(shown["layers"].groups()):
            click.echo(f"  {layer:20s} {layer_summary(layer_group)}")


def layer_summary(layer_group) -> str:
    """'resolution=28x28 heads=6 head_dim=64 scale=0.125 shape=(6, 28, 28, 64) dims=(head,y,x,dim) ...'."""
    attrs = dict(layer_group.attrs)
    first = next(array for _, array in sorted(layer_group.arrays()))  # q, k and v (those stored) alike
    text = (
        f"resolution={'x'.join(map(str, attrs.pop('resolution', [])))} heads={attrs.pop('heads', '?')} "
        f"head_dim={attrs.pop('head_dim', '?')} scale={attrs.pop('scale', float('nan')):.4g} "
        f"shape={first.shape} dims=({','.join(first.metadata.dimension_names or ())})"
    )
    return text + "".join(f" {key}={value}" for key, value in sorted(attrs.items()))


@cli.command()
def models():
    """List the registered models."""
    from pipeline.models import REGISTRY

    for spec in REGISTRY.values():
        weights = "pretrained" if spec.pretrained else "random, NOT pretrained"
        origin = spec.timm_name or spec.repo_id or "(built from config)"
        click.echo(f"{spec.name:19s} {spec.family:9s} {origin:44s} {weights:24s} {spec.description}")
    for pattern, what in [
        ("timm:<name>", "any timm VisionTransformer"),
        ("hf:<repo_id>", "a transformers ViTModel, CLIPVisionModel, Dinov2Model or ViTMAEModel"),
        ("diffusers:<repo_id>", "a Stable Diffusion 1.x / 2.x pipeline (UNet self-attention)"),
    ]:
        click.echo(f"{pattern:19s} {what}, pretrained weights from the Hugging Face cache or hub")


@cli.group()
def cache():
    """List, show, verify and garbage-collect the artifact store."""


@cache.command("ls")
@store_option
def cache_ls(store_root):
    """One line per artifact: stage, key, size, items, inputs."""
    store = Store(store_root)
    for ref in store.artifacts():
        attrs = store.attrs(ref)
        inputs = ",".join(f"{i['stage']}/{i['key'][:8]}" for i in attrs.get("inputs", []))
        click.echo(f"{ref.stage:10s} {ref.key}  {store.size(ref) / 1e6:9.2f} MB  {len(attrs.get('items', [])):5d} items  inputs: {inputs or '-'}")
    for ref in store.partials():
        click.echo(f"{ref.stage:10s} {ref.key}  (incomplete: resumes on the next run)")


@cache.command("show")
@click.argument("target")
@store_option
def cache_show(target, store_root):
    """The attributes of one artifact as JSON."""
    store = Store(store_root)
    click.echo(json.dumps(store.attrs(resolve_ref(store, target)), indent=2, sort_keys=True))


@cache.command("verify")
@click.argument("targets", nargs=-1)
@click.option("--repair", is_flag=True, help="Remove every bad artifact, then the manifests under --results that name it, an artifact made from it or one already gone: the next run makes exactly those again.")
@click.option("--results", "results_folders", multiple=True, type=click.Path(path_type=Path), default=("results",), show_default=True, help="Folder searched for manifests (or a manifest) by --repair; repeat for several.")
@store_option
def cache_verify(targets, repair, results_folders, store_root):
    """Check complete markers, items and every chunk's checksum (all artifacts unless TARGETS are given)."""
    store = Store(store_root)
    refs = [resolve_ref(store, t) for t in targets] or store.artifacts()
    bad = []
    for ref in refs:
        problems = verify(store, ref)
        bad += [ref] if problems else []
        click.echo(f"{'BAD' if problems else 'ok '} {ref.stage}/{ref.key}" + "".join(f"\n    {p}" for p in problems))
    if not repair:
        if bad:
            raise LdsError(f"{len(bad)} of {len(refs)} artifacts failed verification; `lds cache verify --repair` removes them and "
                           "the manifests naming them, and the next run makes them again")
        return
    stale = stale_manifests(store, find_manifests(results_folders), set(bad))
    for ref in bad:  # the artifacts first: a manifest left by an interruption names a missing artifact, which reruns its rule
        store.remove(ref)
        click.echo(f"removed {ref.stage}/{ref.key}")
    for path in stale:
        path.unlink()
        click.echo(f"removed {path}")
    click.echo(f"{len(bad)} artifacts and {len(stale)} manifests removed; the next run (`snakemake --cores N`) makes them again")


@cache.command("gc")
@click.argument("manifests", nargs=-1, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@store_option
def cache_gc(manifests, dry_run, store_root):
    """Remove artifacts not reachable from MANIFESTS (JSON files, or folders searched for them)."""
    store = Store(store_root)
    roots = list(find_manifests(manifests).values())
    if not roots:
        raise LdsError("no manifests given or found: refusing to remove every artifact")
    keep = reachable(store, roots)
    doomed = [ref for ref in store.artifacts() if ref not in keep]
    for ref in doomed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {ref.stage}/{ref.key}")
        if not dry_run:
            store.remove(ref)
    click.echo(f"{len(keep)} kept, {len(doomed)} {'to remove' if dry_run else 'removed'}")


@cache.command("release")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--after", "readers", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="Manifest of a stage that reads the artifact (repeat for each); all must be published, made from it.")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write what was released here as JSON (the workflow's marker).")
@store_option
def cache_release(manifest, readers, record, store_root):
    """Delete the arrays of the artifact MANIFEST names (an extract's attention: extract.keep until-consumed)
    once every stage that reads it has published, keeping its metadata for the stages after them; a stage
    that asks for it again makes it again."""
    store = Store(store_root)
    ref = read_manifest(manifest)
    if not store.exists(ref):
        raise LdsError(f"artifact {ref.stage}/{ref.key} named by {manifest} is not in store {store.root}")
    after = [read_manifest(path) for path in readers]
    waiting = [f"{r.stage}/{r.key}" for r in after if not store.exists(r) or ref not in reachable(store, [r])]
    if waiting:
        raise LdsError(f"not releasing {ref.stage}/{ref.key}: {', '.join(waiting)} not published or not made from it")
    items = store.attrs(ref).get("items", [])
    freed = release(store, ref, "used by " + (", ".join(f"{r.stage}/{r.key}" for r in after) or "nothing named"))
    if freed:
        store.journal.record("released", ref, bytes=freed, items=len(items))
    click.echo(f"released {ref.stage}/{ref.key}: {freed / 1e6:.1f} MB freed", err=True)
    if record is not None:
        write_json_atomic(record, {"released": ref.as_dict(), "bytes": freed, "after": [r.as_dict() for r in after]})


@cache.command("prune-journal")
@click.option("--keep", type=click.IntRange(0), default=10, show_default=True, help="Most recent runs to keep.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@store_option
def cache_prune_journal(keep, dry_run, store_root):
    """Delete the journal records (`lds summary`'s input) of all but the KEEP most recent runs."""
    store = Store(store_root)
    runs = store.journal.runs()
    doomed = runs[: max(len(runs) - keep, 0)]
    for run in doomed:
        click.echo(f"{'would remove' if dry_run else 'removed'} journal of run {run}")
        if not dry_run:
            store.journal.remove_run(run)
    click.echo(f"{len(runs) - len(doomed)} runs kept, {len(doomed)} {'to remove' if dry_run else 'removed'}")


def main() -> None:
    cli(prog_name="lds")
