"""Which of an extract artifact's arrays (Q, K, V) each of its readers needs, so that `lds extract
--arrays` stores only those, and a reader that finds one missing says so. Importable without torch."""

from __future__ import annotations

from typing import Iterable

from pipeline.errors import LdsError

ARRAYS = ("q", "k", "v")
# per-image graphs (lds solve --graph kq|vv) and the dataset solver's (lds solve-dataset --graph kq|vv)
GRAPH_ARRAYS = {"kq": ("q", "k"), "vv": ("v",)}
# lds baseline --affinity: the attention needs Q and K; both read the key norms (artifact tokens)
BASELINE_ARRAYS = {"attention": ("q", "k"), "features": ("k",)}
ZEROSHOT_ARRAYS = ("v",)  # the last layer's values, projected into CLIP's space


def parse_arrays(text: str) -> tuple[str, ...]:
    """'v,q' -> ('q', 'v'): a comma-separated subset of q, k, v in their order."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(ARRAYS))
    if unknown or not names:
        raise LdsError(f"--arrays {text!r}: give a comma-separated subset of q, k, v (unknown: {', '.join(unknown) or 'none given'})")
    return tuple(name for name in ARRAYS if name in names)


def arrays_needed(needs: Iterable[Iterable[str]]) -> tuple[str, ...]:
    """The union of what the readers need, in q, k, v order."""
    wanted = {name for need in needs for name in need}
    return tuple(name for name in ARRAYS if name in wanted)


def check_stored(stored: Iterable[str], needed: Iterable[str], reader: str, artifact: str) -> None:
    """Stop with one line when ``artifact`` lacks an array ``reader`` needs."""
    missing = [name for name in needed if name not in set(stored)]
    if missing:
        raise LdsError(
            f"{reader} reads {', '.join(needed)} but {artifact} stores only {', '.join(stored)}: extract again with "
            f"--arrays {','.join(arrays_needed([stored, needed]))} (the workflow derives it from the config's consumers)"
        )
