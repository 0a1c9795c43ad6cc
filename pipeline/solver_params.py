"""Solver settings: plain data, importable without torch (the CLI needs them before any work)."""

from __future__ import annotations

from dataclasses import dataclass, field

SOLVERS = ("adam", "exact")
GRAPH_KINDS = ("kq", "vv")  # key-query ("where") or value-value ("what")
VARIANTS = ("random-walk", "laplacian")
PARAMETERISATIONS = ("free", "convnet")
INITS = ("random", "exact")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class GraphOptions:
    """Which graphs the solver sees: their kind, normalisation, and a selection of layers and heads."""

    kind: str = "kq"
    variant: str = "random-walk"
    layers: tuple[str, ...] = ()  # names or indices; empty = all
    heads: tuple[int, ...] = ()  # empty = all


@dataclass(frozen=True)
class SolverParams:
    """Defaults follow the paper's per-image runs (METHOD.md sections 2-3)."""

    channels: int = 15
    steps: int = 1000
    lr: float = 1e-3
    weight_eig: float = 2.0
    weight_ortho: float = 2.0
    seed: int = 0
    parameterisation: str = "convnet"  # converges far faster than free features (benchmarks/bench_solver.py)
    init: str = "random"
    accumulate: int = 1  # passes per step, each drawing an attention set (timestep) from the buffer
    buffer: int = 5  # attention sets kept (Stable Diffusion timesteps)
    refresh: float = 0.25  # probability that a pass draws a new attention set into the buffer
    device: str = "auto"
    graphs: GraphOptions = field(default_factory=GraphOptions)
