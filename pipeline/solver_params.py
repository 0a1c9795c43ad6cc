"""Solver settings: plain data, importable without torch (the CLI needs them before any work)."""

from __future__ import annotations

from dataclasses import dataclass

SOLVERS = ("adam", "exact")


@dataclass(frozen=True)
class SolverParams:
    channels: int = 15
    steps: int = 1000
    lr: float = 1e-3
    weight_eig: float = 2.0
    weight_ortho: float = 2.0
    seed: int = 0


