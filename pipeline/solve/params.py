"""Solver settings: plain data, importable without torch (the CLI needs them before any work).

``SolverParams`` is `lds solve`'s every setting (its click options and config/schema.yaml's ``solve``
section are derived from it, pipeline/settings.py); ``GraphOptions``, the graphs the solver sees, is built
from it. ``DatasetSolverParams`` is `lds solve-dataset`'s (the ``solve_dataset`` section).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.settings import setting

SOLVERS = ("adam", "exact")
GRAPH_KINDS = ("kq", "vv")  # key-query ("where") or value-value ("what")
VARIANTS = ("random-walk", "laplacian")
PARAMETERISATIONS = ("free", "convnet")
INITS = ("random", "exact")
DEVICES = ("auto", "cpu", "cuda")
STABLE_DIFFUSION_PASSES = 20  # passes per Adam step with several attention sets (METHOD.md section 3)
# what makes an adam run's artifact beside the solver, its graphs and channels (`lds solve`'s params)
ADAM_SETTINGS = ("steps", "lr", "weight_eig", "weight_ortho", "seed", "parameterisation", "init", "accumulate", "buffer", "refresh")


def resolve_accumulate(accumulate: int | str, attention_sets: int) -> int:
    """Passes per Adam step: an int as given; "auto" -> 20 for several attention sets (Stable Diffusion
    timesteps), 1 for a single one (ViTs, whose passes would be identical)."""
    if accumulate == "auto":
        return STABLE_DIFFUSION_PASSES if attention_sets > 1 else 1
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate {accumulate!r}: expected auto or an integer >= 1")
    return accumulate


@dataclass(frozen=True)
class SolverParams:
    """`lds solve` (METHOD.md sections 2-3): defaults follow the paper's per-image runs. The config's
    ``solve.graph`` is a list of kinds, each its own run (a workflow key), so ``kind`` (``--graph``) is
    no config key."""

    solver: str = setting("adam", choices=SOLVERS, help="adam: the paper's optimisation; exact: eigenvectors of the summed graphs (fast).")
    kind: str = setting("kq", choices=GRAPH_KINDS, option="--graph", config=False,
                        help="kq: key-query attention ('where'); vv: value-value cosine similarity ('what').")
    variant: str = setting("random-walk", choices=VARIANTS, help="Graph normalisation (laplacian: the reference code's option).")
    layers: tuple[str, ...] = setting((), help="Layer names or indices (0, -1), comma-separated (the config: a list); default: all.",
                                      schema={"items": {"type": ["integer", "string"], "pattern": "^[^,]+$"}})
    heads: tuple[int, ...] = setting((), help="Head indices, comma-separated (the config: a list); default: all.",
                                     schema={"items": {"type": "integer", "minimum": 0}})
    # convnet converges far faster than free features (benchmarks/bench_solver.py)
    parameterisation: str = setting("convnet", choices=PARAMETERISATIONS,
                                    help="convnet: the reference code's conv net over a learned input; free: X's logits optimised directly.")
    channels: int = setting(15, minimum=2, help="Number of eigenvectors m.")
    steps: int = setting(1000, minimum=1, help="Adam steps.")
    lr: float = setting(1e-3, exclusive_minimum=0, help="Adam learning rate.")
    weight_eig: float = setting(2.0, minimum=0, help="Weight of the eigenvalue term mean|diag(Zᵀ A Z) - 1|.")
    weight_ortho: float = setting(2.0, minimum=0, help="Weight of the orthogonality term mean(offdiag(Zᵀ Z)²).")
    init: str = setting("random", choices=INITS, help="exact: warm-start Adam from the exact solver's eigenvectors (free features only).")
    accumulate: int | str = setting(  # see resolve_accumulate
        "auto", schema={"oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]},
        help=f"Passes per Adam step, each drawing an attention set; auto: {STABLE_DIFFUSION_PASSES} when the images have several "
             "(Stable Diffusion timesteps), else 1.")
    buffer: int = setting(5, minimum=1, help="Attention sets (Stable Diffusion timesteps) kept in the buffer.")
    refresh: float = setting(0.25, minimum=0, maximum=1, help="Probability that a pass draws a new attention set, one not in the buffer.")
    seed: int = setting(0, help="Seed of X's initialisation and of the buffer's draws.")
    device: str = setting("auto", choices=DEVICES, help="auto: CUDA when present; cuda also asks the workflow's solve jobs for a GPU (resource gpu=1).")
    layer_diagnostics: bool = setting(
        True, flag="--layer-diagnostics/--no-layer-diagnostics",
        help="Also store each layer's own X-Y R² (layer_xy_r2: which layers carry position) and, for the exact solver, each "
             "graph's eigenvalues diag(Zᵀ A Z) and orthogonality (the per-head agreement of layers.csv, layers.png). The same X "
             "either way; without them the exact solver builds each graph once and keeps none, 5x faster on a CPU, so whole "
             "datasets may leave them out.")

    @property
    def graphs(self) -> GraphOptions:
        """The graphs the solver sees."""
        return GraphOptions(self.kind, self.variant, self.layers, self.heads)

    def artifact_params(self) -> dict:
        """The params of the `lds solve` artifact: the solver, its channels and graphs, and for adam its
        settings (``accumulate`` as resolved: auto and its value make the same artifact); not the device;
        ``layer_diagnostics`` only when off."""
        params = {"solver": self.solver, "channels": self.channels, "graphs": asdict(self.graphs)}
        params |= {} if self.layer_diagnostics else {"layer_diagnostics": False}  # the default's keys stay as they were
        return params | ({name: getattr(self, name) for name in ADAM_SETTINGS} if self.solver == "adam" else {})


@dataclass(frozen=True)
class GraphOptions:
    """Which graphs the solver sees: their kind, normalisation, and a selection of layers and heads
    (empty: all); the defaults are `lds solve`'s."""

    kind: str = SolverParams.kind
    variant: str = SolverParams.variant
    layers: tuple[str, ...] = ()  # names or indices
    heads: tuple[int, ...] = ()


@dataclass(frozen=True)
class DatasetSolverParams:
    """`lds solve-dataset` (METHOD.md dataset mode): defaults are the paper's. Fields without a setting
    are fixed (no option); ``layers`` and ``device`` choose what is read and where, not the solver's
    arithmetic (``solver_settings``)."""

    graph: str = setting("vv", choices=("vv", "kq"),
                         help="vv: value-value ('what'); kq: normalised query against normalised key ('where'). The dataset "
                              "level's one graph kind (solve.graph lists the per-image runs).")
    search: str = "bfloat16"  # dtype of the similarities of the neighbour search (float32: exact)
    channels: int = setting(100, minimum=2, help="Channels C of X per image.")
    resolution: int = setting(32, minimum=1, help="X is C x R x R; layers finer than R x R are skipped.")
    batch_size: int = setting(40, minimum=1, help="Images per batch (per kNN graph).")
    iterations: int = setting(5, minimum=1, help="AdamW steps per batch.")
    epochs: int = setting(100, minimum=1, help="Passes over the dataset.")
    partitions: int = setting(2, minimum=1, help="Fixed shuffles of the images into batches, cycled over the epochs; each "
                                                 "batch's graphs are built once and kept in memory.")
    lr: float = setting(1e-2, exclusive_minimum=0, help="AdamW learning rate.")
    weight_decay: float = 0.0
    ema: float = setting(0.99, minimum=0, exclusive_maximum=1, help="Decay of the moving average of X, one update per batch.")
    layers: str | None = setting(None, help="Comma-separated layer names or indices among those at --resolution or coarser (default: all).")
    intra: int = setting(50, minimum=0, help="Neighbours per token in its own image.")
    inter: int = setting(50, minimum=0, help="Neighbours per token in the batch's other images.")
    threshold: float = setting(0.1, help="Similarities at or below it are dropped.")
    weight_eig: float = 1.0
    weight_ortho: float = 1.0
    seed: int = setting(0, minimum=0, help="Seed of the logits' initialisation, the partitions and the timesteps drawn.")
    device: str = setting("auto", config=False, help="auto (cuda when present), cpu, cuda, cuda:N.")

    def solver_settings(self) -> dict:
        """What the solution depends on, ``layers`` and ``device`` aside: the artifact's params before its
        resolved layers, and what a checkpoint must match."""
        return {name: value for name, value in asdict(self).items() if name not in ("layers", "device")}
