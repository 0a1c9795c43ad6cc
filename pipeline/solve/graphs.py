"""Affinity graphs from one image's attention layers (METHOD.md section 1).

Each head of each layer defines a graph over the layer's tokens:

- ``kq`` ("where"): logits Q Kᵀ · scale;
- ``vv`` ("what"): cosine similarity of the value vectors.

and one of two normalisations:

- ``random-walk`` (default): kq -> softmax over keys (the attention itself); vv -> negative similarities
  clipped to 0, then rows normalised to sum to 1. The target eigenvalue is 1.
- ``laplacian`` (the reference code's option): W = exp(logits) symmetrised, N = D^-1/2 W D^-1/2 with
  D the degrees; features are scaled by sqrt(D) before each graph sees them. N's top eigenvalue is 1,
  i.e. eigenvalue 0 of the symmetric normalised Laplacian I - N.

Graphs are produced in row blocks, so a caller can hold a whole graph (``graph_sets``), only the sum
over graphs (the exact solver), never more than one block (``apply_symmetrised``), or one image's
graphs built once for all their uses (``GraphCache``). Blocks are normalised in place and, given a
``Workspace``, written into memory reused from image to image: on a CPU, fresh memory for an image's
graphs costs more (page faults) than the products and softmaxes that fill it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.errors import LdsError
from pipeline.extract.core import LayerAttention
from pipeline.solve.params import GraphOptions

BLOCK_ELEMENTS = 1 << 24  # entries of one row block over all heads (64 MiB in float32)
CACHE_BYTES = 1 << 30  # one image's graphs kept (DINOv2 ViT-S/14 at 448 px: all of them, 0.3-0.7 GiB)

Block = tuple[slice, torch.Tensor, torch.Tensor | None]  # rows, block (heads, rows, N), sqrt-degree or None


class Workspace:
    """Memory reused from image to image (one per solving process): ``tensor(name, shape)`` hands out a
    view of the memory kept under ``name``, grown when too small. A name's memory is shared by every
    tensor handed out under it, so the next one overwrites the last."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.memory: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        size = int(np.prod(shape))
        kept = self.memory.get(name)
        if kept is None or kept.numel() < size or kept.dtype != dtype:
            kept = self.memory[name] = torch.empty(size, dtype=dtype, device=self.device)
        return kept[:size].view(shape)


@dataclass
class GraphSet:
    """Graphs that share one resolution: ``matrices`` is (graphs, N, N), N = h * w.

    ``scale`` (graphs, N) is sqrt(degree) for the laplacian variant, by which features are multiplied
    before they meet the graph; None for random-walk graphs.
    """

    grid: tuple[int, int]
    matrices: torch.Tensor
    names: list[str]
    scale: torch.Tensor | None = None


TIMESTEP_MARK = "@t"  # a Stable Diffusion layer in one attention set: <stored name>@t<timestep>


def timestep_name(stored: str, timestep: int) -> str:
    """The name of a stored Stable Diffusion layer in the attention set of one timestep."""
    return f"{stored}{TIMESTEP_MARK}{timestep}"


def stored_name(name: str) -> str:
    """A layer's name in the extract artifact: without the ``@t<timestep>`` of an attention set."""
    return name.split(TIMESTEP_MARK, 1)[0]


def select(layers: list[LayerAttention], options: GraphOptions) -> list[LayerAttention]:
    """The layers (by name or index) and heads (by index) that ``options`` asks for. A Stable Diffusion
    layer (``<layer>@t<timestep>``, one attention set per timestep) is also found by its stored name."""
    chosen = layers
    if options.layers:
        by_name = {layer.name: layer for layer in layers} | {stored_name(layer.name): layer for layer in layers}
        chosen = []
        for wanted in options.layers:
            if wanted in by_name:
                chosen.append(by_name[wanted])
            elif wanted.lstrip("-").isdigit() and -len(layers) <= int(wanted) < len(layers):
                chosen.append(layers[int(wanted)])
            else:
                stored = ", ".join(stored_name(layer.name) for layer in layers)
                raise LdsError(f"layer {wanted!r} is not stored; stored layers: {stored}")
    if options.heads:
        available = min(layer.heads for layer in chosen)
        bad = [h for h in options.heads if not 0 <= h < available]
        if bad:
            raise LdsError(f"head {bad[0]} does not exist; the selected layers have {available} heads")
        chosen = [
            LayerAttention(layer.name, *(None if a is None else a[list(options.heads)] for a in (layer.q, layer.k, layer.v)), layer.scale)
            for layer in chosen
        ]
    return chosen


def head_names(layer: LayerAttention, options: GraphOptions) -> list[str]:
    heads = options.heads or range(layer.heads)
    return [f"{layer.name}/head{h}" for h in heads]


def row_blocks(layer: LayerAttention, options: GraphOptions, device: str = "cpu",
               workspace: Workspace | None = None, name: str = "block") -> Iterator[Block]:
    """(rows, block (heads, rows, N), sqrt-degree (heads, N) or None) covering every row of the graphs.

    With a ``workspace``, random-walk blocks are written into its memory under ``name`` (plus the first
    row): each is valid until a block of the same name is built again."""
    heads = layer.heads
    size = layer.grid[0] * layer.grid[1]
    rows_per_block = max(1, BLOCK_ELEMENTS // (heads * size))
    left, right = _operands(layer, options.kind, device)
    if options.variant == "random-walk":
        for start in range(0, size, rows_per_block):
            rows = slice(start, min(start + rows_per_block, size))
            shape = (heads, rows.stop - start, size)
            block = workspace.tensor(f"{name}:{start}", shape) if workspace else torch.empty(shape, device=device)
            torch.matmul(left[:, rows], right.transpose(1, 2), out=block)
            yield rows, _normalise_in_place(block, options.kind), None
        return
    # laplacian: W = exp(logits - c), symmetrised; a constant c cancels in D^-1/2 W D^-1/2
    shift = _max_logit(left, right, rows_per_block)
    degree = torch.zeros(heads, size, dtype=left.dtype, device=device)
    for start in range(0, size, rows_per_block):
        rows = slice(start, min(start + rows_per_block, size))
        degree[:, rows] = _exp_block(left, right, rows, shift).sum(-1)
    root = degree.sqrt()
    for start in range(0, size, rows_per_block):
        rows = slice(start, min(start + rows_per_block, size))
        yield rows, _exp_block(left, right, rows, shift) / (root[:, rows, None] * root[:, None, :]), root


def graph_sets(layers: list[LayerAttention], options: GraphOptions, device: str = "cpu") -> list[GraphSet]:
    """Every selected head of every selected layer as a dense graph, grouped by resolution."""
    by_grid: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] = {}
    for layer in select(layers, options):
        blocks: list[torch.Tensor] = []
        for _, block, scale in row_blocks(layer, options, device):
            blocks.append(block)
        matrices, scales, names = by_grid.setdefault(layer.grid, ([], [], []))
        matrices.append(torch.cat(blocks, dim=1))
        if scale is not None:
            scales.append(scale)
        names += head_names(layer, options)
    return [
        GraphSet(grid, torch.cat(m), names, torch.cat(s) if s else None)
        for grid, (m, s, names) in by_grid.items()
    ]


class GraphCache:
    """One image's graphs as the exact solver, its measure and the single-layer embeddings use them
    (layers as ``select(…, options)`` returns them): each layer's row blocks, built once and kept while
    all kept stay within ``budget`` bytes; beyond it, built each time.

    They live in ``workspace`` (a new one if not given): pass the same workspace to the cache of each
    image in turn to reuse its memory; the previous image's cache is invalid from then on."""

    def __init__(self, options: GraphOptions, device: str = "cpu", budget: int = CACHE_BYTES,
                 workspace: Workspace | None = None):
        self.options = options
        self.device = device
        self.budget = budget
        self.workspace = workspace or Workspace(device)
        self.blocks: dict[str, list[Block]] = {}

    def fits(self, nbytes: int) -> bool:
        kept = sum(block.nbytes for blocks in self.blocks.values() for _, block, _ in blocks)
        return kept + nbytes <= self.budget

    def row_blocks(self, layer: LayerAttention) -> Iterable[Block]:
        """``row_blocks`` of ``layer`` under this cache's options."""
        if layer.name not in self.blocks:
            if not self.fits(4 * layer.heads * (layer.grid[0] * layer.grid[1]) ** 2):
                return row_blocks(layer, self.options, self.device, self.workspace, "streamed")
            self.blocks[layer.name] = list(row_blocks(layer, self.options, self.device, self.workspace, f"graph {layer.name}"))
        return self.blocks[layer.name]


def summed_symmetrised(layers: LayerAttention | list[LayerAttention], options: GraphOptions, device: str = "cpu",
                       blocks: Callable[[LayerAttention], Iterable[Block]] | None = None,
                       workspace: Workspace | None = None, name: str = "sum") -> torch.Tensor:
    """Σ over heads (and over ``layers``, all of one grid) of (A + Aᵀ) / 2, (N, N) float64, from each
    layer's row blocks (``blocks(layer)`` if given, else built one layer at a time, in ``workspace``'s
    memory if given); the sum in ``workspace``'s memory under ``name`` if given. The graphs are summed in
    float32 (torch's float64 sum of float32 is ten times slower), then symmetrised in float64."""
    layers = [layers] if isinstance(layers, LayerAttention) else layers
    size = layers[0].grid[0] * layers[0].grid[1]

    def memory(label: str, dtype: torch.dtype) -> torch.Tensor:
        return workspace.tensor(label, (size, size), dtype) if workspace else torch.empty(size, size, dtype=dtype, device=device)

    summed = memory("float32 sum", torch.float32)
    for index, layer in enumerate(layers):
        for rows, block, _ in row_blocks(layer, options, device, workspace, "streamed") if blocks is None else blocks(layer):
            if index == 0:
                torch.sum(block, 0, out=summed[rows])
            else:
                summed[rows] += block.sum(0)
    total = memory(name, torch.float64).copy_(summed)
    return total.add_(memory("transposed", torch.float64).copy_(total.T)).mul_(0.5)


def apply_symmetrised(layer: LayerAttention, options: GraphOptions, vectors: torch.Tensor) -> torch.Tensor:
    """Σ over heads of (A + Aᵀ) / 2 applied to ``vectors`` (N, k), never holding more than a row block."""
    out = torch.zeros_like(vectors)
    for rows, block, _ in row_blocks(layer, options, str(vectors.device)):
        summed = block.sum(0).to(vectors.dtype)
        out[rows] += summed @ vectors / 2
        out += summed.T @ vectors[rows] / 2
    return out


def _operands(layer: LayerAttention, kind: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with graph logits = left @ rightᵀ, each (heads, N, dim) float32."""
    def tokens(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).flatten(1, 2).to(device)

    if kind == "kq":
        return tokens(layer.q) * layer.scale, tokens(layer.k)
    values = torch.nn.functional.normalize(tokens(layer.v), dim=-1)
    return values, values


def _normalise_in_place(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits -> random-walk graph rows, overwriting ``logits``: kq a softmax over keys; vv negative
    similarities clipped to 0, rows normalised to sum to 1."""
    if kind == "kq":  # torch.softmax's kernel (bitwise the same values), writing over its input
        return torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    logits.clamp_min_(0)
    return logits.div_(logits.sum(-1, keepdim=True).clamp_min_(1e-12))


def _max_logit(left: torch.Tensor, right: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    """Per head, the largest logit in either direction (exp(W) symmetrised needs both)."""
    shift = torch.full((left.shape[0], 1, 1), -torch.inf, device=left.device)
    for start in range(0, left.shape[1], rows_per_block):
        block = left[:, start : start + rows_per_block] @ right.transpose(1, 2)
        shift = torch.maximum(shift, block.amax(dim=(1, 2), keepdim=True))
    return shift


def _exp_block(left: torch.Tensor, right: torch.Tensor, rows: slice, shift: torch.Tensor) -> torch.Tensor:
    """Rows of W = (exp(L - c) + exp(L - c)ᵀ) / 2 for L = left @ rightᵀ."""
    forward = torch.exp(left[:, rows] @ right.transpose(1, 2) - shift)
    backward = torch.exp(right[:, rows] @ left.transpose(1, 2) - shift)
    return (forward + backward) / 2
