"""A run's summary from the store's journal: per stage, the artifacts made, the items computed, reused,
resumed or failed, the seconds each computed item took and the seconds spent making artifacts."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

COLUMNS = ("stage", "made", "computed", "reused", "resumed", "failed", "seconds_per_item", "seconds")


def summarise(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts per stage and the items still failed (failed and not computed later in these records).

    Records are the journal's: ``computed`` and ``failed`` name one item; ``reused`` (an artifact
    found in the store) and ``resumed`` (items an interrupted run had left) carry an item count;
    ``published`` (an artifact made) its seconds, whole-artifact work such as evaluate's included.
    """
    stages: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"made": 0, "computed": 0, "reused": 0, "resumed": 0, "item_seconds": 0.0, "seconds": 0.0})
    failures: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r["time"]):
        row = stages[record["stage"]]
        where = (record["stage"], record["key"], record["item"])
        if record["event"] == "computed":
            row["computed"] += 1
            row["item_seconds"] += record.get("seconds", 0.0)
            failures.pop(where, None)
        elif record["event"] == "failed":
            failures[where] = record
        elif record["event"] in ("reused", "resumed"):
            row[record["event"]] += record["items"]
        elif record["event"] == "published":
            row["made"] += 1
            row["seconds"] += record.get("seconds", 0.0)
    table = []
    for stage, row in sorted(stages.items()):
        failed = sum(1 for (s, _, _) in failures if s == stage)
        per_item = row["item_seconds"] / row["computed"] if row["computed"] else None
        table.append({"stage": stage, "made": row["made"], "computed": row["computed"], "reused": row["reused"],
                      "resumed": row["resumed"], "failed": failed, "seconds_per_item": per_item,
                      "seconds": round(row["seconds"], 3)})
    failed_items = [{"stage": r["stage"], "key": r["key"], "item": r["item"], "error": r.get("error", "")}
                    for r in failures.values()]
    return {"stages": table, "failed": sorted(failed_items, key=lambda f: (f["stage"], f["item"]))}


def summary_markdown(summary: dict[str, Any], run: str) -> str:
    """The summary as a markdown table, then one line per failed item with its reason."""
    lines = [f"# lds run {run}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in summary["stages"]:
        seconds = "-" if row["seconds_per_item"] is None else f"{row['seconds_per_item']:.2f}"
        counts = " | ".join(str(row[column]) for column in COLUMNS[1:6])
        lines.append(f"| {row['stage']} | {counts} | {seconds} | {row['seconds']:.1f} |")
    if summary["failed"]:
        lines += ["", f"## {len(summary['failed'])} failed items (a re-run retries only these)", ""]
        lines += [f"- {f['stage']} {f['item']} ({f['key'][:8]}): {f['error']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"
