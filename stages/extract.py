"""`lds extract`: queries, keys and values of every attention layer, per image."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import click

from pipeline.errors import LdsError
from pipeline.extract.stage import ExtractParams, artifact_params, extract_image, forward_precision
from pipeline.models import get_spec
from pipeline.store import Store
from stages.common import input_option, log, manifest_option, read_manifest, run_stage, store_option
from stages.options import click_options, params_from


@click.command()
@input_option
@click.option("--model", "model_name", required=True, help="A registered model (see `lds models`), timm:<name>, hf:<repo_id> or diffusers:<repo_id>.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Local weights: a state dict (.safetensors / .pth), a save_pretrained folder (transformers; diffusers layout for Stable Diffusion), or the .onnx of dinov2-s14-imgfocus.")
@click_options(ExtractParams)
@store_option
@manifest_option
def extract(input_manifest, model_name, weights, store_root, manifest, **settings):
    """Store Q, K, V (those --arrays names) (head, y, x, dim) of every attention layer of MODEL for each
    image; for Stable Diffusion (timestep, head, y, x, dim) of every UNet self-attention layer. The
    device is recorded per image, not in the artifact key: CPU and GPU give the same arrays up to float
    error."""
    from pipeline.solve.per_image import resolve_device

    params = params_from(ExtractParams, settings)
    on = resolve_device(params.device)  # a missing GPU stops the stage before any work
    if params.precision == "bfloat16" and not native_bfloat16(on):
        log(f"extract: warning: {on} has no native bfloat16 (a CPU without amx_bf16 or avx512_bf16 in /proc/cpuinfo, a GPU "
            "before Ampere), so --precision bfloat16 is likely slower here than float32")
    store, source, spec = Store(store_root), read_manifest(input_manifest, "preprocess"), get_spec(model_name)
    if weights is not None and not weights.exists():
        raise LdsError(f"weights {weights} for model {model_name} do not exist; give a file or folder that does")
    images = store.open(source)["items"]

    @cache
    def model():
        from pipeline.models.build import build_model

        return build_model(spec, weights, params.seed, cache_dir=store.local_folder("weights")).to(on)

    def loaded_provenance() -> dict:
        """The artifact's model attributes, once the model is loaded: a model that cannot be built stops
        the stage before any image instead of failing each one."""
        model()
        return spec.provenance() | ({"weights": str(weights)} if weights else {})

    with forward_precision(params, on):  # one autocast for every image: the weights cast once
        run_stage(store, "extract", artifact_params(params, spec, weights), input_keys=[source.key], inputs=[source],
                  items=list(store.attrs(source)["items"]), attrs=loaded_provenance, manifest=manifest,
                  compute_item=lambda item: extract_image(model(), images[item]["rgb"][...], spec, params, item, on))


def native_bfloat16(device: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ``device`` computes bfloat16 natively: a GPU that torch says supports it, a CPU with AMX
    or AVX-512 BF16; True where it cannot be told."""
    if device != "cpu":
        import torch

        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = cpuinfo.read_text().split()
    except OSError:
        return True
    return "amx_bf16" in flags or "avx512_bf16" in flags
