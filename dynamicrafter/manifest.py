"""``manifest.jsonl``: one JSON line per finished video, safe to append from many processes.

A record is written only for a video that was written and checked. Each record is one
``write`` on a file opened for appending, under an exclusive ``flock``, so lines from concurrent
ranks never interleave or tear (on one machine and on shared file systems that honour locks).
A manifest whose last line was cut off (a killed run, a full disk) is left as it is: the next
record starts on a fresh line, and :func:`read_records` reports and skips the broken line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .files import user_file_mode

try:
    import fcntl
except ImportError:  # Windows: appends of one short write are still whole lines in practice
    fcntl = None  # type: ignore[assignment]

__all__ = ["MANIFEST_NAME", "append_record", "read_records"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created when missing), on a line of its own.

    Raises ``OSError`` when the line cannot be written whole.
    """
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, user_file_mode())
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _ends_mid_line(fd):  # a cut-off last line: start ours on a fresh one
            line = b"\n" + line
        if os.write(fd, line) != len(line):
            raise OSError(f"could not append a whole line to {path}")
    finally:
        os.close(fd)  # closing releases the lock


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every whole record of a manifest (an empty list when there is none).

    A line that is not a JSON object (cut off by a killed run, say) is skipped with a warning
    naming the file and the line number.
    """
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            logger.warning("Skipping line %d of %s: not a whole record.", number, path)
            continue
        records.append(record)
    return records
