"""What extract's attention costs to store, and the floor of its time (issue 14). Not run in CI.

On the preprocessed images of a store (a workflow run's `preprocess` artifacts) with `dinov2-s14-imgfocus`
(pretrained DINOv2 ViT-S/14, offline), one thread, each image's Q, K, V extracted in float32, then:

- ``codecs``: float16 Q/K/V under lossless codecs (zarr's default zstd, zstd levels, Blosc zstd / lz4
  with byte or bit shuffle): MB per image, encode and decode MB/s (first ``--codec-images`` images);
- ``types``: float16 with fewer of its 10 mantissa bits kept (rounded), and int8 with a float32 scale per
  channel of each head (`lds extract --dtype int8`): MB per image under Blosc zstd 5 with byte shuffle,
  and the exact solver's X (15 channels, kq and vv graphs) against X from float32: the mean cos² of the
  principal angles between the subspaces (1 = the same), min and mean over the images;
  Also "bfloat16 forward, int8": Q, K, V from the forward under bfloat16 autocast (`lds extract
  --precision bfloat16`), stored as int8, against the same float32 reference;
- ``floor``: seconds per image of one backbone forward without hooks (float32 and under bfloat16
  autocast), and with extract's Q/K/V hooks and the copy to numpy (each image run twice, the second timed).

    python benchmarks/bench_storage.py --store /path/to/store --images 6 --output results/bench/storage.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MANTISSA_BITS = (10, 7, 5, 4, 3)  # float16 keeps 10


def codecs() -> dict:
    from numcodecs import Blosc, Zstd

    found = {"zstd 0 (zarr's default)": Zstd(level=0)}
    found |= {f"zstd {level}": Zstd(level=level) for level in (1, 3, 9, 19)}
    for cname, level in (("zstd", 1), ("zstd", 5), ("zstd", 9), ("lz4", 5)):
        for shuffle, name in ((Blosc.SHUFFLE, "byte"), (Blosc.BITSHUFFLE, "bit")):
            found[f"blosc {cname} {level}, {name} shuffle"] = Blosc(cname, level, shuffle)
    return found


def kept_bits(array: np.ndarray, keep: int) -> np.ndarray:
    """float16 with only ``keep`` of its 10 mantissa bits, rounded to nearest even."""
    half = np.ascontiguousarray(array.astype(np.float16))
    drop = 10 - keep
    if not drop:
        return half
    bits = half.view(np.uint16).astype(np.uint32)
    rounded = ((bits + (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)) >> drop) << drop
    return np.ascontiguousarray(rounded.astype(np.uint16).view(np.float16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a store holding preprocess artifacts (448 px for the workflow's numbers)")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--codec-images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from numcodecs import Blosc
    from scipy.linalg import subspace_angles

    from pipeline.extract.core import LayerAttention, dequantise, extract_attention, image_tensor, quantise
    from pipeline.models import get_spec
    from pipeline.models.build import build_model
    from pipeline.solve.per_image import ExactOperator, solve_exact
    from pipeline.solve.params import GraphOptions, SolverParams
    from pipeline.store import Store

    torch.set_num_threads(args.threads)
    store = Store(args.store)
    spec = get_spec("dinov2-s14-imgfocus")
    model = build_model(spec, None, 0, cache_dir=store.local_folder("weights"))
    images = [(group, item) for ref in store.artifacts() if ref.stage == "preprocess"
              for group in [store.open(ref)["items"]] for item in store.attrs(ref)["items"]][: args.images]
    lossless, shuffled = codecs(), Blosc("zstd", 5, Blosc.SHUFFLE)
    types = {f"float16, {bits} mantissa bits": (lambda bits: lambda a: kept_bits(a, bits))(bits) for bits in MANTISSA_BITS}
    types["int8, a scale per channel"] = lambda a: quantise(a)[0]
    restored = {f"float16, {bits} mantissa bits": (lambda bits: lambda a: kept_bits(a, bits).astype(np.float32))(bits) for bits in MANTISSA_BITS}
    restored["int8, a scale per channel"] = lambda a: dequantise(*quantise(a))
    codec_bytes = {name: [0, 0.0, 0.0] for name in lossless}
    raw = 0
    type_bytes = {name: 0 for name in types}
    agreement = {kind: {name: [] for name in types} for kind in ("kq", "vv")}
    floor = {"forward, no hooks": [], "forward with Q/K/V hooks and copy": [], "forward, no hooks, bfloat16": [],
             "forward with Q/K/V hooks and copy, bfloat16": []}
    agreement["kq"]["bfloat16 forward, int8"], agreement["vv"]["bfloat16 forward, int8"] = [], []

    def eigenvectors(layers, convert, kind: str) -> np.ndarray:
        converted = [LayerAttention(l.name, convert(l.q), convert(l.k), convert(l.v), l.scale) for l in layers]
        u, _ = solve_exact(ExactOperator.from_layers(converted, GraphOptions(kind, "random-walk")), SolverParams(channels=15))
        return u.reshape(15, -1).T

    for n, (group, item) in enumerate(images):
        image = image_tensor(group[item]["rgb"][...], spec.mean, spec.std)
        with torch.no_grad():
            for precision in ("bfloat16", "float32"):  # float32 last: ``layers`` is the reference
                suffix = ", bfloat16" if precision == "bfloat16" else ""
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                    for name, run in (("forward, no hooks", lambda: model(image)),
                                      ("forward with Q/K/V hooks and copy", lambda: extract_attention(model, image, spec.patch_size))):
                        run()
                        start = time.perf_counter()
                        layers = run()
                        floor[name + suffix].append(time.perf_counter() - start)
                if precision == "bfloat16":
                    half_precision = layers
        arrays = [np.ascontiguousarray(getattr(layer, part)) for layer in layers for part in "qkv"]
        for array in arrays:
            if n < args.codec_images:
                data = array.astype(np.float16)
                raw += data.nbytes
                for name, codec in lossless.items():
                    start = time.perf_counter()
                    encoded = codec.encode(data)
                    middle = time.perf_counter()
                    codec.decode(encoded)
                    codec_bytes[name][0] += len(encoded)
                    codec_bytes[name][1] += middle - start
                    codec_bytes[name][2] += time.perf_counter() - middle
            for name, convert in types.items():
                type_bytes[name] += len(shuffled.encode(convert(array)))
        for kind in agreement:
            reference = eigenvectors(layers, lambda a: a, kind)
            for name, convert in restored.items():
                x = eigenvectors(layers, convert, kind)
                agreement[kind][name].append(float(np.mean(np.cos(subspace_angles(reference, x)) ** 2)))
            x = eigenvectors(half_precision, restored["int8, a scale per channel"], kind)
            agreement[kind]["bfloat16 forward, int8"].append(float(np.mean(np.cos(subspace_angles(reference, x)) ** 2)))
        print(f"{item}: {image.shape[-2]}x{image.shape[-1]} px, forward {floor['forward, no hooks'][-1]:.2f} s", file=sys.stderr)

    coded = min(args.codec_images, len(images))
    result = {
        "model": "dinov2-s14-imgfocus", "images": len(images), "threads": args.threads,
        "codecs": {name: {"mb_per_image": size / 1e6 / coded, "ratio": raw / size, "encode_mb_s": raw / 1e6 / enc, "decode_mb_s": raw / 1e6 / dec}
                   for name, (size, enc, dec) in codec_bytes.items()} if coded else {},
        "types": {name: {"mb_per_image": type_bytes[name] / 1e6 / len(images) if name in type_bytes else None,
                         **{f"{kind}_subspace_min": min(agreement[kind][name]) for kind in agreement},
                         **{f"{kind}_subspace_mean": float(np.mean(agreement[kind][name])) for kind in agreement}}
                  for name in agreement["kq"]},
        "floor_s_per_image": {name: float(np.mean(times)) for name, times in floor.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
