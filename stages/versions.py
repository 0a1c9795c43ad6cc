"""Each stage's version, and a record of the code each version stands for.

A stage's version is part of its artifacts' keys: bump it whenever a change to the stage's code changes what
it writes, and its artifacts are made again. ``stages/stage_code.json`` records, per stage, its version and a
hash of its code: its module in ``stages/`` and every module of this repository it imports, directly or not,
comments, docstrings and layout aside. ``tests/test_stage_versions.py`` fails when a stage's code changed and
its version did not; after bumping it, refresh the record with ``python -m stages.versions --update``. Only a
change that leaves every artifact as it was (a message, a refactor) may refresh the record without a bump.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
from functools import cache
from pathlib import Path

STAGE_VERSIONS = {"preprocess": 3, "extract": 4, "solve": 8, "solve-dataset": 3, "decode": 6, "cluster": 4, "evaluate": 6, "baseline": 4, "zeroshot": 2}

REPO = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_name("stage_code.json")
UPDATE = "python -m stages.versions --update"


def stage_module(stage: str) -> str:
    """The module of a stage's command: solve-dataset -> stages.solve_dataset."""
    return "stages." + stage.replace("-", "_")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of a module of this repository (a package's __init__.py); None for any other module and for
    this one (the versions are not code a stage runs)."""
    if name == "stages.versions":
        return None
    path = root.joinpath(*name.split("."))
    return next((file for file in (path.with_suffix(".py"), path / "__init__.py") if file.is_file()), None)


@cache
def imported(source: str) -> frozenset[str]:
    """The modules a module's import statements name, those inside functions too, with their parent packages
    (`from a.b import c` names a, a.b and a.b.c, which may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(".".join(parts[:end]) for parts in (name.split(".") for name in names) for end in range(1, len(parts) + 1))


def without_docstrings(tree: ast.Module) -> ast.Module:
    """The tree without the docstrings of its module, classes and functions."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


@cache
def normalised(source: str) -> str:
    """A module's code without its comments, docstrings and layout: the dump of its syntax tree."""
    return ast.dump(without_docstrings(ast.parse(source)))


def stage_files(stage: str, root: Path = REPO) -> list[Path]:
    """The files of a stage's code: its module and every module of this repository it imports, transitively."""
    found, todo = set(), [stage_module(stage)]
    while todo:
        file = module_file(todo.pop(), root)
        if file and file not in found:
            found.add(file)
            todo.extend(imported(file.read_text()))
    return sorted(found)


def code_hash(stage: str, root: Path = REPO) -> str:
    """A hash of a stage's code: each file's path and normalised code."""
    digest = hashlib.sha256()
    for file in stage_files(stage, root):
        digest.update(f"{file.relative_to(root).as_posix()}\n{normalised(file.read_text())}\n".encode())
    return digest.hexdigest()[:16]


def current(root: Path = REPO) -> dict[str, dict]:
    """The record as it should read now: each stage's version and code hash."""
    return {stage: {"version": version, "hash": code_hash(stage, root)} for stage, version in STAGE_VERSIONS.items()}


def problems(recorded: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """What differs between the recorded and the current versions and hashes, one line per stage."""
    found = []
    for stage in sorted(recorded.keys() | now.keys()):
        was, new = recorded.get(stage, {}), now.get(stage, {})
        if was == new:
            continue
        if was and new and was["hash"] != new["hash"] and was["version"] == new["version"]:
            found.append(f"stage {stage}: its code changed ({stage_module(stage)} or a module it imports) but its version did not: "
                         f"bump STAGE_VERSIONS['{stage}'] (now {new['version']}) in stages/versions.py, then run `{UPDATE}`")
        else:
            found.append(f"stage {stage}: the record {RECORD.name} is out of date ({was or 'absent'} recorded, {new or 'no such stage'} now): run `{UPDATE}`")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.versions", description="Check (or refresh) the record of each stage's version and code hash.")
    parser.add_argument("--update", action="store_true", help=f"write the current versions and hashes to {RECORD.name}")
    now = current()
    if parser.parse_args().update:
        RECORD.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")
        print(f"{RECORD}: {len(now)} stages recorded")
        return
    found = problems(json.loads(RECORD.read_text()), now)
    print("\n".join(found) or f"{RECORD.name} is up to date")
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
