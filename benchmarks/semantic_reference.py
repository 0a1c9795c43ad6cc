"""What dataset-level semantic mIoU (K = 21, Hungarian) the features of a voc-dataset run allow (issue 13).

Reads a finished ``lds bench quality`` voc-dataset run (its solve manifests) and the store, and scores
four K-Means decodings of two feature sets, every one with 21 labels and Hungarian matching:

- ``all tokens``: one K-Means, K = 21, over every token (what ``lds cluster`` does);
- ``foreground tokens``: per image, K-Means K = 2 on its tokens, the side touching more of the image
  border is background; one K-Means, K = 20, over the foreground tokens of all images;
- ``one class per image``: the same foreground, each image's mean foreground feature clustered into 20
  (the Deep Spectral Methods recipe: one semantic segment per image);
- ``one class per image, true foreground``: the same recipe on the ground truth's foreground (every
  labelled class but background, at token resolution): what the recipe reaches with a perfect
  foreground, a ceiling for the features rather than a result.

Features: the solve-dataset X_ortho (first 21 components) and the raw DINOv2 features of one layer
(``--layer block11/v``, heads concatenated, as extract stored them; needs ``extract.keep: all``).
It also prints each class's pixel share and image count, which bound what any K = 21 clustering can do.

    python benchmarks/semantic_reference.py results/bench-quality/voc-dataset --store cache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data import IGNORE  # noqa: E402
from pipeline.decode.kmeans import upsample_labels  # noqa: E402
from pipeline.evaluate.metrics import add_confusion, confusion_matrix, matched_scores  # noqa: E402
from pipeline.store import ArtifactRef, Store  # noqa: E402
from stages.common import upstream  # noqa: E402

CLASSES = 21


def load(run: Path, store: Store, layer: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(features (dims, y, x), labels (y, x)) of every image of the run."""
    images = []
    for manifest in sorted(run.glob("results/*/*/shard-*/solve.json")):
        fields = json.loads(manifest.read_text())
        ref = ArtifactRef(fields["stage"], fields["key"])
        solved = store.open(ref)["items"]
        labels = store.open(upstream(store, ref, "preprocess"))["items"]
        extracted = store.open(upstream(store, ref, "extract"))["items"] if layer else None
        for item in store.attrs(ref)["items"]:
            if layer:
                block, array = layer.split("/")
                features = extracted[item]["layers"][block][array][...][0].transpose(2, 0, 1)
            else:
                features = solved[item]["X_ortho"][...][:CLASSES]
            images.append((features.astype(np.float64), labels[item]["labels"][...]))
    return images


def rows(features: np.ndarray) -> np.ndarray:
    return features.reshape(features.shape[0], -1).T


def border_share(mask: np.ndarray) -> float:
    """The fraction of the image border's tokens inside ``mask``."""
    border = np.ones_like(mask)
    border[1:-1, 1:-1] = False
    return float((mask & border).sum() / border.sum())


def foreground(features: np.ndarray, seed: int) -> np.ndarray:
    """K-Means K = 2 on one image's tokens; the side touching less of the border, (y, x) bool."""
    from sklearn.cluster import KMeans

    sides = KMeans(2, n_init=4, random_state=seed).fit_predict(rows(features)).reshape(features.shape[1:])
    return sides != int(np.argmax([border_share(sides == side) for side in (0, 1)]))


def true_foreground(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The ground truth's foreground (any class but background 0 and ignore) at token resolution, (y, x) bool."""
    from PIL import Image

    tokens = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(grid[::-1], Image.Resampling.NEAREST))
    return (tokens != 0) & (tokens != IGNORE)


def miou(images: list[tuple[np.ndarray, np.ndarray]], predictions: list[np.ndarray]) -> float:
    """Hungarian-matched mIoU (percent) of token label maps against the pixel labels."""
    total = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    for (_, labels), tokens in zip(images, predictions):
        total = add_confusion(total, confusion_matrix(labels, upsample_labels(tokens, labels.shape), CLASSES, CLASSES))
    return 100 * matched_scores(total)["miou"]


def decodings(images: list[tuple[np.ndarray, np.ndarray]], seed: int) -> dict[str, float]:
    """mIoU of the three decodings."""
    from sklearn.cluster import KMeans

    shapes = [features.shape[1:] for features, _ in images]
    tokens = [rows(features) for features, _ in images]
    everything = KMeans(CLASSES, n_init=4, random_state=seed).fit_predict(np.concatenate(tokens))
    split = np.cumsum([len(t) for t in tokens])[:-1]
    scores = {"all tokens": miou(images, [part.reshape(shape) for part, shape in zip(np.split(everything, split), shapes)])}
    masks = [foreground(features, seed).ravel() for features, _ in images]
    model = KMeans(CLASSES - 1, n_init=4, random_state=seed).fit(np.concatenate([t[m] for t, m in zip(tokens, masks)]))
    scores["foreground tokens"] = miou(images, [np.where(m, model.predict(t), CLASSES - 1).reshape(s) for t, m, s in zip(tokens, masks, shapes)])
    scores["one class per image"] = one_class_per_image(images, tokens, masks, seed)
    truth = [true_foreground(labels, shape).ravel() for (_, labels), shape in zip(images, shapes)]
    scores["one class per image, true foreground"] = one_class_per_image(images, tokens, truth, seed)
    return scores


def one_class_per_image(images, tokens: list[np.ndarray], masks: list[np.ndarray], seed: int) -> float:
    """The Deep Spectral Methods recipe: each image's mean feature over its foreground ``masks``
    clustered into 20 across images, the rest background; mIoU (percent)."""
    from sklearn.cluster import KMeans

    means = np.stack([t[m].mean(0) if m.any() else t.mean(0) for t, m in zip(tokens, masks)])
    per_image = KMeans(CLASSES - 1, n_init=10, random_state=seed).fit_predict(means)
    shapes = [features.shape[1:] for features, _ in images]
    return miou(images, [np.where(m, c, CLASSES - 1).reshape(s) for m, c, s in zip(masks, per_image, shapes)])


def class_table(images: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, float, int]]:
    """(class, pixel share in percent, images holding it) for every class."""
    pixels = sum(np.bincount(labels[labels < CLASSES].ravel(), minlength=CLASSES) for _, labels in images)
    holding = sum(np.isin(np.arange(CLASSES), labels) for _, labels in images)
    return [(c, 100 * pixels[c] / pixels.sum(), int(holding[c])) for c in range(CLASSES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a voc-dataset run folder of lds bench quality")
    parser.add_argument("--store", default="cache")
    parser.add_argument("--layer", default="block11/v", help="raw features: <block>/<q|k|v> of the extract artifact ('' skips them)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store = Store(args.store)
    x_ortho = load(args.run, store, None)
    columns = ("all tokens", "foreground tokens", "one class per image", "one class per image, true foreground")
    print("| features | " + " | ".join(columns) + " |\n|---|---|---|---|---|")
    sets = [("solve-dataset X_ortho (21 components)", x_ortho)] + ([(f"raw {args.layer}", load(args.run, store, args.layer))] if args.layer else [])
    for name, images in sets:
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in decodings(images, args.seed).values()) + " |")
    print("\nclass, pixel share %, images: " + ", ".join(f"{c}: {share:.1f} / {count}" for c, share, count in class_table(x_ortho)))


if __name__ == "__main__":
    main()
