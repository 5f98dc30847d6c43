"""How a run that fails ends: one `dgxtrain: ...` line, from whichever rank failed first.

The rank that fails is often not rank 0 (a dataset that does not build on one node, a
`__getitem__` that raises on one rank's sample), and every other rank then fails too, of
a peer's closed connection or not at all (blocked in a collective that never completes).
So the first rank to fail claims the run's failure on the rendezvous store, an atomic
compare-and-set, and alone prints its line (`dgxtrain: rank 3: data error: ...` when it is
not rank 0) and appends it to train.log. The others find the claim at their own error, or,
blocked, from a watcher thread that reads the store every second, and end quietly with the
claimed exit code, their own error in their rank log. Every failing rank writes the claimed
line into torchrun's error file (TORCHELASTIC_ERROR_FILE), so that the failure summary
torchrun prints last ends with it instead of a traceback.

Without a store (one process, or an error before the ranks meet) a rank ends alone, and
only rank 0 speaks: every rank meets such an error (a bad setting) the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dgxtrain import errors

log = logging.getLogger(__name__)

EXIT_ERROR = 1  # an error dgxtrain has no name for: its traceback is in the rank's log
EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_DATA_ERROR = 4
KEY = "dgxtrain/failure"
# A rank other than 0 claims this much later: an error that every rank meets is then
# told by rank 0, and a rank that really failed first has long claimed by the time its
# peers see their connections close.
LATER_S = 0.5
# torchrun's agent is the parent of the ranks it starts, each in a session of its own: an
# agent killed with SIGKILL signals none of them, and they would train on unattended.
_AGENT_PID = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None


@dataclass(frozen=True)
class Failure:
    code: int  # the exit code
    status: str  # exit.json's (preempt.report_exit): config_error, data_error, ...
    kind: str  # the line's label
    line: str
    rank: int = 0

    def text(self) -> str:
        who = f"rank {self.rank}: " if self.rank else ""
        return f"dgxtrain: {who}{self.kind}: {self.line}"


class Reported(Exception):
    """The run's failure has been told (by this rank or another): exit with `code`."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def failure_of(e: BaseException, rank: int = 0) -> Failure | None:
    """The failure `e` ends the run with, or None if it is no failure (a requeue, an exit)."""
    from dgxtrain.checkpoint import CheckpointError
    from dgxtrain.distributed.preempt import Requeue

    # Ctrl-C before the stop handlers are in place (preempt.StopRequests) is the user's own
    # stop, not a failure to tell.
    if isinstance(e, (Requeue, SystemExit, Reported, KeyboardInterrupt)):
        return None
    if isinstance(e, CheckpointError):
        return Failure(EXIT_CONFIG_ERROR, "checkpoint_error", "checkpoint error", str(e), rank)
    if isinstance(e, errors.DataError):
        return Failure(EXIT_DATA_ERROR, "data_error", "data error", str(e), rank)
    if isinstance(e, FloatingPointError):
        return Failure(EXIT_NON_FINITE, "non_finite", "stopped", str(e), rank)
    line = errors.describe_error(e) if isinstance(e, Exception) else None
    if line is not None:
        return Failure(EXIT_CONFIG_ERROR, "config_error", "config error", line, rank)
    where = "its traceback is in " + ("train.log" if rank == 0 else f"logs/rank{rank}.log")
    return Failure(EXIT_ERROR, "error", "error", f"{errors.first_line(e)} ({where})", rank)


class Board:
    """Where a rank's failure is claimed: here, a single process's own (it always wins)."""

    store: Any = None  # the store the ranks met on, which the process group is made on

    def __init__(self, rank: int = 0):
        self.rank = rank

    def claim(self, failure: Failure) -> Failure:
        """The run's failure: this one, unless another rank claimed first."""
        return failure

    def close(self) -> None:
        pass


class StoreBoard(Board):
    """The run's failure on the rendezvous store, watched from a thread: a rank blocked in
    a collective that a failed peer will never join ends `grace_s` after the claim."""

    def __init__(self, store: Any, rank: int, poll_s: float = 1.0, grace_s: float = 5.0):
        super().__init__(rank)
        self.store, self.poll_s, self.grace_s = store, poll_s, grace_s
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="dgxtrain-failure-watch",
                                         daemon=True)
        self._watcher.start()

    def claim(self, failure: Failure) -> Failure:
        if self.rank:
            time.sleep(LATER_S)
        try:
            got = self.store.compare_set(KEY, "", json.dumps(asdict(failure)))
            return Failure(**json.loads(got))
        except Exception:  # the store is gone with its host, rank 0, which has ended:
            # a bad setting it met too, and told; anything else may be this rank's alone.
            if failure.status == "config_error":
                return dataclasses.replace(failure, rank=0)
            return failure

    def _claimed(self) -> Failure | None:
        if not self.store.check([KEY]):
            return None
        return Failure(**json.loads(self.store.get(KEY)))

    def _watch(self) -> None:
        store_up = True
        while not self._closed.wait(self.poll_s):
            if _AGENT_PID is not None and os.getppid() != _AGENT_PID:
                log.error("ending: torchrun's agent (pid %d) is gone, this rank with it",
                          _AGENT_PID)
                logging.shutdown()
                os._exit(EXIT_ERROR)
            if not store_up:
                continue
            try:
                failure = self._claimed()
            except Exception:  # the store's host is gone: the main thread will hear of it
                store_up = False
                continue
            if failure is None or failure.rank == self.rank:
                continue
            # The main thread may still end on its own (a closed connection): let it.
            if self._closed.wait(self.grace_s):
                return
            settle(failure, self.rank, quiet_reason="blocked while a peer failed")
            logging.shutdown()
            os._exit(failure.code)

    def close(self) -> None:
        self._closed.set()


_run_dir: Path | None = None  # where the run's train.log is, once known


def run_dir_known(run_dir: Path | None) -> None:
    global _run_dir
    _run_dir = run_dir


@contextlib.contextmanager
def ending(board: Board, run_dir: Path | None) -> Iterator[None]:
    """Any failure in the block is told once for the run, then raised as Reported."""
    run_dir_known(run_dir or _run_dir)
    try:
        yield
    except BaseException as e:
        failure = failure_of(e, board.rank)
        if failure is None:
            raise
        # An error without a name of ours keeps its traceback, in the rank's log.
        _to_log_file(failure.text(), e if failure.status == "error" else None)
        winner = board.claim(failure)
        settle(winner, board.rank, logged=winner == failure)
        raise Reported(winner.code) from e
    finally:
        board.close()


def tell(e: BaseException, rank: int) -> int | None:
    """A failure outside any board (one process, or before the ranks met): every rank meets
    it alike, rank 0 tells it. Returns the exit code, or None for an error to raise as it
    is (not a failure, or one of ours before any run dir: its traceback is the report)."""
    # The launcher's variables are each rank's own: a rank tells its own.
    failure = failure_of(e, rank if errors.caused_by(e, errors.DistEnvError) else 0)
    if failure is not None and failure.status == "error" and _run_dir is None:
        if not (isinstance(e, OSError) and e.filename):
            return None
        # Before any run dir: Hydra making it (an unwritable or impossible path).
        failure = Failure(EXIT_CONFIG_ERROR, "config_error", "config error", f"hydra.run.dir: "
                          f"cannot create {e.filename} ({e.strerror}); fix: choose a writable "
                          "dir: hydra.run.dir=<path>, or DGXTRAIN_OUTPUT_ROOT=<dir> for "
                          "outputs/", 0)
    if failure is None:
        return None
    if rank == 0:
        _to_log_file(failure.text(), e if failure.status == "error" else None)
    settle(failure, rank, logged=True, quiet_reason="every rank meets it, rank 0 tells it")
    return failure.code


def _to_log_file(msg: str, exc: BaseException | None = None) -> None:
    """A record for this rank's log file only: the console has its one line."""
    logger = logging.getLogger("dgxtrain")
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logger.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, exc_info)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def settle(failure: Failure, rank: int, logged: bool = False, quiet_reason: str = "") -> None:
    """Tell the run's failure: print it if it is this rank's own, into train.log too (rank
    0's log file is train.log: `logged` says it has it); everyone writes it into torchrun's
    error file, and rank 0 into exit.json for the batch script."""
    from dgxtrain.distributed import preempt

    text = failure.text()
    if failure.rank == rank:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        if not (logged and rank == 0) and _run_dir is not None:
            with contextlib.suppress(OSError), open(_run_dir / "train.log", "a") as f:
                f.write(text + "\n")
    else:
        _to_log_file(f"ending: {quiet_reason or 'a peer failed first'}: {text}")
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            Path(error_file).write_text(json.dumps({"message": {
                "message": text, "extraInfo": {"py_callstack": text,
                                               "timestamp": str(int(time.time()))}}}))
    if rank == 0:
        preempt.report_exit(failure.status, detail=failure.line)
