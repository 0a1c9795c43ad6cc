"""Solving: attention graphs, the per-image and dataset-level pseudo-eigenvector solvers, their settings,
per-layer agreement, and the TokenCut / MaskCut baselines."""
