"""Pseudo-eigenvectors shared by many attention graphs (METHOD.md sections 1-3).

``solve_adam`` is the paper's optimisation: X (m channels on the finest grid, softmax over channels)
is average-pooled to each graph's resolution, and the loss pushes diag(Zᵀ A Z) towards 1 while keeping
the columns of Z orthogonal. ``solve_exact`` computes the leading eigenvectors of the sum of the
symmetrised graphs directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.extract import LayerAttention
from pipeline.solver_params import SolverParams

@dataclass
class GraphSet:
    """Graphs that share one resolution: ``matrices`` is (graphs, N, N), N = h * w."""

    grid: tuple[int, int]
    matrices: torch.Tensor
    names: list[str]


@dataclass
class Solution:
    x: np.ndarray  # (channel, y, x) on the finest grid: softmax output (adam) or eigenvectors (exact)
    x_ortho: np.ndarray  # (component, y, x), components in decreasing singular value order
    eigenvalues: np.ndarray  # (graph, channel): diag(Zᵀ A Z)
    orthogonality: np.ndarray  # (graph,): mean squared off-diagonal of Zᵀ Z
    losses: np.ndarray  # (step,)
    graph_names: list[str]


def key_query_graphs(layers: list[LayerAttention]) -> list[GraphSet]:
    """One row-stochastic graph softmax(Q Kᵀ / sqrt(d)) per head per layer, grouped by resolution."""
    by_grid: dict[tuple[int, int], tuple[list[torch.Tensor], list[str]]] = {}
    for layer in layers:
        q = torch.from_numpy(layer.q.astype(np.float32)).flatten(1, 2)  # (head, N, dim)
        k = torch.from_numpy(layer.k.astype(np.float32)).flatten(1, 2)
        attention = torch.softmax(q @ k.transpose(1, 2) * layer.scale, dim=-1)
        matrices, names = by_grid.setdefault(layer.grid, ([], []))
        matrices.append(attention)
        names += [f"{layer.name}/head{h}" for h in range(attention.shape[0])]
    return [GraphSet(grid, torch.cat(m), names) for grid, (m, names) in by_grid.items()]


def finest_grid(graph_sets: list[GraphSet]) -> tuple[int, int]:
    return max((gs.grid for gs in graph_sets), key=lambda g: g[0] * g[1])


def pooled_columns(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """X (m, H, W) average-pooled to ``grid``, as (N, m) with unit-length columns."""
    pooled = x if tuple(x.shape[1:]) == grid else F.adaptive_avg_pool2d(x[None], grid)[0]
    z = pooled.flatten(1).T
    return z / z.norm(dim=0, keepdim=True).clamp_min(1e-12)


def objective(
    x: torch.Tensor, graph_sets: list[GraphSet], weight_eig: float, weight_ortho: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, eigenvalues (graph, channel) and orthogonality (graph,) for non-negative X (m, H, W)."""
    eigenvalues, orthogonality = [], []
    channels = x.shape[0]
    off_diagonal = ~torch.eye(channels, dtype=torch.bool)
    for graph_set in graph_sets:
        z = pooled_columns(x, graph_set.grid)
        eig = (z[None] * (graph_set.matrices @ z)).sum(dim=1)  # diag(Zᵀ A Z) for every graph
        gram = z.T @ z
        ortho = gram[off_diagonal].pow(2).mean()
        eigenvalues.append(eig)
        orthogonality.append(ortho.expand(graph_set.matrices.shape[0]))
    eigenvalues_all = torch.cat(eigenvalues)
    orthogonality_all = torch.cat(orthogonality)
    loss = weight_eig * (eigenvalues_all - 1).abs().mean() + weight_ortho * orthogonality_all.mean()
    return loss, eigenvalues_all, orthogonality_all


def orthogonalise(x: np.ndarray) -> np.ndarray:
    """X_ortho = U S of the SVD of X with unit-length channels; (m, H, W) in, (m, H, W) out."""
    flat = x.reshape(x.shape[0], -1).T.astype(np.float64)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=0, keepdims=True), 1e-12)
    u, s, _ = np.linalg.svd(flat, full_matrices=False)
    return (u * s).T.reshape(x.shape).astype(np.float32)


def solve_adam(graph_sets: list[GraphSet], params: SolverParams, progress: bool = False) -> Solution:
    """The paper's optimisation: Adam on free features, softmax over channels."""
    generator = torch.Generator().manual_seed(params.seed)
    grid = finest_grid(graph_sets)
    logits = torch.randn((params.channels, *grid), generator=generator).requires_grad_()
    optimiser = torch.optim.Adam([logits], lr=params.lr)
    losses = np.zeros(params.steps, dtype=np.float32)
    for step in tqdm(range(params.steps), desc="solve", disable=not progress, leave=False):
        optimiser.zero_grad()
        loss, _, _ = objective(torch.softmax(logits, dim=0), graph_sets, params.weight_eig, params.weight_ortho)
        loss.backward()
        optimiser.step()
        losses[step] = loss.item()
    with torch.no_grad():
        x = torch.softmax(logits, dim=0)
        _, eig, ortho = objective(x, graph_sets, params.weight_eig, params.weight_ortho)
    x_np = x.numpy()
    return Solution(x_np, orthogonalise(x_np), eig.numpy(), ortho.numpy(), losses, _names(graph_sets))


def solve_exact(graph_sets: list[GraphSet], params: SolverParams) -> Solution:
    """Leading eigenvectors of the sum of symmetrised graphs, each lifted to the finest grid."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    grid = finest_grid(graph_sets)
    size = grid[0] * grid[1]
    symmetric = [(gs.grid, ((gs.matrices + gs.matrices.transpose(1, 2)) / 2).sum(0).double()) for gs in graph_sets]

    def apply(vectors: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.asarray(vectors, dtype=np.float64).reshape(size, -1))
        out = torch.zeros_like(v)
        for graph_grid, matrix in symmetric:
            out += _lift(matrix @ _pool(v, grid, graph_grid), grid, graph_grid)
        return out.numpy()

    operator = LinearOperator((size, size), matvec=apply, matmat=apply, dtype=np.float64)
    values, vectors = eigsh(operator, k=params.channels, which="LA", v0=np.ones(size))
    order = np.argsort(values)[::-1]
    u = vectors[:, order] * np.sign(vectors[:, order].sum(0, keepdims=True) + 1e-12)
    x = u.T.reshape(params.channels, *grid).astype(np.float32)
    with torch.no_grad():
        _, eig, ortho = objective(torch.from_numpy(x), graph_sets, params.weight_eig, params.weight_ortho)
    # The eigenvectors are already orthonormal, so X = U S Vᵀ with U = X, S = V = I; orthogonalise() would
    # return an arbitrary rotation of them (all singular values tie at 1) and lose the eigenvalue order.
    return Solution(x, x.copy(), eig.numpy(), ortho.numpy(), np.zeros(0, np.float32), _names(graph_sets))


def _pool(v: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Average-pool columns of v (N, k) from ``grid`` to ``target``."""
    if grid == target:
        return v
    images = v.T.reshape(-1, 1, *grid)
    return F.adaptive_avg_pool2d(images, target).reshape(v.shape[1], -1).T


def _lift(v: torch.Tensor, grid: tuple[int, int], source: tuple[int, int]) -> torch.Tensor:
    """The adjoint of ``_pool``: spread coarse values back over the fine cells they average."""
    if grid == source:
        return v
    fine = torch.zeros(grid[0] * grid[1], v.shape[1], dtype=v.dtype, requires_grad=True)
    (pooled,) = torch.autograd.grad(_pool(fine, grid, source), fine, grad_outputs=v)
    return pooled


def _names(graph_sets: list[GraphSet]) -> list[str]:
    return [name for gs in graph_sets for name in gs.names]
