"""The dataset-level solver (METHOD.md sections 1-3, dataset mode): one X per image, solved jointly.

Each batch of images gets one sparse graph per attention layer (layers at ``resolution`` or coarser, heads
concatenated into one vector per token) over all the batch's tokens: every token keeps its ``intra`` most
similar tokens of its own image and its ``inter`` most similar of the other images (cosine similarity,
self excluded), similarities <= ``threshold`` are dropped, and the graph is symmetrised, (A + Aᵀ) / 2,
and row-normalised. ``kq`` graphs compare normalised queries with normalised keys, ``vv`` graphs
normalised values with each other. The neighbour search runs over row chunks, so memory is bounded by
the batch.

The images are split into batches by ``partitions`` fixed shuffles, epoch e using shuffle e mod
``partitions``: a batch's graphs are built once, the first time it comes round, and kept (in memory,
CSR with int32 indices) for the epochs that reuse it, so after the first ``partitions`` epochs an epoch
only optimises. Several partitions keep images of different batches meeting in a graph, which is what
makes a channel mean the same thing across the whole dataset; one fixed partition would solve each
batch on its own.

A table holds free logits (C x R x R) per image; X = softmax over channels. For each batch the solver
takes ``iterations`` AdamW steps on the batch's rows only (every image keeps its own moment estimates
and step count, like the reference code's one parameter per image), then updates an exponential moving
average of the whole table. What is evaluated is softmax(EMA): the EMA starts at zero and is divided by
1 - decay^updates, so it is the decay-weighted mean of the table over the updates so far.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.errors import LdsError
from pipeline.solve.params import DatasetSolverParams

CHUNK_ELEMENTS = 1 << 24  # similarities held at once by the neighbour search (64 MiB in float32)

# One image's graph operands per layer name: (left, right), each (y, x, features), heads concatenated.
Operands = tuple[np.ndarray, np.ndarray]
# (rows of the table, draw: the number of the batch since training began, for loaders that sample)
BatchLoader = Callable[[Sequence[int], int], list[dict[str, Operands]]]


@dataclass
class LayerGraph:
    """One layer's sparse row-stochastic graph over the tokens of a batch, images in batch order."""

    name: str
    grids: list[tuple[int, int]]  # the layer's token grid in each image of the batch
    matrix: torch.Tensor  # sparse CSR (T, T), T = sum of h * w over the batch: (A + Aᵀ) / 2 of the graph A
    weight: float  # resolution / r_l


def operand_names(graph: str) -> tuple[str, str]:
    """The stored arrays a graph kind compares: queries with keys, or values with values."""
    return ("q", "k") if graph == "kq" else ("v", "v")


def knn_graph(
    left: list[torch.Tensor], right: list[torch.Tensor], intra: int, inter: int, threshold: float,
    chunk_elements: int = CHUNK_ELEMENTS, search_dtype: torch.dtype = torch.float32, symmetrised: bool = False,
) -> torch.Tensor:
    """Sparse (T, T) random-walk graph A = D⁻¹ S over a batch's tokens, S = (W + Wᵀ) / 2 (COO);
    ``left[b]``, ``right[b]``: image b's (tokens, features) with unit-length rows. Row i of W links
    token i to its ``intra`` most similar tokens of its own image and ``inter`` of the others
    (similarity left_i · right_j, j != i), computed in ``search_dtype`` (bfloat16: several times
    faster on CPUs with bf16 units, similarities to about 3 significant digits, so near-ties at the k-th
    place can change). ``symmetrised``: (A + Aᵀ) / 2 instead, as CSR, what ``symmetric_part`` makes of A
    but without a second sort: S_ij (1/d_i + 1/d_j) / 2 on the support of S."""
    sizes = [part.shape[0] for part in left]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    total = offsets[-1]
    keys = torch.cat(right)
    search_keys = keys.to(search_dtype)
    rows_per_chunk = max(1, chunk_elements // total)
    # row i: its own image's neighbours first, then the others'; slots left empty stay at -inf
    values = torch.full((total, intra + inter), -torch.inf, device=keys.device)
    cols = torch.zeros((total, intra + inter), dtype=torch.int64, device=keys.device)
    for image, queries in enumerate(left):
        low, high = offsets[image], offsets[image + 1]
        own_count, other_count = min(intra, sizes[image] - 1), min(inter, total - sizes[image])
        for start in range(0, sizes[image], rows_per_chunk):
            stop = min(start + rows_per_chunk, sizes[image])
            rows = slice(low + start, low + stop)
            similarity = queries[start:stop].to(search_dtype) @ search_keys.T  # (chunk, T)
            chunk = torch.arange(stop - start, device=similarity.device)
            similarity[chunk, low + start + chunk] = -torch.inf  # self
            own = similarity[:, low:high].topk(own_count, dim=1, sorted=False)
            values[rows, :own_count], cols[rows, :own_count] = own.values.float(), own.indices + low
            similarity[:, low:high] = -torch.inf
            other = similarity.topk(other_count, dim=1, sorted=False)
            values[rows, intra : intra + other_count], cols[rows, intra : intra + other_count] = other.values.float(), other.indices
    keep = values > threshold
    row = torch.arange(total, device=keys.device)[:, None].expand_as(cols)[keep]
    col, value = cols[keep], values[keep] / 2
    symmetric = torch.sparse_coo_tensor(
        torch.stack([torch.cat([row, col]), torch.cat([col, row])]), torch.cat([value, value]), (total, total),
        check_invariants=False,
    ).coalesce()
    (row, col), value = symmetric.indices(), symmetric.values()
    degree = torch.zeros(total, dtype=value.dtype, device=value.device).index_add_(0, row, value)
    value = value * (1 / degree[row] + 1 / degree[col]) / 2 if symmetrised else value / degree[row]
    graph = torch.sparse_coo_tensor(symmetric.indices(), value, (total, total), is_coalesced=True, check_invariants=False)
    return compact_csr(graph) if symmetrised else graph


def compact_csr(graph: torch.Tensor) -> torch.Tensor:
    """A coalesced sparse COO matrix as CSR with int32 indices (the graph cache's size)."""
    with warnings.catch_warnings():  # CSR is "beta" in torch, and twice as fast as COO here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = graph.to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                       check_invariants=False)


def symmetric_part(graph: torch.Tensor) -> torch.Tensor:
    """(A + Aᵀ) / 2 as sparse CSR with int32 indices: it has the quadratic forms of A (zᵀ A z) and is
    its own transpose."""
    return compact_csr(((graph + graph.t()) / 2).coalesce())


class _SymmetricProduct(torch.autograd.Function):
    """S @ Z for a sparse symmetric S, whose gradient S @ grad needs no transpose of S."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ctx.matrix = matrix
        return matrix @ z

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, ctx.matrix @ grad


def batch_graphs(images: list[dict[str, Operands]], params: DatasetSolverParams, device: str = "cpu") -> list[LayerGraph]:
    """One kNN graph per layer over the tokens of a batch of images (each a dict layer -> operands)."""

    def unit_rows(array: np.ndarray) -> torch.Tensor:
        tokens = torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device).flatten(0, 1)
        return F.normalize(tokens, dim=-1)

    graphs = []
    for name in images[0]:
        grids = [tuple(image[name][0].shape[:2]) for image in images]
        left = [unit_rows(image[name][0]) for image in images]
        right = [unit_rows(image[name][1]) for image in images]
        matrix = knn_graph(left, right, params.intra, params.inter, params.threshold,
                           search_dtype=getattr(torch, params.search), symmetrised=True)
        coarsest_side = max(max(grid) for grid in grids)
        graphs.append(LayerGraph(name, grids, matrix, params.resolution / coarsest_side))
    return graphs


def pooled_tokens(x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """X (B, C, H, W) average-pooled to each image's grid, flattened over all tokens of the batch in
    batch order, as (T, C) with unit-length columns."""
    pieces, rows, start = [], [torch.empty(0, dtype=torch.int64)] * len(grids), 0
    for grid in dict.fromkeys(grids):  # images that share a grid are pooled together
        members = [b for b, g in enumerate(grids) if g == grid]
        pooled = F.adaptive_avg_pool2d(x if len(members) == len(grids) else x[members], grid)
        pieces.append(pooled.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))  # (members * h * w, C)
        size = grid[0] * grid[1]
        for i, b in enumerate(members):
            rows[b] = torch.arange(start + i * size, start + (i + 1) * size)
        start += len(members) * size
    z = pieces[0] if len(pieces) == 1 else torch.cat(pieces)[torch.cat(rows).to(x.device)]
    return z / z.norm(dim=0, keepdim=True).clamp_min(1e-12)


def dataset_objective(
    x: torch.Tensor, graphs: list[LayerGraph], weight_eig: float, weight_ortho: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, eigenvalues (layer, channel) and orthogonality (layer,) for non-negative X (B, C, H, W):
    w_e * mean over layers and channels of w_l |diag(Zᵀ A Z) - 1| + w_o * mean over layers of w_l times
    the mean squared off-diagonal of Zᵀ Z, with w_l = resolution / r_l."""
    channels = x.shape[1]
    off_diagonal = ~torch.eye(channels, dtype=torch.bool, device=x.device)
    eigenvalues, orthogonality = [], []
    for graph in graphs:
        z = pooled_tokens(x, graph.grids)
        eigenvalues.append((z * _SymmetricProduct.apply(graph.matrix, z)).sum(0))
        orthogonality.append((z.T @ z)[off_diagonal].pow(2).mean())
    eig, ortho = torch.stack(eigenvalues), torch.stack(orthogonality)
    weights = torch.tensor([graph.weight for graph in graphs], dtype=x.dtype, device=x.device)
    loss = weight_eig * (weights[:, None] * (eig - 1).abs()).mean() + weight_ortho * (weights * ortho).mean()
    return loss, eig, ortho


def adamw_rows(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor,
    lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> None:
    """One AdamW step, in place, on rows (dim 0) that each have their own step count ``steps`` (rows,),
    already incremented; the same arithmetic as torch.optim.AdamW."""
    shape = (-1,) + (1,) * (param.dim() - 1)
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    step_size = (lr / (1 - betas[0] ** steps.double())).to(param.dtype).view(shape)
    correction2_sqrt = (1 - betas[1] ** steps.double()).sqrt().to(param.dtype).view(shape)
    param.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps))


class DatasetSolver:
    """The parameter table, its per-image AdamW state and its EMA; ``train`` resumes at ``epoch``."""

    def __init__(self, images: int, params: DatasetSolverParams, device: str = "cpu"):
        self.params, self.device = params, device
        generator = torch.Generator().manual_seed(params.seed)
        shape = (images, params.channels, params.resolution, params.resolution)
        self.logits = torch.randn(shape, generator=generator)
        self.exp_avg = torch.zeros(shape)
        self.exp_avg_sq = torch.zeros(shape)
        self.steps = torch.zeros(images, dtype=torch.int64)
        self.ema = torch.zeros(shape)
        self.ema_updates = 0
        self.epoch = 0
        self.losses: list[list[float]] = []  # (epoch, batch): loss at the last iteration of each batch
        self.graph_cache: dict[tuple[int, int], list[LayerGraph]] = {}  # (partition, batch) -> its graphs

    @property
    def images(self) -> int:
        return self.logits.shape[0]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's partition of the images: shuffle epoch mod ``partitions``, drawn from (seed, that
        number), in near-equal batches of at most ``batch_size``; every image once per epoch, the same
        batches however the run is interrupted."""
        order = np.random.default_rng([self.params.seed, epoch % self.params.partitions]).permutation(self.images)
        return np.array_split(order, math.ceil(self.images / self.params.batch_size))

    def graphs_of(self, epoch: int, batches: list[np.ndarray], number: int, load_batch: BatchLoader) -> list[LayerGraph]:
        """The graphs of ``batches[number]`` (the epoch's partition): built from ``load_batch(rows, draw)``
        the first time (draw = partition * batches + number, so a rebuild after a resume is identical),
        then taken from the cache."""
        key = (epoch % self.params.partitions, number)
        if key not in self.graph_cache:
            images = load_batch(batches[number].tolist(), key[0] * len(batches) + number)
            self.graph_cache[key] = batch_graphs(images, self.params, self.device)
        return self.graph_cache[key]

    def train_batch(self, rows: np.ndarray, graphs: list[LayerGraph]) -> float:
        """``iterations`` AdamW steps on the batch's rows of the table, then one EMA update."""
        p = self.params
        index = torch.from_numpy(rows)
        logits, exp_avg, exp_avg_sq = (t[index].to(self.device) for t in (self.logits, self.exp_avg, self.exp_avg_sq))
        steps = self.steps[index].to(self.device)
        for _ in range(p.iterations):
            logits.requires_grad_(True)
            loss, _, _ = dataset_objective(torch.softmax(logits, dim=1), graphs, p.weight_eig, p.weight_ortho)
            (grad,) = torch.autograd.grad(loss, logits)
            logits = logits.detach()
            steps += 1
            adamw_rows(logits, grad, exp_avg, exp_avg_sq, steps, p.lr, p.weight_decay)
        self.logits[index], self.exp_avg[index], self.exp_avg_sq[index] = logits.cpu(), exp_avg.cpu(), exp_avg_sq.cpu()
        self.steps[index] = steps.cpu()
        self.ema.mul_(p.ema).add_(self.logits, alpha=1 - p.ema)
        self.ema_updates += 1
        return loss.item()

    def train(self, load_batch: BatchLoader, on_epoch: Callable[["DatasetSolver"], None] | None = None,
              progress: bool = False) -> None:
        """Run the epochs left, each batch's graphs built once from ``load_batch(rows, draw)`` and cached;
        ``on_epoch`` is called after every epoch (to save a checkpoint)."""
        for epoch in tqdm(range(self.epoch, self.params.epochs), desc="epochs", initial=self.epoch,
                          total=self.params.epochs, disable=not progress):
            losses = []
            batches = self.batches(epoch)
            for number, rows in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress)):
                losses.append(self.train_batch(rows, self.graphs_of(epoch, batches, number, load_batch)))
            self.losses.append(losses)
            self.epoch = epoch + 1
            if on_epoch is not None:
                on_epoch(self)

    def solution(self) -> np.ndarray:
        """X (images, C, R, R) = softmax over channels of the bias-corrected EMA of the logits."""
        average = self.ema / (1 - self.params.ema**self.ema_updates)
        return torch.softmax(average, dim=1).numpy()

    def state_dict(self) -> dict:
        return {
            "params": self.params.solver_settings(), "logits": self.logits, "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq, "steps": self.steps, "ema": self.ema,
            "ema_updates": self.ema_updates, "epoch": self.epoch, "losses": self.losses,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; it must come from the same parameters and number of images."""
        if state["params"] != self.params.solver_settings() or state["logits"].shape != self.logits.shape:
            raise ValueError("the saved state belongs to other parameters or another number of images")
        for name in ("logits", "exp_avg", "exp_avg_sq", "steps", "ema"):
            setattr(self, name, state[name])
        self.ema_updates, self.epoch, self.losses = state["ema_updates"], state["epoch"], state["losses"]


def dataset_orthogonalise(x: np.ndarray) -> np.ndarray:
    """X_ortho for the whole dataset at once: X (images, C, H, W) with each channel unit-length over all
    tokens of all images, X = U S Vᵀ over those tokens, X_ortho = U S = X V (decreasing singular values).
    One basis for every image, so a component means the same thing in each (per-image SVDs would rotate
    differently per image). Computed from the C x C Gram matrix, never the (tokens, C) SVD."""
    def unit(image: np.ndarray, norms: np.ndarray | float = 1.0) -> np.ndarray:  # (C, tokens), float64
        return image.reshape(image.shape[0], -1).astype(np.float64) / norms

    norms = np.maximum(np.sqrt(sum((unit(image) ** 2).sum(1) for image in x)), 1e-12)[:, None]
    gram = sum(unit(image, norms) @ unit(image, norms).T for image in x)
    basis = np.linalg.eigh(gram)[1][:, ::-1]
    return np.stack([(basis.T @ unit(image, norms)).reshape(image.shape) for image in x]).astype(np.float32)


# ------------------------------------------------------------------------- the stage's work (lds solve-dataset)


def layer_grid(array) -> tuple[int, int]:
    """The token grid of a stored q/k/v array: (head, y, x, dim), (timestep, head, y, x, dim), or heads
    already concatenated (y, x, dim)."""
    return tuple(array.shape[-3:-1])


def read_operands(image, layers: list[str], graph: str, resolution: int, item: str, pick: np.random.Generator) -> dict:
    """The graph operands (heads concatenated) of one image's chosen layers, from `lds extract` arrays.
    Where several timesteps are stored (Stable Diffusion), ``pick`` draws one, the same for every layer."""
    from pipeline.extract.core import join_heads, stored_array

    stored = image["layers"]
    missing = [name for name in layers if name not in stored]
    if missing:
        raise LdsError(f"image {item} has no layer {missing[0]}; all shards must come from the same model")
    left_name, right_name = operand_names(graph)
    first = stored[layers[0]][left_name]
    timestep = int(pick.integers(first.shape[0])) if first.ndim == 5 else ...

    def read(name: str, array: str) -> np.ndarray:
        return join_heads(stored_array(stored[name], array, timestep))

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


def dataset_layers(image, params: DatasetSolverParams, artifact: str = "the extract artifact") -> list[str]:
    """The layers the solver reads, by one image's stored ones (``image``: an extract item group): those at
    ``params.resolution`` or coarser that ``params.layers`` names (default: all). ``artifact`` names the
    extract in the error when there is none."""
    from pipeline.extract.core import is_coarse

    grids = {name: layer_grid(group[operand_names(params.graph)[0]]) for name, group in sorted(image["layers"].groups())}
    coarse = [name for name, grid in grids.items() if is_coarse(grid, params.resolution)]
    if not coarse:
        coarsest = min(grids.values(), key=lambda g: g[0] * g[1]) if grids else None
        raise LdsError(f"{artifact} has no attention layer at {params.resolution}x{params.resolution} or coarser "
                       f"(coarsest: {coarsest}); preprocess to a smaller size or raise --resolution")
    return pick_layers(coarse, params.layers)


def save_checkpoint(store, state: dict, name: str) -> None:
    """Write the solver state into the store (a pipeline.store.Store), whole or not at all."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_file(name, buffer.getvalue())


def load_checkpoint(store, name: str) -> dict | None:
    """The solver state saved under ``name``, or None when there is none."""
    data = store.read_file(name)
    return None if data is None else torch.load(io.BytesIO(data), weights_only=True)


@dataclass
class JointSolution:
    """What `lds solve-dataset` publishes: X (image, C, R, R), the dataset's X_ortho, the losses (epoch, batch)."""

    x: np.ndarray
    x_ortho: np.ndarray
    losses: np.ndarray

    def item_arrays(self, image: int) -> dict:
        """The arrays of one image (its row of the table), as `lds solve` names them."""
        from pipeline.store import ArraySpec

        return {
            "X": ArraySpec(self.x[image], ("channel", "y", "x"), {"description": "pseudo-eigenvectors X (softmax over channels), EMA of the dataset-level solver"}),
            "X_ortho": ArraySpec(self.x_ortho[image], ("component", "y", "x"), {"description": "X re-orthogonalised by one SVD over the whole dataset (U S), decreasing order"}),
        }

    def root_arrays(self) -> dict:
        from pipeline.store import ArraySpec

        return {"losses": ArraySpec(self.losses, ("epoch", "batch"), {"description": "loss at the last iteration of each batch"})}


def solve_jointly(
    images: list[tuple[Any, str]], layers: list[str], params: DatasetSolverParams, device: str = "cpu",
    state: dict | None = None, on_epoch: Callable[[DatasetSolver], None] | None = None, progress: bool = False,
) -> JointSolution:
    """`lds solve-dataset`'s work: one X per image of ``images`` ((the items group of its extract artifact, its
    name), in the table's order; each read when its batch is first built), solved jointly on ``layers`` (``dataset_layers``), operands drawn reproducibly per (seed, batch
    draw, row). ``state``: a checkpoint to resume from; ``on_epoch(solver)`` runs after every epoch (to save
    one)."""

    def load_batch(rows: Sequence[int], draw: int) -> list[dict[str, Operands]]:
        return [read_operands(images[r][0][images[r][1]], layers, params.graph, params.resolution, images[r][1],
                              np.random.default_rng([params.seed, draw, r])) for r in rows]

    solver = DatasetSolver(len(images), params, device)
    if state is not None:
        solver.load_state_dict(state)
    solver.train(load_batch, on_epoch, progress)
    x = solver.solution()
    return JointSolution(x, dataset_orthogonalise(x), np.array(solver.losses, dtype=np.float32))
