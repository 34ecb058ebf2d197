"""The run's metrics: ``logs/metrics.csv`` (step, loss, lr, seconds) and TensorBoard, main process only.

A resumed run keeps the rows up to the step it resumes from (rewritten atomically, so a killed
start cannot lose them) and appends; TensorBoard purges the events after that step.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import write_atomically

logger = logging.getLogger(__name__)

COLUMNS = ["step", "loss", "lr", "seconds"]


def _history(path: Path, step: int) -> list[list[str]]:
    """The rows of an earlier ``metrics.csv`` up to ``step`` (none for a new run)."""
    if step == 0 or not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        return [r for r in rows if r and int(r[0]) <= step]
    except (OSError, ValueError, csv.Error) as exc:
        raise UserError(f"{path} is not a metrics log this trainer can continue ({exc}); move it away to resume.") from None


class Metrics:
    """Writes a row per logged step to ``<log_dir>/metrics.csv`` and TensorBoard; a no-op when not ``enabled``."""

    def __init__(self, log_dir: Path, step: int, enabled: bool = True) -> None:
        self.path = log_dir / "metrics.csv"
        self.file: Any = None
        self.writer: Any = None
        if not enabled:
            return
        rows = _history(self.path, step)

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([COLUMNS, *rows])

        try:
            write_atomically(self.path, write)
            self.file = self.path.open("a", newline="", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"Cannot write {self.path} ({exc.strerror or exc}).") from None
        self.csv = csv.writer(self.file)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=step + 1 if step else None)
        except ImportError:
            logger.warning("TensorBoard is not installed (pip install tensorboard); logging to CSV only.")

    def log(self, step: int, loss: float, lr: float, seconds: float) -> None:
        if self.file is None:
            return
        try:
            self.csv.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{seconds:.3f}"])
            self.file.flush()
        except OSError as exc:
            raise UserError(f"Cannot write {self.path} ({exc.strerror or exc}).") from None
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def close(self) -> None:
        for handle in (self.file, self.writer):
            if handle is not None:
                try:
                    handle.close()
                except OSError:  # a full disk: the rows already flushed stay
                    logger.warning("Could not finish writing %s.", self.path)
        self.file = self.writer = None
