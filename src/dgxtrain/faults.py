"""Failures on purpose: fault injection for tests and drills.

An injected fault fires once per run dir: a marker file under <run dir>/faults/ records
it, so the restarted job does not fire it again and can show that it recovers.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from pathlib import Path

import torch

from dgxtrain.config import FaultConfig

log = logging.getLogger(__name__)
EXIT_INJECTED_CRASH = 17


class Faults:
    """The loop calls `before_step` and `before_write`; a NaN reaches the step through a
    forward hook on the model (`attach`), so the step itself knows nothing of faults."""

    NAMES = ("crash_at_step", "hang_at_step", "nan_at_step", "enospc_at_step")

    def __init__(self, cfg: FaultConfig, rank: int, run_dir: Path):
        hits_me = cfg.rank in (-1, rank)
        self.at = {name: getattr(cfg, name) if hits_me else 0 for name in self.NAMES}
        self.rank, self.dir = rank, run_dir / "faults"
        # On the rank it hits: the others wait for it, so the whole job is slower.
        self.step_delay_s = cfg.step_delay_s if hits_me else 0.0
        self.enospc_saves, self.nan_steps = cfg.enospc_saves, cfg.nan_steps
        self._nan_now = False

    def attach(self, model: torch.nn.Module) -> None:
        """Make the training forward's output NaN during the step nan_at_step names."""
        if self.at["nan_at_step"]:
            model.register_forward_hook(
                lambda module, args, out: out * math.nan if self._nan_now and module.training
                else out)

    def _fires(self, name: str, step: int, times: int = 1) -> bool:
        """At its step, once per run dir; with times > 1, at each of that many calls from
        its step on."""
        at = self.at[name]
        if not at or step < at or (times == 1 and step != at):
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        for k in range(times):
            marker = self.dir / (f"{name}.rank{self.rank}" + (f".{k}" if k else ""))
            try:  # O_EXCL: exactly one firing per marker, even with every rank racing
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.fsync(fd)
            os.close(fd)
            log.warning("fault injection: %s fires on rank %d at step %d", name, self.rank,
                        step)
            return True
        return False

    def before_step(self, step: int) -> None:
        """`step` is the step about to run (1-based)."""
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self._fires("crash_at_step", step):
            logging.shutdown()
            os._exit(EXIT_INJECTED_CRASH)
        if self._fires("hang_at_step", step):
            while True:  # stuck like a rank in a dead collective
                time.sleep(3600)
        self._nan_now = self._fires("nan_at_step", step, self.nan_steps)

    def before_write(self, step: int, path: Path) -> None:
        # The first file of a save fails, and with it the save.
        if self._fires("enospc_at_step", step, self.enospc_saves):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
