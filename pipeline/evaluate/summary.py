"""A run's summary from the store's journal: per stage, the artifacts made, the items computed, reused,
resumed or failed, the seconds each computed item took and the seconds spent making artifacts, and the
bytes its artifacts hold in the store (per stage, and per image of the run)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

COLUMNS = ("stage", "made", "computed", "reused", "resumed", "failed", "seconds_per_item", "seconds", "MB_stored", "MB_per_image")
MB = 1e6
# a failed item's fate: its stage published without it (within max_failed), or stopped (a re-run retries it)
LEFT_OUT, RETRIED = "left out of the results", "its stage stopped; a re-run retries it"


def summarise(records: Iterable[dict[str, Any]], artifacts: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Counts per stage, the items failed (left out of a published artifact, or failed and not computed
    later in these records), and the bytes stored.

    Records are the journal's: ``computed`` and ``failed`` name one item; ``reused`` (an artifact
    found in the store) and ``resumed`` (items an interrupted run had left) carry an item count;
    ``published`` (an artifact made) its seconds, whole-artifact work such as evaluate's included;
    ``published`` and ``reused`` the items left out (``failed``: item -> reason); ``released`` the bytes
    of arrays deleted after use. ``artifacts``: (stage, key) -> {"bytes", "items"} of the artifacts the
    records name, as the store holds them now; bytes per image divide by the run's images (the most
    distinct items of any stage).
    """
    stages: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"made": 0, "computed": 0, "reused": 0, "resumed": 0, "item_seconds": 0.0, "seconds": 0.0})
    failures: dict[tuple[str, str, str], dict[str, Any]] = {}
    released: dict[str, dict[str, float]] = defaultdict(lambda: {"artifacts": 0, "bytes": 0, "items": 0})
    for record in sorted(records, key=lambda r: r["time"]):
        row = stages[record["stage"]]
        where = (record["stage"], record["key"], record["item"])
        if record["event"] == "computed":
            row["computed"] += 1
            row["item_seconds"] += record.get("seconds", 0.0)
            failures.pop(where, None)
        elif record["event"] == "failed" and failures.get(where, {}).get("fate") != LEFT_OUT:  # a published key stays so
            failures[where] = {**record, "fate": RETRIED}
        elif record["event"] in ("reused", "resumed"):
            row[record["event"]] += record["items"]
        elif record["event"] == "released":
            for name in ("bytes", "items"):
                released[record["stage"]][name] += record[name]
            released[record["stage"]]["artifacts"] += 1
        if record["event"] == "published":
            row["made"] += 1
            row["seconds"] += record.get("seconds", 0.0)
        if record["event"] in ("published", "reused"):
            for item, error in record.get("failed", {}).items():
                failures[(record["stage"], record["key"], item)] = {**record, "item": item, "error": error, "fate": LEFT_OUT}
    failed_items = distinct_failures(failures.values())
    stored = stored_bytes(artifacts or {})
    images = stored["images"]
    table = []
    for stage, row in sorted(stages.items()):
        failed = sum(1 for f in failed_items if f["stage"] == stage)
        per_item = row["item_seconds"] / row["computed"] if row["computed"] else None
        held = stored["stages"].get(stage)
        table.append({"stage": stage, "made": row["made"], "computed": row["computed"], "reused": row["reused"],
                      "resumed": row["resumed"], "failed": failed, "seconds_per_item": per_item,
                      "seconds": round(row["seconds"], 3), "mb_stored": None if held is None else held / MB,
                      "mb_per_image": held / MB / images if held is not None and images else None})
    return {"stages": table, "failed": failed_items,
            "images": images, "mb_stored": stored["bytes"] / MB,
            "released": {stage: {"artifacts": r["artifacts"], "mb": r["bytes"] / MB, "images": r["items"]} for stage, r in sorted(released.items())}}


def distinct_failures(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per failed image, sorted by stage and item. Evaluate names the images its inputs left out
    ('preprocess: reason', once per run: the method's and each baseline's): shown once, and not at all
    when the stage that failed them is listed."""
    entries = [{"stage": r["stage"], "key": r["key"], "item": r["item"], "error": r.get("error", ""), "fate": r["fate"]} for r in records]
    named = {(f["item"], f"{f['stage']}: {f['error']}") for f in entries}
    distinct = {(f["stage"], f["item"], f["error"]): f for f in entries if (f["item"], f["error"]) not in named}
    return sorted(distinct.values(), key=lambda f: (f["stage"], f["item"]))


def stored_bytes(artifacts: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """Bytes per stage and in all of ``artifacts`` ((stage, key) -> {"bytes", "items"}), and the images
    they cover: the most distinct item names of any one stage."""
    per_stage: dict[str, int] = defaultdict(int)
    names: dict[str, set[str]] = defaultdict(set)
    for (stage, _), artifact in artifacts.items():
        per_stage[stage] += artifact["bytes"]
        names[stage].update(artifact["items"])
    return {"stages": dict(per_stage), "bytes": sum(per_stage.values()), "images": max(map(len, names.values()), default=0)}


def summary_markdown(summary: dict[str, Any], run: str) -> str:
    """The summary as a markdown table, the bytes stored and released, then one line per failed item
    with its reason and fate."""
    lines = [f"# lds run {run}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in summary["stages"]:
        seconds = "-" if row["seconds_per_item"] is None else f"{row['seconds_per_item']:.2f}"
        counts = " | ".join(str(row[column]) for column in COLUMNS[1:6])
        stored = " | ".join("-" if row[key] is None else f"{row[key]:.{digits}f}" for key, digits in (("mb_stored", 2), ("mb_per_image", 3)))
        lines.append(f"| {row['stage']} | {counts} | {seconds} | {row['seconds']:.1f} | {stored} |")
    if summary["images"]:
        lines += ["", f"Stored: {summary['mb_stored']:.1f} MB for {summary['images']} images, "
                      f"{summary['mb_stored'] / summary['images']:.2f} MB per image (the artifacts this run made or reused)."]
    for stage, freed in summary["released"].items():
        per_image = f", {freed['mb'] / freed['images']:.2f} MB per image" if freed["images"] else ""
        lines.append(f"Released after use: {stage} arrays of {freed['artifacts']} artifacts, {freed['mb']:.1f} MB{per_image}.")
    count = len(summary["failed"])
    if count:
        lines += ["", f"## {count} failed item{'s' if count > 1 else ''}", ""]
        lines += [f"- {f['stage']} {f['item']} ({f['key'][:8]}), {f['fate']}: {f['error']}" for f in summary["failed"]]
    return "\n".join(lines) + "\n"
