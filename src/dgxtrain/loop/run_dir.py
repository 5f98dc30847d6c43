"""One launch per run dir at a time. The same config names the same dir (config/identity.py),
so a second launch of a run still going would write into its checkpoints: rank 0 holds an
exclusive lock on <run dir>/.lock while it runs, and a second launch is refused."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from dgxtrain.errors import ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def holding(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Rank 0 holds the run dir for as long as the block runs (the kernel lets go when the
    process dies, however it dies)."""
    if not is_main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError("run_name", run_dir.name, f"the run dir {run_dir} is in use by "
                              f"another launch of the same run ({holder})", "wait for it to "
                              "end, or launch this one with run_name=<another name>") from None
        except OSError as e:  # a file system without locks (some Lustre mounts)
            log.debug("run dir %s not locked (%s)", run_dir, e)
        else:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        yield
