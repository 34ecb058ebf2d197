"""Writing files so that a final name only ever holds a complete file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable

__all__ = ["write_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Have ``write(temporary)`` write a file beside ``path``, then rename it to ``path``.

    The temporary name keeps ``path``'s extension (writers that pick a format by it still work)
    and is in the same folder, so the rename is atomic: ``path`` either holds the complete file
    or is left as it was. The temporary file is removed on any failure, Ctrl-C included.
    Missing parent folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
