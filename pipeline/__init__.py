"""lds: layer-distributed spectral clustering of the attention inside vision models.

The library: pure functions and small classes. The click commands live in ``stages/``.
"""

__version__ = "0.1.0"
