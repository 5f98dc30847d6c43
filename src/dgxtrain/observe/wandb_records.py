"""Reading a `.wandb` file: W&B's own transaction log, a LevelDB-style log (32 KiB blocks,
7-byte record headers with a CRC-32) of `wandb_internal_pb2.Record` protobufs.

The W&B tracker asks it which steps a crashed attempt's offline run managed to write, so
that a restart sends exactly the missing ones; the tests read whole runs back with it."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path, strict: bool = True) -> Iterator[Any]:
    """The file's records in order. A file cut short by a crash ends early (strict=False) or
    raises ValueError (strict=True) at the first incomplete or corrupt record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a .wandb file")
    pending, pos = b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zeros: the writer padded the block out
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            if strict:
                raise ValueError(f"{path}: incomplete or corrupt record at byte {pos}")
            return
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def items(update: Any) -> dict[str, Any]:
    """A record's key/value items as a dict (keys may come as `key` or `nested_key`)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}


def read_run(path: Path) -> dict[str, Any]:
    """The run record (id, group, tags, ...), its config, history rows and summary."""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.update(id=rec.run.run_id, group=rec.run.run_group, tags=list(rec.run.tags),
                       project=rec.run.project, name=rec.run.display_name)
            run["config"].update(items(rec.run.config.update))
        elif kind == "config":
            run["config"].update(items(rec.config.update))
        elif kind == "history":
            run["history"].append(items(rec.history.item))
        elif kind == "summary":
            run["summary"].update(items(rec.summary.update))
    return run


def last_step(path: Path) -> int:
    """The highest history step the file holds (0 if none), however it ended."""
    return max((items(rec.history.item).get("_step", 0) for rec in records(path, strict=False)
                if rec.WhichOneof("record_type") == "history"), default=0)
