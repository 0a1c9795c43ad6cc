"""The run journal: every computed, reused, resumed or failed item, and every artifact published or
released, is filed under ``<root>/.journal/<run>/`` (one small JSON file per event), which ``lds
summary`` and the tests read as the store's counters."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.store.arrays import ArtifactRef, Store

JOURNAL = ".journal"
RUN_ENV = "LDS_RUN"  # names the run a journal record belongs to (the Snakefile sets it per workflow run)


def current_run() -> str:
    """The run journal records are filed under: $LDS_RUN, or 'manual' for stages run by hand."""
    return os.environ.get(RUN_ENV) or "manual"


class Journal:
    """The journal of one store (``store.journal``)."""

    def __init__(self, store: Store):
        self.store = store

    def record(self, event: str, ref: ArtifactRef, item: str = "", **fields: Any) -> None:
        """File one journal event (computed, reused, resumed, failed) for an item or a whole artifact."""
        record = {"event": event, "stage": ref.stage, "key": ref.key, "item": item, "run": current_run(),
                  "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **fields}
        name = f"{ref.stage}.{ref.key}.{item or '-'}.{event}.{uuid.uuid4().hex[:12]}.json"
        folder = self.store.join(JOURNAL, record["run"])
        with self.store.writing(f"its journal ({JOURNAL}/{record['run']})"):
            self.store.fs.makedirs(folder, exist_ok=True)
            self.store.fs.pipe_file(f"{folder}/{name}", json.dumps(record).encode())

    def runs(self) -> list[str]:
        """Runs that have journal records, oldest first."""
        folder, fs = self.store.join(JOURNAL), self.store.fs
        if not fs.isdir(folder):
            return []
        entries = sorted(fs.ls(folder, detail=True), key=lambda e: (e.get("mtime") or 0, e["name"]))
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]

    def records(self, run: str | None = None) -> list[dict[str, Any]]:
        """Journal records of one run (every run when None)."""
        pattern = self.store.join(JOURNAL, run or "*", "*.json")
        return [json.loads(self.store.fs.cat_file(path)) for path in sorted(self.store.fs.glob(pattern))]

    def remove_run(self, run: str) -> None:
        """Delete one run's journal records (the artifacts they describe stay)."""
        self.store.fs.rm(self.store.join(JOURNAL, run), recursive=True)
