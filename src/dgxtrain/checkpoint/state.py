"""What dgxtrain puts in a checkpoint, and takes back out: the unwrapped model, the optimizer
and LR schedule, the loop's and the tracker's state, each rank's RNG state. A resume loads
on rank 0 from the bytes store.choose() read, and broadcasts to the other ranks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dgxtrain.checkpoint.rng import set_rng_state
from dgxtrain.checkpoint.store import CheckpointError, Chosen, load_file, manifest
from dgxtrain.distributed.collectives import broadcast_object, broadcast_tensors
from dgxtrain.distributed.env import DistEnv

log = logging.getLogger(__name__)

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


def _load_on_rank0(chosen: Chosen, model: torch.nn.Module, device: torch.device
                   ) -> tuple[Any, Any, Any]:
    """model.pt (checked against the model's shapes), optim.pt and state.pt, from the bytes
    read while verifying them."""
    d, files = chosen.path, chosen.files
    weights = load_file(d / "model.pt", device, files.pop("model.pt"))
    mine = model.state_dict()
    for key in sorted(mine.keys() | weights.keys()):
        saved = tuple(weights[key].shape) if key in weights else "absent"
        now = tuple(mine[key].shape) if key in mine else "absent"
        if saved != now:
            raise _refuse(d, f"model tensor {key} of shape", saved, now,
                          "use the model.* settings the checkpoint was trained with")
    return (weights, load_file(d / "optim.pt", device, files.pop("optim.pt")),
            load_file(d / "state.pt", "cpu", files.pop("state.pt")))


def restore(chosen: Chosen, env: DistEnv, meta: dict[str, Any], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Load the chosen checkpoint into the model, optimizer and schedule; returns state.pt's
    contents. Rank 0 loads the files it read to verify them and broadcasts them; the other
    ranks read only their own RNG state. Shared storage serves one reader of the weights
    and optimizer state, not one per GPU (docs/checkpoints.md has the measurement)."""
    d = chosen.path
    saved_meta = manifest(d)
    for key, setting in _MUST_MATCH.items():
        if saved_meta.get(key) != meta[key]:
            raise _refuse(d, setting, saved_meta.get(key), meta[key],
                          f"set {setting}={saved_meta.get(key)} to continue it")
    loaded, error = None, None
    if env.is_main:
        try:
            loaded = _load_on_rank0(chosen, model, env.device)
        except CheckpointError as e:
            error = str(e)
    error = broadcast_object(error)  # the same error on every rank, or none
    if error:
        raise CheckpointError(error)
    weights, opt = broadcast_tensors(loaded[:2] if loaded else None, env.device)
    state = broadcast_object(loaded[2] if loaded else None)
    model.load_state_dict(weights)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = d / f"rng-rank{env.rank}.pt"
    if rng.is_file():
        set_rng_state(load_file(rng, data=chosen.files.pop(rng.name, None)), env.device)
    else:  # more ranks than saved this checkpoint: a fresh, still deterministic stream
        torch.manual_seed(meta["seed"] * 1_000_003 + env.rank)
        log.warning("%s has no RNG state for rank %d; seeded it afresh", d, env.rank)
    log.info("resumed from %s: step %d, saved by %d ranks, now %d", d,
             state["train_state"]["step"], saved_meta["world_size"], env.world_size)
    return state
