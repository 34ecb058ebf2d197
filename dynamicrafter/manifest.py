"""``manifest.jsonl``: one JSON line per finished video, safe to append from many processes.

Each record is written with a single ``write`` on a file opened for appending, under an
exclusive ``flock``, so lines from concurrent ranks never interleave or tear (on one machine
and on shared file systems that honour locks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: appends of one short write are still whole lines in practice
    fcntl = None  # type: ignore[assignment]

__all__ = ["MANIFEST_NAME", "append_record", "read_records"]

MANIFEST_NAME = "manifest.jsonl"


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created when missing)."""
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)  # closing releases the lock


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a manifest (an empty list when there is none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
