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
    """Rank 0 holds the run dir for as long as the block runs: one holder per job, on every
    node's view of a shared file system (NFS turns flock into a lock its server keeps). The
    kernel lets go when the process dies, however it dies; the holder's line stays in the
    file until it lets go itself, so the next holder can tell a holder that was killed."""
    if not is_main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        f.seek(0)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "another process"
            raise ConfigError("run_name", run_dir.name, f"the run dir {run_dir} is in use by "
                              f"another launch of the same run ({holder})", "wait for it to "
                              "end, or launch this one with run_name=<another name>") from None
        except OSError as e:  # a file system without locks (Lustre mounted without flock)
            log.warning("run dir %s cannot be locked (%s): nothing stops a second launch of "
                        "this run from writing into it at the same time", run_dir, e.strerror)
            yield
            return
        left = f.read().strip()
        if left:
            log.warning("run dir %s: took over from %s, which ended without letting go "
                        "(killed, or its node lost)", run_dir, left)
        _write(f, f"pid {os.getpid()} on {socket.gethostname()}\n")
        try:
            yield
        finally:
            _write(f, "")  # let go cleanly: the next holder has nothing to warn about


def _write(f, text: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(text)
    f.flush()
