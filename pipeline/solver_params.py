"""Solver settings: plain data, importable without torch (the CLI needs them before any work)."""

from __future__ import annotations

from dataclasses import dataclass, field

SOLVERS = ("adam", "exact")
GRAPH_KINDS = ("kq", "vv")  # key-query ("where") or value-value ("what")
VARIANTS = ("random-walk", "laplacian")
PARAMETERISATIONS = ("free", "convnet")
INITS = ("random", "exact")
DEVICES = ("auto", "cpu", "cuda")
STABLE_DIFFUSION_PASSES = 20  # passes per Adam step with several attention sets (METHOD.md section 3)


def resolve_accumulate(accumulate: int | str, attention_sets: int) -> int:
    """Passes per Adam step: an int as given; "auto" -> 20 for several attention sets (Stable Diffusion
    timesteps), 1 for a single one (ViTs, whose passes would be identical)."""
    if accumulate == "auto":
        return STABLE_DIFFUSION_PASSES if attention_sets > 1 else 1
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate {accumulate!r}: expected auto or an integer >= 1")
    return accumulate


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
    accumulate: int | str = "auto"  # passes per step, each drawing an attention set; see resolve_accumulate
    buffer: int = 5  # attention sets kept (Stable Diffusion timesteps)
    refresh: float = 0.25  # probability that a pass draws a new (unbuffered) attention set into the buffer
    device: str = "auto"
    graphs: GraphOptions = field(default_factory=GraphOptions)
