"""Content addressing: canonical JSON and the artifact key of a stage run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

KEY_LENGTH = 20  # hex characters of sha256 kept in an artifact key


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces, so equal values always give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hash of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hash of a file, or of a folder: every file's relative path and bytes, in sorted order."""
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()


def artifact_key(stage: str, code_version: int | str, params: dict, inputs: Iterable[str]) -> str:
    """The key of a stage's output: a hash of the stage, its code version, parameters and input keys.

    ``inputs`` are the keys of input artifacts (or content hashes of raw files); their order matters,
    since a stage may treat its inputs positionally.
    """
    record = {"stage": stage, "version": str(code_version), "params": params, "inputs": list(inputs)}
    return sha256_bytes(canonical_json(record).encode())[:KEY_LENGTH]
