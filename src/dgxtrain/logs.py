"""Logging with the rank in every line; rank 0 at INFO, other ranks warnings and errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class ConsoleHandler(logging.StreamHandler):
    """stderr handler that can also draw a self-overwriting progress line on a TTY."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.tty = sys.stderr.isatty()
        self._line_open = False

    def progress(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self._line_open = True
        else:
            logging.getLogger("dgxtrain.progress").info(line)

    def close_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False

    def emit(self, record: logging.LogRecord) -> None:
        self.close_line()
        super().emit(record)


_console: ConsoleHandler | None = None


def setup_logging(rank: int, run_dir: Path | None = None) -> ConsoleHandler:
    """(Re)configure the `dgxtrain` loggers for this rank; idempotent across Hydra jobs."""
    global _console
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    logger = logging.getLogger("dgxtrain")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    _console = ConsoleHandler()
    handlers: list[logging.Handler] = [_console]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return _console


def console() -> ConsoleHandler:
    return _console or setup_logging(0)
