"""Checkpoints on storage: written atomically, verified, found, pruned without blocking.

Layout: <run dir>/checkpoints/step-<N>/ holding model.pt, optim.pt, state.pt (rank 0),
rng-rank<r>.pt (every rank) and manifest.json. Files are written into .tmp-step-<N>/ and
fsynced, each hashed as it is written; the manifest lists the files that must be there (rank
0's and every rank's RNG state, as the ranks reported them, not as a directory listing on a
shared file system shows them) with their sizes and SHA-256, and is written last; the
directory is fsynced, then renamed into place. A directory without a valid manifest is
never resumed from. Finding one reads each of rank 0's files once, and keeps the bytes for
loading them (state.py). choice.py decides which one a run resumes from.
Everything is tensors and plain values, loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dgxtrain.checkpoint.rng import rng_state
from dgxtrain.distributed.collectives import all_agree, gather_objects
from dgxtrain.distributed.env import DistEnv

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REPLACED = ".replaced"  # step-N.replaced: the old step-N while a new one takes its place
_DAMAGED = ".damaged"  # step-N.damaged: found damaged, kept for a person to look at


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def root_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step(d: Path) -> int:
    m = _STEP_DIR.match(d.name.removesuffix(_REPLACED))
    return int(m.group(1)) if m else -1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _read_hashed(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their SHA-256, from one read."""
    with open(path, "rb") as f:
        data = f.read()
    return data, hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Hashing:
    """A file that hashes what is written to it: the checksum costs no read-back."""

    def __init__(self, f: Any):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def write_file(path: Path, obj: Any) -> list[Any]:
    """torch.save, flushed to the disk before returning; [size, sha256] of what it wrote."""
    with open(path, "wb") as f:
        out = _Hashing(f)
        torch.save(obj, out)
        f.flush()
        os.fsync(f.fileno())
    return [out.size, out.sha.hexdigest()]


def load_file(path: Path, device: torch.device | str = "cpu", data: io.BytesIO | None = None
              ) -> Any:
    """The tensors and plain values in `path` (from `data` when its bytes were read already)."""
    try:
        return torch.load(path if data is None else data, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain values
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused to load ({first}); fix: resume from a "
                              "checkpoint dgxtrain wrote, or checkpoint.resume=never") from e


def manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / MANIFEST).read_text())


class _Damaged(Exception):
    """Why a directory is not a complete checkpoint."""


def _read_by_rank0(name: str) -> bool:
    """What rank 0 loads and broadcasts: all but the other ranks' RNG states."""
    return not name.startswith("rng-rank") or name == "rng-rank0.pt"


def _check(d: Path, checksums: bool = True, keep=lambda name: False) -> dict[str, io.BytesIO]:
    """Every file d's manifest lists is there at its size and, with `checksums`, has its
    SHA-256; each is read once, and the bytes of those `keep` names are returned from that
    read, so loading them reads nothing again. Raises _Damaged for the first that is not."""
    try:
        files = manifest(d)["files"]
    except FileNotFoundError:
        raise _Damaged("no manifest (the save did not finish)") from None
    except (ValueError, KeyError, OSError) as e:
        raise _Damaged(f"unreadable manifest ({e})") from None
    kept = {}
    for name, entry in files.items():
        # [size, sha256]; manifests before sizes were recorded hold the sha256 alone.
        size, digest = entry if isinstance(entry, list) else (None, entry)
        if not (d / name).is_file():
            raise _Damaged(f"{name} is missing")
        if size is not None and (d / name).stat().st_size != size:
            raise _Damaged(f"{name} has {(d / name).stat().st_size} bytes, not {size}")
        if keep(name):
            data, sha = _read_hashed(d / name)
            kept[name] = io.BytesIO(data)  # shares the bytes: no copy
        elif checksums:
            sha = _sha256(d / name)
        else:
            continue
        if sha != digest:
            raise _Damaged(f"{name} fails its checksum")
    return kept


def verify(d: Path, checksums: bool = True) -> str | None:
    """Why `d` is not a complete checkpoint, or None if it is: every file its manifest
    lists is there at its size (and, with `checksums`, has its SHA-256)."""
    try:
        _check(d, checksums)
    except _Damaged as e:
        return str(e)
    return None


def _candidates(root: Path) -> list[Path]:
    """step-N dirs, newest first; a step-N.replaced (a save that died while replacing
    step-N) comes right after its step-N."""
    dirs = [d for d in root.glob("step-*") if _step(d) >= 0]
    return sorted(dirs, key=lambda d: (_step(d), not d.name.endswith(_REPLACED)), reverse=True)


@dataclass
class Chosen:
    """The checkpoint to resume from, with rank 0's files as it read them to verify them."""

    path: Path
    files: dict[str, io.BytesIO] = field(default_factory=dict)  # empty on other ranks


def _latest(root: Path, keep=lambda name: False, damaged: list[str] | None = None
            ) -> Chosen | None:
    """The newest complete checkpoint under `root`; damaged ones are skipped, loudly, and
    (with `damaged`, a list that gets why) set aside as step-N.damaged: kept as evidence,
    never chosen, pruned or replaced by a save that reaches step N again."""
    for d in _candidates(root):
        try:
            return Chosen(d, _check(d, keep=keep))
        except _Damaged as e:
            if damaged is None:
                log.warning("skipping checkpoint %s: %s", d, e)
                continue
            damaged.append(f"{d.name}: {e}")
            log.warning("skipping checkpoint %s: %s; kept as %s", d, e, _set_aside(d))
    return None


def _unused(path: Path) -> Path:
    """path, or path-2, path-3, ... if it is taken."""
    n, free = 1, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.name}-{n}")
    return free


def _set_aside(d: Path) -> Path:
    """d renamed to d.damaged (d.damaged-2, ... when taken)."""
    aside = _unused(d.with_name(f"{d.name}{_DAMAGED}"))
    os.rename(d, aside)
    return aside


def find_latest(root: Path) -> Path | None:
    found = _latest(root)
    return found.path if found else None


def save(run_dir: Path, step: int, env: DistEnv, shared: dict[str, Any],
         meta: dict[str, Any], keep_last: int, before_write=None) -> str | None:
    """Collective: every rank calls it. Rank 0 writes `shared` ({file name: object}), each
    rank its RNG state. Returns None once saved, or, on a write error, what failed (the same
    line on every rank), keeping the previous checkpoints. Every rank reaches the same
    collectives whatever fails where, so nobody is left waiting; an error that is not the
    storage's (a bug) is raised on every rank."""
    root = root_of(run_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    failed: list[tuple[str, bool]] = []  # (what failed, whether it is the storage's fault)
    written: dict[str, list[Any]] = {}

    def attempt(what: str, fn) -> bool:
        try:
            fn()
            return True
        except OSError as e:
            failed.append((f"rank {env.rank}: {what} {e.filename or root} failed "
                           f"({e.strerror or e})", True))
        except Exception as e:
            failed.append((f"rank {env.rank}: {what} failed ({type(e).__name__}: {e})", False))
        log.error("checkpoint step-%d: %s", step, failed[-1][0])
        return False

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
            written[name] = write_file(tmp / name, obj)

    def finish(files: dict[str, list[Any]]) -> None:
        expected = set(shared) | {f"rng-rank{r}.pt" for r in range(env.world_size)}
        if expected - files.keys():
            raise OSError(f"no report of {', '.join(sorted(expected - files.keys()))}")
        body = {**meta, "step": step, "files": dict(sorted(files.items()))}
        with open(tmp / MANIFEST, "w") as f:  # last: it marks the checkpoint complete
            json.dump(body, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)  # the files' names too, before the directory is published
        _publish(tmp, final)

    ok = all_agree(not env.is_main or attempt("creating", make_tmp), env.device)
    ok = all_agree(ok and attempt("writing", write_files), env.device)
    # Every rank's files, as each wrote them: nothing is listed or read back on rank 0.
    reports = gather_objects(written if ok else {})
    merged = {name: v for r in reports for name, v in r.items()}
    ok = all_agree(ok and (not env.is_main or attempt("finishing", lambda: finish(merged))),
                   env.device)
    if not ok:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        # Every rank learns which file failed where (they all agreed that something did).
        line, storage = next(f for f in gather_objects(failed[0] if failed else None) if f)
        if not storage:
            raise CheckpointError(f"checkpoint step-{step}: {line}; fix: save only tensors "
                                  "and plain values (a bug: report it)")
        return line
    if env.is_main:
        log.info("checkpoint saved: %s", final)
        # Deleting is slow on some file systems and may fail; neither may block training.
        pruner = threading.Thread(target=prune, args=(root, keep_last), daemon=True)
        pruner.start()
        _pruners.append(pruner)
    return None


def _publish(tmp: Path, final: Path) -> None:
    """tmp renamed to final. A final already there (a fresh run re-reaching a step) is
    renamed aside first and put back if the rename fails: at no moment is neither whole,
    and a save that dies in between leaves step-N.replaced, which find_latest still reads."""
    aside = final.with_name(final.name + _REPLACED)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside.exists() and not final.exists():
            os.rename(aside, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


_pruners: list[threading.Thread] = []


def finish_pruning() -> None:
    """Wait for background deletions (at the end of a run, so keep_last holds on exit)."""
    while _pruners:
        _pruners.pop().join()


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and older step-N.replaced
    leftovers). Only checkpoints whose files are all there at their sizes count as complete;
    a damaged one is set aside (step-N.damaged), never deleted."""
    dirs = _candidates(root)
    complete = []
    for d in dirs:
        why = verify(d, checksums=False)
        if why is None:
            complete.append(d)
        elif not d.name.endswith(_REPLACED):
            log.warning("checkpoint %s is damaged (%s); kept as %s", d, why, _set_aside(d))
    complete = [d for d in complete if not d.name.endswith(_REPLACED)]
    if len(complete) < keep_last:
        return
    oldest_kept = _step(complete[keep_last - 1])
    for d in dirs:
        if _step(d) < oldest_kept and d.exists():
            try:
                shutil.rmtree(d)
            except OSError as e:
                log.warning("could not delete old checkpoint %s: %s", d, e)
