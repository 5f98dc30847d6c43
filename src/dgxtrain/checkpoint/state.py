"""What dgxtrain puts in a checkpoint, and takes back out: the unwrapped model, the optimizer
and LR schedule, the loop's and the tracker's state, each rank's RNG state. A resume loads
on rank 0 from the bytes choice.choose() read, and broadcasts to the other ranks."""

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


def _plain(v: Any) -> Any:
    """A setting as compared: betas are a list in a config, a tuple in a checkpoint."""
    return tuple(v) if isinstance(v, list) else v


def _load_optimizer(d: Path, saved_meta: dict[str, Any], opt: dict[str, Any],
                    optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """The optimizer's state (moments, step counts) and the schedule's position from the
    checkpoint; its settings (lr, weight_decay, betas, ...) and the schedule's base LRs from
    this run's config, which load_state_dict alone would replace with the checkpoint's.
    Another optimizer class, or other parameter groups, cannot take the state: refused."""
    kind = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    groups = opt["optimizer"]["param_groups"]
    settings = [{k: v for k, v in g.items() if k not in ("params", "initial_lr")}
                for g in optimizer.param_groups]
    saved_kind = saved_meta.get("optimizer")
    if (saved_kind or kind) != kind or [set(g) - {"params", "initial_lr"} for g in groups] != [
            set(g) for g in settings]:
        raise _refuse(d, "optim._target_", saved_kind or "an optimizer with the settings "
                      f"{sorted(set(groups[0]) - {'params', 'initial_lr'})}",
                      f"{kind} (its state cannot be carried over)",
                      "set optim to the checkpoint's optimizer to continue it")
    base_lrs = list(scheduler.base_lrs)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    for group, mine, base in zip(optimizer.param_groups, settings, base_lrs, strict=True):
        for key in sorted(k for k in mine if k != "lr" and _plain(group[k]) != _plain(mine[k])):
            log.info("resume: optim.%s=%s from the config (the checkpoint had %s)", key,
                     mine[key], group[key])
        group.update({k: v for k, v in mine.items() if k != "lr"}, initial_lr=base)
    if base_lrs != scheduler.base_lrs:
        log.info("resume: optim.lr=%g from the config (the checkpoint had %g)", base_lrs[0],
                 scheduler.base_lrs[0])
    # The schedule at the step it reached, scaled to this run's base LR.
    scheduler.base_lrs = base_lrs
    lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, base_lrs)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


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
    _load_optimizer(d, saved_meta, opt, optimizer, scheduler)
    rng = d / f"rng-rank{env.rank}.pt"
    if rng.is_file():
        set_rng_state(load_file(rng, data=chosen.files.pop(rng.name, None)), env.device)
    else:  # more ranks than saved this checkpoint: a fresh, still deterministic stream
        torch.manual_seed(meta["seed"] * 1_000_003 + env.rank)
        log.warning("%s has no RNG state for rank %d; seeded it afresh", d, env.rank)
    log.info("resumed from %s: step %d, saved by %d ranks, now %d", d,
             state["train_state"]["step"], saved_meta["world_size"], env.world_size)
    return state
