"""Typed config schemas, validation with fix-it messages, and the derived run values.

Hydra composes `conf/`; the dataclasses below are the schema each group file extends, so
a typo or a wrong type fails at composition. `validate()` then checks what types cannot
(ranges, divisibility, the device) before any process group or GPU work starts.
"""

from __future__ import annotations

import importlib
import signal
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dgxtrain import dist


class ConfigError(ValueError):
    """A bad setting: one line naming the key, the value and the fix."""

    def __init__(self, key: str, value: Any, problem: str, fix: str):
        super().__init__(f"{key}={value}: {problem}; fix: {fix}")
        self.key = key


# --- schemas ------------------------------------------------------------------------


@dataclass
class LinearModelConfig:
    _target_: str = "dgxtrain.model.LinearRegressor"


@dataclass
class MLPModelConfig:
    _target_: str = "dgxtrain.model.MLPRegressor"
    hidden_dim: int = 256
    """Width of every hidden layer."""
    num_layers: int = 2
    """Number of hidden layers (each Linear + GELU)."""


@dataclass
class SyntheticDataConfig:
    _target_: str = "dgxtrain.data.SyntheticRegression"
    dim: int = 32
    """Input features per sample."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian label noise."""
    num_samples: int = 1_000_000
    """Training indices [0, num_samples); costs no memory, 1e9 is fine."""
    eval_samples: int = 4096
    """Held-out indices [num_samples, num_samples + eval_samples)."""
    target: str = "nonlinear"
    """Ground truth: linear (w.x + b) or nonlinear (linear + sum of sines)."""


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    fused: bool = True
    """One kernel for the whole update instead of a dozen passes per tensor (CPU and
    CUDA); the same maths up to rounding."""


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    weight_decay: float = 0.0
    momentum: float = 0.9
    fused: bool = True
    """One kernel for the whole update (CPU and CUDA); the same maths up to rounding."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps to run."""
    global_batch_size: int = 512
    """Samples per optimizer step, summed over all ranks and micro-batches."""
    micro_batch_size: int | None = None
    """Samples per rank per forward; null = global_batch_size / world_size (no accumulation)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    warmup_steps: int = 50
    """Linear LR warm-up from 0, then cosine decay to min_lr_ratio * lr at max_steps."""
    min_lr_ratio: float = 0.1
    precision: str = "fp32"
    """fp32, or bf16 (autocast of the forward pass; weights and optimizer stay fp32)."""
    compile: bool = False
    """torch.compile the model; falls back to eager with a log line if compilation fails."""
    log_every: int = 10
    """Steps between metric lines (the loss is averaged over ranks only on these)."""
    eval_every: int = 0
    """Steps between evaluations; 0 = evaluate at the end only."""
    eval_batch_size: int = 1024
    nonfinite: str = "error"
    """A non-finite loss or gradient: error (stop before the update, exit 3) or skip (drop
    the update on every rank, count it, and stop after max_skipped in a row)."""
    max_skipped: int = 5


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    """Save every N steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints to keep (at least 2, so a damaged newest one has a fallback)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in the run dir), never (start fresh; older
    checkpoints are moved aside, not deleted), or a path to a step-N dir or checkpoints dir."""


@dataclass
class DistConfig:
    timeout_s: float = 300.0
    """A step or collective stuck this long ends the job (non-zero), with every rank's
    Python stack written to <run dir>/stacks/."""
    init_timeout_s: float = 1800.0
    """The same for start-up, compilation, the first step, evaluation and checkpoints."""
    threads_per_rank: int = 0
    """CPU threads of each rank; 0 = the cores it owns (its CPU affinity shared among the
    ranks of its node, or SLURM_CPUS_PER_TASK). Overrides OMP_NUM_THREADS."""
    comm_hook: str = "auto"
    """How DDP all-reduces gradients: allreduce (the backend's own: NCCL, gloo), shm
    (shared memory; CPU ranks on one host), auto (shm where it works, else allreduce), or
    bf16 (compressed to bf16: half the bytes, NOT fp32 maths; never chosen by auto)."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size: smaller starts the all-reduce earlier in the backward,
    larger sends fewer, bigger messages."""
    gradient_as_bucket_view: bool = True
    """Gradients are views into DDP's buckets: saves a copy each way and their memory."""
    static_graph: bool = True
    """The model uses the same parameters every step (true for the built-in models): DDP
    skips per-step bookkeeping. Set false for a model whose used parameters vary."""


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["USR1", "USR2"])
    """Signals that ask the run to checkpoint at the next step and exit for requeue (75).
    Add TERM where the scheduler sends SIGTERM with a grace period and nothing else."""
    deadline_margin_s: float = 120.0
    """Stop for requeue when the job's end time (DGXTRAIN_JOB_END_TIME, set by the batch
    script) is nearer than one step + one checkpoint (both measured) + this margin."""
    poll_s: float = 1.0
    """How often rank 0 looks at the stop file and the clock."""


@dataclass
class FaultConfig:
    """Fault injection for tests and drills; each fault fires once per run dir."""

    crash_at_step: int = 0
    """The process exits at once (exit code 17) at this step; 0 = off."""
    hang_at_step: int = 0
    """The process stops making progress at this step."""
    nan_at_step: int = 0
    """The loss of this step is NaN."""
    enospc_at_step: int = 0
    """Writing the checkpoint of this step fails with ENOSPC (disk full)."""
    step_delay_s: float = 0.0
    """Every step of fault.rank takes this much longer: a straggler, and a slow job (the
    others wait for it), for preemption and deadline drills."""
    rank: int = 0
    """The rank the fault hits; -1 = every rank."""


@dataclass
class LoggerConfig:
    backend: str = "none"
    """wandb (a W&B run, beside the run dir's files) or none (the run dir's files only)."""
    project: str = "dgxtrain"
    entity: str | None = None
    """The W&B team or user; null = the API key's default."""
    group: str | None = None
    """null = the SLURM job (slurm-<id>) or the sweep; a name of your own otherwise."""
    name: str | None = None
    """null = the run dir's name (the sweep point's number in a sweep)."""
    tags: list[str] = field(default_factory=list)
    """Added to the automatic ones: nodes:<n>, world:<n>, device:<name>."""
    mode: str = "auto"
    """auto (online with W&B credentials, else offline), online, offline or disabled."""
    init_timeout_s: float = 90.0
    """How long W&B may take to start before the run logs offline instead."""


@dataclass
class Config:
    seed: int = 0
    """Seeds the model init, the data and the sample order."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    model: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    logger: Any = MISSING


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, name, node in [
        ("model", "linear_schema", LinearModelConfig),
        ("model", "mlp_schema", MLPModelConfig),
        ("data", "synthetic_schema", SyntheticDataConfig),
        ("optim", "adamw_schema", AdamWConfig),
        ("optim", "sgd_schema", SGDConfig),
        ("trainer", "trainer_schema", TrainerConfig),
        ("logger", "logger_schema", LoggerConfig),
    ]:
        cs.store(group=group, name=name, node=node)


def register_resolvers() -> None:
    # The run dir must be the same on every rank: ${now:} is resolved per process, so the
    # id comes from what the launcher shares (see dist.shared_run_id).
    OmegaConf.register_new_resolver("dgx_run_id", dist.shared_run_id, replace=True)
    # Only rank 0 writes Hydra's .hydra/ folder; N ranks writing the same files race.
    OmegaConf.register_new_resolver(
        "dgx_hydra_subdir", lambda: ".hydra" if dist.env_rank() == 0 else None, replace=True
    )


# --- validation ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Values derived once from the config and the world, logged at start."""

    world_size: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int


def _require(cfg: DictConfig, key: str, ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(key, OmegaConf.select(cfg, key), problem, fix)


def _check_target(cfg: DictConfig, group: str) -> None:
    key = f"{group}._target_"
    target = OmegaConf.select(cfg, key)
    module, _, name = str(target).rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(key, target, f"cannot import it ({e})",
                          "give the full dotted path of a class on PYTHONPATH") from e


def validate(cfg: DictConfig, world_size: int, cuda_available: bool) -> RunSpec:
    """Check what types cannot; raise ConfigError naming the key and the fix."""
    _require(cfg, "device", cfg.device in ("auto", "cpu", "cuda"),
             "unknown device", "use device=auto, device=cpu or device=cuda")
    _require(cfg, "device", cfg.device != "cuda" or cuda_available,
             "no CUDA GPU is visible (torch.cuda.is_available() is False)",
             "use device=auto or device=cpu, or run on a GPU node")
    for group in ("model", "data", "optim"):
        _check_target(cfg, group)

    t = cfg.trainer
    for key in ("max_steps", "global_batch_size", "log_every", "eval_batch_size"):
        _require(cfg, f"trainer.{key}", t[key] > 0, "must be positive",
                 f"set trainer.{key} to an integer >= 1")
    for key in ("warmup_steps", "eval_every", "grad_clip"):
        _require(cfg, f"trainer.{key}", t[key] >= 0, "must not be negative",
                 f"set trainer.{key} >= 0 (0 disables it)")
    _require(cfg, "trainer.min_lr_ratio", 0.0 <= t.min_lr_ratio <= 1.0,
             "must be in [0, 1]", "e.g. trainer.min_lr_ratio=0.1")
    _require(cfg, "trainer.nonfinite", t.nonfinite in ("error", "skip"),
             "unknown mode", "use trainer.nonfinite=error or trainer.nonfinite=skip")
    _require(cfg, "trainer.max_skipped", t.max_skipped > 0, "must be positive",
             "set trainer.max_skipped to an integer >= 1")
    c = cfg.checkpoint
    _require(cfg, "checkpoint.every_steps", c.every_steps >= 0, "must not be negative",
             "set checkpoint.every_steps >= 0 (0 = only at the end)")
    _require(cfg, "checkpoint.keep_last", c.keep_last >= 2,
             "fewer than 2 leaves no fallback if the newest is damaged",
             "set checkpoint.keep_last >= 2")
    for key in ("timeout_s", "init_timeout_s"):
        _require(cfg, f"dist.{key}", cfg.dist[key] > 0, "must be positive",
                 f"set dist.{key} to a number of seconds > 0")
    _require(cfg, "dist.threads_per_rank", cfg.dist.threads_per_rank >= 0,
             "must not be negative", "set dist.threads_per_rank >= 1, or 0 for the cores owned")
    _require(cfg, "dist.comm_hook", cfg.dist.comm_hook in ("auto", "allreduce", "shm", "bf16"),
             "unknown hook", "use dist.comm_hook=auto, allreduce, shm or bf16")
    _require(cfg, "dist.bucket_cap_mb", cfg.dist.bucket_cap_mb > 0, "must be positive",
             "set dist.bucket_cap_mb to megabytes > 0, e.g. 25")
    p = cfg.preemption
    for name in p.signals:
        _require(cfg, "preemption.signals", f"SIG{name}" in signal.Signals.__members__,
                 f"{name} is not a signal name", "list names without SIG, e.g. "
                 "preemption.signals=[USR1,USR2]")
        _require(cfg, "preemption.signals", name not in ("KILL", "STOP"),
                 f"SIG{name} cannot be caught", "use USR1, USR2 or TERM")
    _require(cfg, "preemption.deadline_margin_s", p.deadline_margin_s >= 0,
             "must not be negative", "set preemption.deadline_margin_s to seconds >= 0")
    _require(cfg, "preemption.poll_s", p.poll_s > 0, "must be positive",
             "set preemption.poll_s to seconds > 0, e.g. 1")
    _require(cfg, "fault.step_delay_s", cfg.fault.step_delay_s >= 0, "must not be negative",
             "set fault.step_delay_s >= 0 (0 = off)")
    _require(cfg, "trainer.precision", t.precision in ("fp32", "bf16"),
             "unknown precision", "use trainer.precision=fp32 or trainer.precision=bf16")

    _require(cfg, "optim.lr", cfg.optim.get("lr", 1.0) > 0, "must be positive",
             "set optim.lr to a positive number, e.g. optim.lr=1e-3")
    _require(cfg, "optim.weight_decay", cfg.optim.get("weight_decay", 0.0) >= 0,
             "must not be negative", "set optim.weight_decay >= 0")
    for key in ("hidden_dim", "num_layers"):
        _require(cfg, f"model.{key}", cfg.model.get(key, 1) > 0, "must be positive",
                 f"set model.{key} to an integer >= 1")
    for key in ("dim", "num_samples", "eval_samples"):
        _require(cfg, f"data.{key}", cfg.data.get(key, 1) > 0, "must be positive",
                 f"set data.{key} to an integer >= 1")
    _require(cfg, "data.num_samples", cfg.data.get("num_samples", 1) <= 2**62,
             "too large for the sample index space", "use data.num_samples <= 2**62")
    _require(cfg, "data.noise_std", cfg.data.get("noise_std", 0.0) >= 0,
             "must not be negative", "set data.noise_std >= 0")
    lg = cfg.logger
    _require(cfg, "logger.backend", lg.backend in ("wandb", "none"),
             "unknown logger backend", "use logger=wandb or logger=none")
    _require(cfg, "logger.mode", lg.mode in ("auto", "online", "offline", "disabled"),
             "unknown mode", "use logger.mode=auto, online, offline or disabled")
    _require(cfg, "logger.init_timeout_s", lg.init_timeout_s > 0, "must be positive",
             "set logger.init_timeout_s to seconds > 0, e.g. 90")
    _require(cfg, "data.target", cfg.data.get("target", "linear") in ("linear", "nonlinear"),
             "unknown target", "use data.target=linear or data.target=nonlinear")

    gbs = t.global_batch_size
    _require(cfg, "trainer.global_batch_size", gbs % world_size == 0,
             f"not divisible by world_size={world_size}",
             f"use a multiple of {world_size}, e.g. {world_size * max(1, gbs // world_size)}")
    micro = t.micro_batch_size if t.micro_batch_size is not None else gbs // world_size
    _require(cfg, "trainer.micro_batch_size", micro > 0, "must be positive",
             "set trainer.micro_batch_size >= 1, or null for global_batch_size / world_size")
    per_step = micro * world_size
    _require(cfg, "trainer.global_batch_size", gbs % per_step == 0,
             f"not divisible by trainer.micro_batch_size * world_size = {micro} * {world_size}"
             f" = {per_step}",
             f"use a multiple of {per_step} (e.g. {per_step * max(1, gbs // per_step)}),"
             " or change trainer.micro_batch_size")
    return RunSpec(world_size, gbs, micro, gbs // per_step)
