"""Which checkpoint a run resumes from, by checkpoint.resume (auto, never, a path), decided
by rank 0 and told to every rank; and what a run that starts over moves aside."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from dgxtrain.checkpoint.store import (
    _DAMAGED,
    CheckpointError,
    Chosen,
    _check,
    _Damaged,
    _latest,
    _read_by_rank0,
    _step,
    _unused,
    manifest,
    root_of,
)
from dgxtrain.distributed.collectives import broadcast_object
from dgxtrain.distributed.env import DistEnv

log = logging.getLogger(__name__)


def choose(setting: str, run_dir: Path, env: DistEnv, launch: str | None = None
           ) -> Chosen | None:
    """Rank 0 picks the checkpoint to resume from; every rank gets the same answer, or
    raises the same error. `launch`: this launch's id (distributed.env.launch_id)."""
    answer: tuple[str, str | None] = ("ok", None)
    found = None
    if env.is_main:
        try:
            found = _choose(setting, run_dir, launch)
            answer = ("ok", str(found.path) if found else None)
        except CheckpointError as e:
            answer = ("error", str(e))
    kind, value = broadcast_object(answer)
    if kind == "error":
        raise CheckpointError(value)
    return found or (Chosen(Path(value)) if value else None)


# What a run that starts over sets aside: the earlier run's checkpoints and final outputs.
EARLIER_RUN = ("checkpoints", "summary.json", "model.pt", "metrics.jsonl")


def _choose(setting: str, run_dir: Path, launch: str | None) -> Chosen | None:
    root = root_of(run_dir)
    if setting == "never":
        # Restarted within its own launch (a requeue, a torchrun restart), a run continues
        # what this launch saved: "never" means never from before it.
        own = _latest(root, _read_by_rank0, damaged=[]) if launch and root.is_dir() else None
        if own is not None and manifest(own.path).get("launch") == launch:
            log.info("checkpoint.resume=never: %s is this launch's own (%s), saved before "
                     "its restart: continuing from it", own.path, launch)
            return own
        _start_over(run_dir, EARLIER_RUN)
        return None
    if setting == "auto":
        damaged: list[str] = []
        found = _latest(root, _read_by_rank0, damaged) if root.is_dir() else None
        if found is None and (damaged or any(root.glob(f"step-*{_DAMAGED}*"))):
            listed = "; ".join(damaged) or ", ".join(
                sorted(d.name for d in root.glob(f"step-*{_DAMAGED}*")))
            raise CheckpointError(
                f"checkpoint.resume=auto: no checkpoint in {root} is complete ({listed}); "
                "fix: restore one, or checkpoint.resume=never to start over (it moves them "
                "aside, deleting nothing)")
        if found is None and (run_dir / "summary.json").exists():
            _start_over(run_dir, EARLIER_RUN)  # its outputs, with no checkpoint to go on
        return found
    path = Path(setting)
    try:
        if _step(path) < 0:
            found = _latest(path, _read_by_rank0)
            if found is None:
                raise _Damaged("no complete checkpoint in it")
            return found
        return Chosen(path, _check(path, keep=_read_by_rank0))
    except _Damaged as e:
        raise CheckpointError(f"checkpoint.resume={setting}: {e}; fix: give a step-N dir "
                              "with a manifest, or checkpoint.resume=auto") from None


def _start_over(run_dir: Path, names: tuple[str, ...]) -> None:
    """Those of `names` in run_dir moved into run_dir/previous-<time>/: starting over must
    not destroy what was saved, nor leave an earlier run's summary to be taken for this
    run's (a relaunch would find the run "already complete")."""
    there = [n for n in names if (run_dir / n).exists()
             and not (n == "checkpoints" and not any((run_dir / n).iterdir()))]
    if not there:
        return
    aside = _unused(run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for n in there:
        os.rename(run_dir / n, aside / n)
    log.warning("starting over: moved the earlier run's %s to %s", ", ".join(there), aside)
