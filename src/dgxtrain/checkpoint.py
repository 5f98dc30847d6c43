"""Checkpoints that survive anything: atomic, verified, pruned without blocking.

Layout: <run dir>/checkpoints/step-<N>/ holding model.pt, optim.pt, state.pt (rank 0),
rng-rank<r>.pt (every rank) and manifest.json. Files are written into .tmp-step-<N>/ and
fsynced; the manifest, with every file's SHA-256, is written last; then the directory is
renamed into place. A directory without a valid manifest is never resumed from.
Everything is tensors and plain values, loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgxtrain.dist.collectives import all_agree, broadcast_object, gather_objects
from dgxtrain.dist.env import DistEnv

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def root_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step(d: Path) -> int:
    m = _STEP_DIR.match(d.name)
    return int(m.group(1)) if m else -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, obj: Any) -> None:
    """torch.save, flushed to the disk before returning."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_file(path: Path, device: torch.device | str = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain values
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load ({first}); fix: resume from a "
                              "checkpoint dgxtrain wrote, or checkpoint.resume=never") from e


def manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / MANIFEST).read_text())


def verify(d: Path) -> str | None:
    """Why `d` is not a complete checkpoint, or None if it is."""
    try:
        files = manifest(d)["files"]
    except FileNotFoundError:
        return "no manifest (the save did not finish)"
    except (ValueError, KeyError, OSError) as e:
        return f"unreadable manifest ({e})"
    for name, digest in files.items():
        if not (d / name).is_file():
            return f"{name} is missing"
        if _sha256(d / name) != digest:
            return f"{name} fails its checksum"
    return None


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`; damaged ones are skipped, loudly."""
    dirs = sorted((d for d in root.glob("step-*") if _step(d) >= 0), key=_step, reverse=True)
    for d in dirs:
        reason = verify(d)
        if reason is None:
            return d
        log.warning("skipping checkpoint %s: %s", d, reason)
    return None


def choose(setting: str, run_dir: Path, env: DistEnv) -> Path | None:
    """Rank 0 picks the checkpoint to resume from; every rank gets the same answer."""
    choice: str | None = None
    if env.is_main:
        root = root_of(run_dir)
        if setting == "never":
            if any(root.glob("step-*")):
                aside = root.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
                root.rename(aside)  # starting fresh must not destroy what was saved
                log.warning("checkpoint.resume=never: moved old checkpoints to %s", aside)
        elif setting == "auto":
            found = find_latest(root) if root.is_dir() else None
            choice = str(found) if found else None
        else:
            path = Path(setting)
            found = path if _step(path) >= 0 else find_latest(path)
            reason = verify(found) if found else "no complete checkpoint in it"
            if reason:
                raise CheckpointError(f"checkpoint.resume={setting}: {reason}; fix: give a "
                                      "step-N dir with a manifest, or checkpoint.resume=auto")
            choice = str(found)
    choice = broadcast_object(choice)
    return Path(choice) if choice else None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's random generators, as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(run_dir: Path, step: int, env: DistEnv, shared: dict[str, Any],
         meta: dict[str, Any], keep_last: int, before_write=None) -> str | None:
    """Collective: every rank calls it. Rank 0 writes `shared` ({file name: object}), each
    rank its RNG state. Returns None once saved, or, on a write error, what failed (the same
    line on every rank), keeping the previous checkpoints. Every rank reaches the same
    collectives whatever fails where, so nobody is left waiting."""
    failed: list[str] = []

    def _attempt(step: int, what: str, fn) -> bool:
        try:
            fn()
            return True
        except OSError as e:
            failed.append(f"rank {env.rank}: {what} {e.filename or root} failed "
                          f"({e.strerror or e})")
            log.error("checkpoint step-%d: %s", step, failed[-1])
            return False

    root = root_of(run_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"

    def make_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way, earlier
        tmp.mkdir(parents=True)

    def write_files() -> None:
        files = {f"rng-rank{env.rank}.pt": rng_state(env.device)}
        if env.is_main:
            files.update(shared)
        for name, obj in files.items():
            if before_write:
                before_write(step, tmp / name)
            write_file(tmp / name, obj)

    def finish() -> None:
        names = sorted(p.name for p in tmp.iterdir())
        body = {**meta, "step": step, "files": {n: _sha256(tmp / n) for n in names}}
        with open(tmp / MANIFEST, "w") as f:  # last: it marks the checkpoint complete
            json.dump(body, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a fresh run re-reaching a step: replace, never mix
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)

    ok = all_agree(not env.is_main or _attempt(step, "creating", make_tmp), env.device)
    ok = all_agree(ok and _attempt(step, "writing", write_files), env.device)
    ok = all_agree(ok and (not env.is_main or _attempt(step, "finishing", finish)),
                   env.device)
    if not ok:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        # Every rank learns which file failed where (they all agreed that something did).
        return next(line for line in gather_objects(failed[0] if failed else None) if line)
    if env.is_main:
        log.info("checkpoint saved: %s", final)
        # Deleting is slow on some file systems and may fail; neither may block training.
        pruner = threading.Thread(target=prune, args=(root, keep_last), daemon=True)
        pruner.start()
        _pruners.append(pruner)
    return None


_pruners: list[threading.Thread] = []


def finish_pruning() -> None:
    """Wait for background deletions (at the end of a run, so keep_last holds on exit)."""
    while _pruners:
        _pruners.pop().join()


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and older debris)."""
    dirs = sorted((d for d in root.glob("step-*") if _step(d) >= 0), key=_step, reverse=True)
    complete = [d for d in dirs if (d / MANIFEST).is_file()]
    if len(complete) < keep_last:
        return
    oldest_kept = _step(complete[keep_last - 1])
    for d in dirs:
        if _step(d) < oldest_kept:
            try:
                shutil.rmtree(d)
            except OSError as e:
                log.warning("could not delete old checkpoint %s: %s", d, e)


# --- what dgxtrain puts in a checkpoint, and takes back out ---------------------------

# Settings that define the sample stream: a checkpoint continues only under the same ones.
_MUST_MATCH = {"global_batch_size": "trainer.global_batch_size", "seed": "seed",
               "num_samples": "data.num_samples"}


def contents(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, train_state: dict[str, Any],
             tracker_state: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's files: the unwrapped model, optimizer + LR schedule, loop and tracker state."""
    return {"model.pt": model.state_dict(),
            "optim.pt": {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            "state.pt": {"train_state": train_state, "tracker": tracker_state}}


def _refuse(d: Path, what: str, saved: Any, now: Any, fix: str) -> CheckpointError:
    return CheckpointError(f"{d} has {what}={saved}, this run has {now}; fix: {fix}, or "
                           "checkpoint.resume=never to start fresh")


def restore(d: Path, env: DistEnv, meta: dict[str, Any], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Load `d` into the model, optimizer and schedule; returns state.pt's contents."""
    saved_meta = manifest(d)
    for key, setting in _MUST_MATCH.items():
        if saved_meta.get(key) != meta[key]:
            raise _refuse(d, setting, saved_meta.get(key), meta[key],
                          f"set {setting}={saved_meta.get(key)} to continue it")
    weights = load_file(d / "model.pt", env.device)
    mine = model.state_dict()
    for key in sorted(mine.keys() | weights.keys()):
        saved = tuple(weights[key].shape) if key in weights else "absent"
        now = tuple(mine[key].shape) if key in mine else "absent"
        if saved != now:
            raise _refuse(d, f"model tensor {key} of shape", saved, now,
                          "use the model.* settings the checkpoint was trained with")
    model.load_state_dict(weights)
    opt = load_file(d / "optim.pt", env.device)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = d / f"rng-rank{env.rank}.pt"
    if rng.is_file():
        set_rng_state(load_file(rng), env.device)
    else:  # more ranks than saved this checkpoint: a fresh, still deterministic stream
        torch.manual_seed(meta["seed"] * 1_000_003 + env.rank)
        log.warning("%s has no RNG state for rank %d; seeded it afresh", d, env.rank)
    state = load_file(d / "state.pt")
    log.info("resumed from %s: step %d, saved by %d ranks, now %d", d,
             state["train_state"]["step"], saved_meta["world_size"], env.world_size)
    return state
