"""The hang watchdog: a rank that stops making progress writes every thread's stack to
<run dir>/stacks/ and ends, so a hung job fails with a reason instead of waiting forever."""

from __future__ import annotations

import faulthandler
import signal
import time
from pathlib import Path
from typing import IO


class Watchdog:
    """Ends a process that stops making progress, after writing every thread's stack.

    faulthandler's timer runs in its own C thread: it fires even while Python is blocked
    inside a collective or a GPU wait, where a Python-level timer could not run.
    """

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "stacks" / f"rank{rank}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "w")
        self._deadline = 0.0  # monotonic time at which the armed timer fires (0: unarmed)
        # torchrun ends the surviving ranks with SIGTERM when one fails: they leave stacks
        # too, dumped from C even while Python is blocked in a collective. Then it chains to
        # the handler in place, the stop request's (preempt.py): install that one first.
        faulthandler.register(signal.SIGTERM, file=self._file, all_threads=True, chain=True)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # A run that ended well after a SIGTERM (a preemption, saved) hung nowhere.
        self.close(keep_stacks=exc_type is not None)

    def arm(self, seconds: float) -> None:
        """Fire unless armed again within `seconds` (and at most a tenth more)."""
        if self._file is None:
            return
        now, slack = time.monotonic(), seconds / 10
        # Each re-arm joins faulthandler's timer thread and starts a new one: on a busy
        # host, waiting for the old one to be scheduled costs more than a small step. So a
        # timer that fires between `seconds` and a tenth later is kept: a re-arm per tenth
        # of the timeout, not per step.
        if now + seconds <= self._deadline <= now + seconds + slack:
            return
        faulthandler.dump_traceback_later(seconds + slack, exit=True, file=self._file)
        self._deadline = now + seconds + slack

    def close(self, keep_stacks: bool = True) -> None:
        """Disarm; a clean exit leaves no stack file behind."""
        faulthandler.cancel_dump_traceback_later()
        faulthandler.unregister(signal.SIGTERM)
        if self._file is not None:
            self._file.close()
            self._file = None
            if not keep_stacks or self.path.stat().st_size == 0:
                self.path.unlink()
                try:
                    self.path.parent.rmdir()
                except OSError:  # another rank's file is still there
                    pass
