"""Pseudo-eigenvectors shared by many attention graphs (METHOD.md sections 2-3).

``solve_adam`` is the paper's optimisation: X (m channels on the finest grid, softmax over channels,
either free features or the reference code's small conv net) is average-pooled to each graph's
resolution, and the loss pushes diag(Zᵀ A Z) towards 1 while keeping the columns of Z orthogonal.
Graphs come from an ``AttentionBuffer``: one fixed set for ViTs; for Stable Diffusion a buffer of a few
sets over the pool of stored timesteps, refreshed with sets not already in it. ``solve_exact`` computes
the leading eigenvectors of the sum of the symmetrised graphs directly (Lanczos through scipy's eigsh),
holding at most one N x N matrix per resolution, or none at all above ``dense_limit`` tokens, where
graphs are applied block by block from Q and K.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.errors import LdsError
from pipeline.extract.core import LayerAttention
from pipeline.solve.graphs import (
    GraphCache, GraphSet, Workspace, apply_symmetrised, graph_sets, head_names, row_blocks, select, summed_symmetrised,
)
from pipeline.solve.params import GraphOptions, SolverParams, resolve_accumulate

DENSE_LIMIT = 4096  # tokens (64 x 64): above this the exact solver applies graphs from Q and K
# eigsh's relative accuracy: U within 1e-8 of U converged to machine precision (below float32's resolution,
# in which it is stored), with 15% less time on DINOv2 ViT-S/14 at 448 px
EXACT_TOL = 1e-8


@dataclass
class Solution:
    x: np.ndarray  # (channel, y, x) on the finest grid: softmax output (adam) or eigenvectors (exact)
    x_ortho: np.ndarray  # (component, y, x): U S, components in decreasing order
    u: np.ndarray  # (component, y, x): the orthonormal eigenvectors U, decreasing order
    eigenvalues: np.ndarray | None  # (graph, channel): diag(Zᵀ A Z); None: not measured
    orthogonality: np.ndarray | None  # (graph,): mean squared off-diagonal of Zᵀ Z; None: not measured
    losses: np.ndarray  # (step,)
    graph_names: list[str]


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' as given.

    Raises an LdsError naming ``--device`` for any other value, or for a CUDA device that is not there.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise LdsError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LdsError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise LdsError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def finest_grid(graph_sets: list[GraphSet]) -> tuple[int, int]:
    return max((gs.grid for gs in graph_sets), key=lambda g: g[0] * g[1])


def token_columns(x: torch.Tensor) -> torch.Tensor:
    """X (m, H, W) as (H * W, m): a column per channel."""
    return x.flatten(1).T


def unit_columns(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=-2, keepdim=True).clamp_min(1e-12)


def objective(
    x: torch.Tensor, graph_sets: list[GraphSet], weight_eig: float, weight_ortho: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, eigenvalues (graph, channel) and orthogonality (graph,) for X (m, H, W)."""
    eigenvalues, orthogonality = [], []
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    for graph_set in graph_sets:
        base = pool_columns(token_columns(x), tuple(x.shape[1:]), graph_set.grid)
        if graph_set.scale is None:  # one Z shared by every graph of this resolution
            z = unit_columns(base)
            eig = (z[None] * (graph_set.matrices @ z)).sum(dim=1)
            ortho = (z.T @ z)[off_diagonal].pow(2).mean().expand(graph_set.matrices.shape[0])
        else:  # laplacian: Z_l = sqrt(D_l) X, normalised, per graph
            z = unit_columns(graph_set.scale[:, :, None] * base[None])
            eig = (z * (graph_set.matrices @ z)).sum(dim=1)
            ortho = (z.transpose(1, 2) @ z)[:, off_diagonal].pow(2).mean(dim=1)
        eigenvalues.append(eig)
        orthogonality.append(ortho)
    eigenvalues_all = torch.cat(eigenvalues)
    orthogonality_all = torch.cat(orthogonality)
    loss = weight_eig * (eigenvalues_all - 1).abs().mean() + weight_ortho * orthogonality_all.mean()
    return loss, eigenvalues_all, orthogonality_all


def svd_components(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U (m, H, W) and S (m,) of the SVD of X with unit-length channels, decreasing order."""
    flat = x.reshape(x.shape[0], -1).T.astype(np.float64)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=0, keepdims=True), 1e-12)
    u, s, _ = np.linalg.svd(flat, full_matrices=False)
    return u.T.reshape(x.shape).astype(np.float32), s.astype(np.float32)


def orthogonalise(x: np.ndarray) -> np.ndarray:
    """X_ortho = U S of the SVD of X with unit-length channels; (m, H, W) in, (m, H, W) out."""
    u, s = svd_components(x)
    return u * s[:, None, None]


class AttentionBuffer:
    """The attention sets the Adam solver draws from (METHOD.md section 3).

    ``builders[i]()`` builds the graphs of pool member i (a Stable Diffusion timestep with its own noise).
    The buffer keeps up to ``size`` built sets. Each draw brings in a new set with probability ``refresh``
    (always while the buffer is empty): one drawn uniformly from the pool members NOT in the buffer,
    replacing the oldest once the buffer is full; otherwise, or when every pool member is already
    buffered, it reuses a buffered set drawn uniformly. With a single attention set (ViTs) every draw
    returns it.
    """

    def __init__(self, builders: list[Callable[[], list[GraphSet]]], size: int = 5, refresh: float = 0.25, seed: int = 0):
        if size < 1 or not 0 <= refresh <= 1:
            raise ValueError(f"attention buffer size {size} must be >= 1 and refresh {refresh} within [0, 1]")
        self.builders = builders
        self.size = size
        self.refresh = refresh
        self.random = random.Random(seed)
        self.sets: OrderedDict[int, list[GraphSet]] = OrderedDict()  # pool index -> graphs, oldest first

    @classmethod
    def fixed(cls, sets: list[GraphSet]) -> AttentionBuffer:
        return cls([lambda: sets])

    @classmethod
    def from_layers(cls, layer_sets: list[list[LayerAttention]], params: SolverParams, device: str) -> AttentionBuffer:
        """One pool member per stored attention set (timestep), its graphs built each time it enters the buffer."""
        builders = [lambda layers=layers: graph_sets(layers, params.graphs, device) for layers in layer_sets]
        return cls(builders, params.buffer, params.refresh, params.seed)

    def draw(self) -> list[GraphSet]:
        """The attention set of one forward pass."""
        unbuffered = [index for index in range(len(self.builders)) if index not in self.sets]
        if unbuffered and (not self.sets or self.random.random() < self.refresh):
            index = self.random.choice(unbuffered)
            self.sets[index] = self.builders[index]()
            if len(self.sets) > self.size:
                self.sets.popitem(last=False)
            return self.sets[index]
        return self.sets[self.random.choice(list(self.sets))]


class FreeField(torch.nn.Module):
    """X's logits as free parameters (the paper's description)."""

    def __init__(self, channels: int, grid: tuple[int, int], init: torch.Tensor | None = None):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(channels, *grid) if init is None else init.clone())

    def forward(self) -> torch.Tensor:
        return self.logits


class ConvField(torch.nn.Module):
    """X's logits from a small conv net over a learned random input (the reference code)."""

    def __init__(self, channels: int, grid: tuple[int, int], hidden: int = 128, inputs: int = 32):
        super().__init__()
        self.input = torch.nn.Parameter(torch.randn(1, inputs, *grid))
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(inputs, hidden, 3, padding=1), torch.nn.BatchNorm2d(hidden), torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, hidden, 3, padding=1), torch.nn.BatchNorm2d(hidden), torch.nn.ReLU(),
            torch.nn.Conv2d(hidden, channels, 3, padding=1),
        )

    def forward(self) -> torch.Tensor:
        return self.net(self.input)[0]


def initial_logits(u: np.ndarray) -> torch.Tensor:
    """Logits for a warm start from eigenvectors U (m, H, W): unit-norm columns scaled to O(1) entries."""
    size = u[0].size
    return torch.from_numpy(u * np.sqrt(size)).float()


def solve_adam(
    source: list[GraphSet] | AttentionBuffer, params: SolverParams, progress: bool = False, init: np.ndarray | None = None
) -> Solution:
    """The paper's optimisation: Adam on X (softmax over channels), ``params.accumulate`` passes per step
    (``auto``: 20 when the buffer's pool holds several attention sets, else 1), each drawing from the buffer.

    ``init`` (eigenvectors U, e.g. from ``solve_exact``) warm-starts free features.
    """
    buffer = source if isinstance(source, AttentionBuffer) else AttentionBuffer.fixed(source)
    passes = resolve_accumulate(params.accumulate, len(buffer.builders))
    first = buffer.draw()
    device = first[0].matrices.device
    grid = finest_grid(first)
    torch.manual_seed(params.seed)
    if params.parameterisation == "convnet":
        field = ConvField(params.channels, grid)
    else:
        field = FreeField(params.channels, grid, None if init is None else initial_logits(init))
    field = field.to(device)
    optimiser = torch.optim.Adam(field.parameters(), lr=params.lr)
    losses = np.zeros(params.steps, dtype=np.float32)
    for step in tqdm(range(params.steps), desc="solve", disable=not progress, leave=False):
        optimiser.zero_grad()
        total = 0.0
        for _ in range(passes):
            loss, _, _ = objective(torch.softmax(field(), dim=0), buffer.draw(), params.weight_eig, params.weight_ortho)
            (loss / passes).backward()
            total += loss.item() / passes
        optimiser.step()
        losses[step] = total
    with torch.no_grad():
        x = torch.softmax(field(), dim=0)
        _, eig, ortho = objective(x, first, params.weight_eig, params.weight_ortho)
    x_np = x.cpu().numpy()
    u, s = svd_components(x_np)
    return Solution(x_np, u * s[:, None, None], u, eig.cpu().numpy(), ortho.cpu().numpy(), losses,
                    [name for gs in first for name in gs.names])


@dataclass
class ExactOperator:
    """Σ_l P_lᵀ (A_l + A_lᵀ)/2 P_l on the finest grid: per resolution a dense sum, or layers to stream."""

    grid: tuple[int, int]
    dense: dict[tuple[int, int], torch.Tensor]
    streamed: list[LayerAttention]
    options: GraphOptions

    @classmethod
    def from_graph_sets(cls, sets: list[GraphSet]) -> ExactOperator:
        dense = {gs.grid: ((gs.matrices + gs.matrices.transpose(1, 2)) / 2).sum(0).double() for gs in sets}
        return cls(finest_grid(sets), dense, [], GraphOptions())

    @classmethod
    def from_layers(cls, layers: list[LayerAttention], options: GraphOptions, device: str = "cpu",
                    dense_limit: int = DENSE_LIMIT, cache: GraphCache | None = None,
                    workspace: Workspace | None = None) -> ExactOperator:
        """From stored Q/K/V: the graphs of each resolution summed, or streamed when N > ``dense_limit``.
        The sums are built from ``cache``'s row blocks, in its workspace, if given; else block by block in
        ``workspace``'s memory if given (reused from layer to layer: a layer's graphs are not kept)."""
        chosen = select(layers, options)
        by_grid: dict[tuple[int, int], list[LayerAttention]] = {}
        streamed = []
        for layer in chosen:
            if layer.grid[0] * layer.grid[1] > dense_limit:
                streamed.append(layer)
            else:
                by_grid.setdefault(layer.grid, []).append(layer)
        dense = {
            grid: summed_symmetrised(group, options, device, cache.row_blocks if cache else None,
                                     cache.workspace if cache else workspace, f"sum {group[0].name}..{group[-1].name}")
            for grid, group in by_grid.items()
        }
        grid = max((layer.grid for layer in chosen), key=lambda g: g[0] * g[1])
        return cls(grid, dense, streamed, options)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(vectors)
        for graph_grid, matrix in self.dense.items():
            out += lift_columns(matrix @ pool_columns(vectors, self.grid, graph_grid), self.grid, graph_grid)
        for layer in self.streamed:
            out += lift_columns(apply_symmetrised(layer, self.options, pool_columns(vectors, self.grid, layer.grid).float()).double(),
                         self.grid, layer.grid)
        return out


def solve_exact(operator: ExactOperator | list[GraphSet], params: SolverParams, tol: float = EXACT_TOL
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ``params.channels`` leading eigenvectors U (m, H, W) and eigenvalues of the combined operator,
    to relative accuracy ``tol`` (eigsh's; 0: machine precision)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    if not isinstance(operator, ExactOperator):
        operator = ExactOperator.from_graph_sets(operator)
    size = operator.grid[0] * operator.grid[1]
    device = next(iter(operator.dense.values())).device if operator.dense else "cpu"

    def apply(vectors: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.asarray(vectors, dtype=np.float64).reshape(size, -1)).to(device)
        return operator(v).cpu().numpy()

    linear = LinearOperator((size, size), matvec=apply, matmat=apply, dtype=np.float64)
    values, vectors = eigsh(linear, k=params.channels, which="LA", v0=np.ones(size), tol=tol)
    order = np.argsort(values)[::-1]
    u = vectors[:, order] * np.sign(vectors[:, order].sum(0, keepdims=True) + 1e-12)
    return u.T.reshape(params.channels, *operator.grid).astype(np.float32), values[order]


def exact_solution(u: np.ndarray, layers: list[LayerAttention], options: GraphOptions,
                   cache: GraphCache | None = None, measured: bool = True) -> Solution:
    """A Solution from eigenvectors U: X = X_ortho = U (already orthonormal, in eigenvalue order), with
    each graph's eigenvalues and orthogonality if ``measured`` (a pass over every graph again)."""
    eigenvalues, orthogonality = measure(u, layers, options, cache) if measured else (None, None)
    return Solution(u, u.copy(), u.copy(), eigenvalues, orthogonality, np.zeros(0, np.float32),
                    [name for layer in select(layers, options) for name in head_names(layer, options)])


@torch.no_grad()
def measure(x: np.ndarray, layers: list[LayerAttention], options: GraphOptions,
            cache: GraphCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``objective``'s eigenvalue and orthogonality terms, one row block at a time (``cache``'s if given)."""
    features = torch.from_numpy(np.asarray(x, dtype=np.float32))
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool)
    eigenvalues, orthogonality = [], []
    for layer in select(layers, options):
        base = pool_columns(token_columns(features), tuple(features.shape[1:]), layer.grid)
        eig = z = None
        for rows, block, scale in cache.row_blocks(layer) if cache else row_blocks(layer, options):
            if z is None:
                z = unit_columns(base[None] if scale is None else scale[:, :, None] * base[None])
                z = z.expand(block.shape[0], -1, -1)
                eig = torch.zeros(block.shape[0], x.shape[0])
            eig += (z[:, rows] * (block @ z)).sum(dim=1)
        eigenvalues.append(eig)
        orthogonality.append((z.transpose(1, 2) @ z)[:, off_diagonal].pow(2).mean(dim=1))
    return torch.cat(eigenvalues).numpy(), torch.cat(orthogonality).numpy()


def pool_columns(v: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Average-pool columns of v (N, k) from ``grid`` to ``target``."""
    if grid == target:
        return v
    images = v.T.reshape(-1, 1, *grid)
    return F.adaptive_avg_pool2d(images, target).reshape(v.shape[1], -1).T


def lift_columns(v: torch.Tensor, grid: tuple[int, int], source: tuple[int, int]) -> torch.Tensor:
    """The adjoint of ``pool_columns``: spread coarse values back over the fine cells they average."""
    if grid == source:
        return v
    fine = torch.zeros(grid[0] * grid[1], v.shape[1], dtype=v.dtype, device=v.device, requires_grad=True)
    (lifted,) = torch.autograd.grad(pool_columns(fine, grid, source), fine, grad_outputs=v)
    return lifted
