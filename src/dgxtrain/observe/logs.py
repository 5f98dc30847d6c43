"""Logging with the rank in every line; rank 0 at INFO, other ranks warnings and errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

PROGRESS = "dgxtrain.progress"


class ConsoleHandler(logging.StreamHandler):
    """stderr; on a TTY the progress records overwrite each other in one line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.tty = sys.stderr.isatty()
        self._line_open = False

    def close_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.tty and record.name == PROGRESS:
            self.stream.write("\r\033[K" + record.getMessage())
            self.stream.flush()
            self._line_open = True
            return
        self.close_line()
        super().emit(record)


def setup_logging(rank: int, run_dir: Path | None = None) -> None:
    """(Re)configure the `dgxtrain` loggers for this rank; idempotent across Hydra jobs.

    Rank 0 writes run_dir/train.log, every other rank run_dir/logs/rank<r>.log (created at
    its first warning): appends from many nodes to one file on a shared file system would
    interleave, or overwrite each other.
    """
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    logger = logging.getLogger("dgxtrain")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    handlers: list[logging.Handler] = [ConsoleHandler()]
    if run_dir is not None:
        path = run_dir / "train.log" if rank == 0 else run_dir / "logs" / f"rank{rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, delay=True))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)


def end_progress() -> None:
    """Finish an open progress line so that what follows starts on a line of its own."""
    for h in logging.getLogger("dgxtrain").handlers:
        if isinstance(h, ConsoleHandler):
            h.close_line()
