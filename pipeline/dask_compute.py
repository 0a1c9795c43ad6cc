"""Which scheduler runs the dask computations of a stage: a dask.distributed cluster when an address
is given, dask's local threaded scheduler otherwise. Results never depend on the choice: every
reduction is a fixed graph, combined in the same order whichever scheduler runs it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

from pipeline.errors import LdsError, one_line

CONNECT_TIMEOUT = "5s"  # how long to keep trying an unreachable scheduler before giving up
SPLIT_EVERY = 8  # partial results combined per task of a tree reduction

T = TypeVar("T")


@contextmanager
def dask_scheduler(address: str | None) -> Iterator[None]:
    """Run the dask computations inside on the distributed scheduler at ``address``
    (``tcp://host:8786``), or on dask's local threaded scheduler when ``address`` is None: as many
    threads as ``$OMP_NUM_THREADS`` (which Snakemake sets to the job's ``threads``), else one per core."""
    import dask

    if not address:
        threads = os.environ.get("OMP_NUM_THREADS", "")
        workers = {"num_workers": int(threads)} if threads.isdigit() and int(threads) > 0 else {}
        with dask.config.set(scheduler="threads", **workers):
            yield
        return
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=True)
    except (OSError, TimeoutError, ValueError) as error:
        reason = one_line(error) or type(error).__name__
        raise LdsError(
            f"cannot reach the dask scheduler at {address} ({reason}); start it with `dask scheduler` and "
            "`dask worker ADDRESS`, or leave out --dask-scheduler / LDS_DASK_SCHEDULER"
        ) from None
    with client:
        yield


def tree_reduce(parts: Sequence, combine: Callable[[list[T]], T], split_every: int = SPLIT_EVERY):
    """A dask.delayed that combines ``parts`` (delayed values) ``split_every`` at a time, level by
    level, always in the order given: the same graph, hence the same result, on any scheduler."""
    from dask import delayed

    if not parts:
        raise ValueError("tree_reduce needs at least one part")
    level = list(parts)
    while len(level) > 1:
        level = [delayed(combine)(level[i : i + split_every]) for i in range(0, len(level), split_every)]
    return level[0]
