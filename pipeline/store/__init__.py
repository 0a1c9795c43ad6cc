"""The artifact store, in three parts: ``arrays`` (the content-addressed Zarr store: open, read, write,
publish), ``journal`` (the run journal, ``store.journal``) and ``maintenance`` (verify, reachable,
release); ``integrity`` checks every chunk on read, ``zarr_files`` encodes what ``arrays`` writes."""

from pipeline.store.arrays import ArraySpec, ArtifactRef, ArtifactWriter, Store, array_checksum, read_group, walk_arrays, write_arrays
from pipeline.store.journal import Journal, current_run

__all__ = ["ArraySpec", "ArtifactRef", "ArtifactWriter", "Journal", "Store", "array_checksum", "current_run", "read_group", "walk_arrays", "write_arrays"]
