"""The cached item loop every stage runs: failures are recorded, kept apart, and retried alone."""

import os

import numpy as np
import pytest

from pipeline.errors import LdsError
from pipeline.store import ArraySpec, Store
from pipeline.store.maintenance import verify
from pipeline.evaluate.summary import summarise
from stages.common import FAILURE_LIMIT, run_stage


def _result(value: float):
    return {"x": ArraySpec(np.full(3, value), ("i",))}, {}, {}


def _run(store: Store, items: list[str], broken: set[str]):
    def compute(item: str):
        if item in broken:
            raise OSError(f"disk hiccup reading {item}")
        return _result(float(len(item)))

    return run_stage(store, "preprocess", {"p": 1}, ["in"], [], items, compute, {}, None)


def _events(store: Store, event: str) -> list[str]:
    return sorted(r["item"] for r in store.journal.records() if r["event"] == event)


def test_a_failed_item_is_listed_and_a_rerun_retries_only_it(tmp_path, monkeypatch):
    store = Store(tmp_path)
    items = ["a", "b", "c"]
    monkeypatch.setenv("LDS_RUN", "first")
    with pytest.raises(LdsError, match=r"1 of 3 items failed \(b\).*retries only the failed"):
        _run(store, items, broken={"b"})
    assert store.artifacts() == [] and len(store.partials()) == 1
    failures = [r for r in store.journal.records("first") if r["event"] == "failed"]
    assert [(r["item"], r["error"]) for r in failures] == [("b", "disk hiccup reading b")]
    assert _events(store, "computed") == ["a", "c"]

    monkeypatch.setenv("LDS_RUN", "second")
    ref = _run(store, items, broken=set())
    assert _events(store, "computed") == ["a", "b", "c"]  # b once more, a and c never again
    assert [r["items"] for r in store.journal.records("second") if r["event"] == "resumed"] == [2]
    assert store.attrs(ref)["items"] == items and verify(store, ref) == []

    monkeypatch.setenv("LDS_RUN", "third")
    _run(store, items, broken=set(items))  # cached: nothing is computed, so nothing can fail
    assert [r["event"] for r in store.journal.records("third")] == ["reused"]
    assert store.journal.runs() == ["first", "second", "third"]


def test_prune_journal_keeps_the_newest_runs_and_every_artifact(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stages.cli import cli

    store = Store(tmp_path)
    for age, run in enumerate(("run-b", "run-a", "run-c")):  # filed in this order: the oldest is not the first by name
        monkeypatch.setenv("LDS_RUN", run)
        ref = _run(store, ["a", "b"], broken=set())
        os.utime(tmp_path / ".journal" / run, (1e9 + age, 1e9 + age))  # distinct times on any file system
    assert store.journal.runs() == ["run-b", "run-a", "run-c"]
    prune = ["cache", "prune-journal", "--keep", "1", "--store", str(tmp_path)]
    dry = CliRunner().invoke(cli, [*prune, "--dry-run"])
    assert dry.exit_code == 0 and "would remove journal of run run-b" in dry.output and len(store.journal.runs()) == 3
    done = CliRunner().invoke(cli, prune)
    assert done.exit_code == 0 and "1 runs kept, 2 removed" in done.output
    assert store.journal.runs() == ["run-c"] and store.artifacts() == [ref] and verify(store, ref) == []


def test_a_stage_whose_first_items_all_fail_stops_early(tmp_path):
    store = Store(tmp_path)
    items = [f"img{i}" for i in range(FAILURE_LIMIT + 5)]
    with pytest.raises(LdsError, match=f"the first {FAILURE_LIMIT} items all failed"):
        _run(store, items, broken=set(items))
    assert len(_events(store, "failed")) == FAILURE_LIMIT


def test_summary_counts_each_run_and_lists_failures_until_they_are_computed(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stages.cli import cli

    store = Store(tmp_path)
    monkeypatch.setenv("LDS_RUN", "first")
    with pytest.raises(LdsError):
        _run(store, ["a", "b", "c"], broken={"b"})
    monkeypatch.setenv("LDS_RUN", "second")
    _run(store, ["a", "b", "c"], broken=set())
    _run(store, ["a", "b", "c"], broken=set())

    first = summarise(store.journal.records("first"))
    assert first["stages"][0] | {"seconds_per_item": None, "seconds": 0} == {
        "stage": "preprocess", "made": 0, "computed": 2, "reused": 0, "resumed": 0, "failed": 1, "seconds_per_item": None, "seconds": 0,
        "mb_stored": None, "mb_per_image": None}
    assert [(f["item"], f["error"]) for f in first["failed"]] == [("b", "disk hiccup reading b")]
    second = summarise(store.journal.records("second"))["stages"][0]
    assert (second["made"], second["computed"], second["resumed"], second["reused"], second["failed"]) == (1, 1, 2, 3, 0)
    assert summarise(store.journal.records())["failed"] == []  # b was computed after it failed

    result = CliRunner().invoke(cli, ["summary", "--run", "first", "--store", str(tmp_path), "--output", str(tmp_path / "s.md")])
    assert result.exit_code == 0, result.output
    assert "| preprocess | 0 | 2 | 0 | 0 | 1 |" in result.output and "- preprocess b" in result.output
    assert (tmp_path / "s.json").is_file() and "disk hiccup" in (tmp_path / "s.md").read_text()
    latest = CliRunner().invoke(cli, ["summary", "--store", str(tmp_path)])
    assert "# lds run second" in latest.output
