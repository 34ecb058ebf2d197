"""Writing files so that a final name only ever holds a complete, checked file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable

__all__ = ["write_atomically", "user_file_mode", "missing_folders", "remove_empty"]


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first: what ``mkdir(parents=True)`` makes."""
    folder = Path(folder)
    return [path for path in (folder, *folder.parents) if not path.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first, as :func:`missing_folders` lists them) while they are empty.

    What a command made for work that then failed is not left behind as an empty folder.
    """
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): its parents are not empty either
            return


def user_file_mode() -> int:
    """The permission bits a new file gets here: ``0o666`` less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _flush_to_disk(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any],
                     verify: Callable[[Path], Any] | None = None) -> Path:
    """Have ``write(temporary)`` write a file beside ``path``, check it, then rename it to ``path``.

    The temporary name keeps ``path``'s extension (writers that pick a format by it still work)
    and is in the same folder, so the rename is atomic. Before the rename the file is given the
    user's permission bits (:func:`user_file_mode`; some writers create files ``0600``), flushed
    to disk, and passed to ``verify``, which raises if it is not what was meant to be written.
    So ``path`` either holds the complete, checked file or is left as it was; the temporary file
    is removed on any failure, Ctrl-C included, and the exception propagates. Missing parent
    folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(temporary)
        os.chmod(temporary, user_file_mode())
        _flush_to_disk(temporary)
        if verify is not None:
            verify(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
