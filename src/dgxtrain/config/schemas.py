"""The trainer's own sections: schemas whose fields hold the one default of each key, its
doc and its range check.

Hydra composes `conf/` against these dataclasses, so a typo or a wrong type fails at
composition; load.py then turns the composed tree into them once, and each one's
`__post_init__` checks its ranges next to its fields (checks.py). Only the `_target_`
groups (model, data, loss, optim) stay DictConfig, for `instantiate`; their schemas
(groups.py) check their ranges on the way. docs/configuration.md is generated from both
files (`python -m dgxtrain.tools.configdoc`).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING

from dgxtrain.config.checks import Checked

# --- the trainer's own sections -----------------------------------------------------


@dataclass
class TrainerConfig(Checked):
    section: ClassVar[str] = "trainer"
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
    """The LR at max_steps, as a fraction of optim.lr."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast of the forward pass; weights and optimizer stay fp32)."""
    compile: bool = False
    """torch.compile the model; falls back to eager with a log line if compilation fails."""
    log_every: int = 10
    """Steps between metric lines. The host also reads the non-finite guard's counters on
    these steps (a stop is voted on after every step, whatever this is)."""
    eval_every: int = 0
    """Steps between evaluations; 0 = evaluate at the end only."""
    eval_batch_size: int = 1024
    """Samples per rank per evaluation forward."""
    nonfinite: str = "error"
    """A non-finite loss or gradient: error (no update from that step on, exit 3) or skip
    (drop the update on every rank, count it, and stop after max_skipped in a row)."""
    max_skipped: int = 5
    """Non-finite steps in a row after which trainer.nonfinite=skip stops (exit 3)."""

    def __post_init__(self) -> None:
        self.positive("max_steps", "global_batch_size", "log_every", "eval_batch_size",
                      "max_skipped")
        self.not_negative("warmup_steps", "eval_every", "grad_clip")
        self.require("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "must be in [0, 1]",
                     "e.g. trainer.min_lr_ratio=0.1")
        self.one_of("precision", "fp32", "bf16")
        self.one_of("nonfinite", "error", "skip")
        self.require("micro_batch_size", self.micro_batch_size is None
                     or self.micro_batch_size > 0, "must be positive",
                     "set trainer.micro_batch_size >= 1, or null for global_batch_size / "
                     "world_size")


@dataclass
class CheckpointConfig(Checked):
    section: ClassVar[str] = "checkpoint"
    every_steps: int = 200
    """Save every N steps (and always at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints to keep (at least 2, so a damaged newest one has a fallback)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in the run dir), never (start fresh; older
    checkpoints are moved aside, not deleted), or a path to a step-N dir or checkpoints dir."""
    max_failures: int = 3
    """Periodic saves failing this many times in a row end the run (a checkpoint error).
    A failed save for a requeue, or the final one, ends it at once."""

    def __post_init__(self) -> None:
        self.not_negative("every_steps")
        self.positive("max_failures")
        self.require("keep_last", self.keep_last >= 2,
                     "fewer than 2 leaves no fallback if the newest is damaged",
                     "set checkpoint.keep_last >= 2")


@dataclass
class DistConfig(Checked):
    section: ClassVar[str] = "dist"
    timeout_s: float = 300.0
    """A step or collective stuck this long ends the job (non-zero), with every rank's
    Python stack written to <run dir>/stacks/."""
    init_timeout_s: float = 1800.0
    """The same for start-up, compilation, the first step, evaluation and checkpoints."""
    rendezvous_timeout_s: float = 600.0
    """How long the ranks wait for each other at start (each reaching the launcher's store
    and checking in); then one line names the ranks that never came."""
    threads_per_rank: int = 0
    """CPU threads of each rank; 0 = the cores it owns (its CPU affinity shared among the
    ranks of its node, or SLURM_CPUS_PER_TASK). Overrides OMP_NUM_THREADS."""
    comm_hook: str = "auto"
    """How DDP all-reduces gradients: auto or allreduce (the backend's own: NCCL on GPUs,
    gloo on CPU), shm (opt-in shared memory for CPU ranks on one host), or bf16
    (compressed to bf16: half the bytes, NOT fp32 maths; NCCL only)."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size: smaller starts the all-reduce earlier in the backward,
    larger sends fewer, bigger messages."""
    gradient_as_bucket_view: bool = True
    """Gradients are views into DDP's buckets: saves a copy each way and their memory."""
    static_graph: bool = True
    """The set of parameters the model uses is the same every step (true for the built-in
    models; parameters never used are fine): DDP skips per-step bookkeeping. Off by itself
    with gradient accumulation or compile, and with find_unused_parameters."""
    find_unused_parameters: bool = False
    """The model leaves some parameters unused on some steps (a branch, a skipped layer):
    DDP then looks for them after every forward, which costs a graph traversal per step."""

    def __post_init__(self) -> None:
        self.positive("timeout_s", "init_timeout_s", "rendezvous_timeout_s", "bucket_cap_mb")
        self.require("threads_per_rank", self.threads_per_rank >= 0, "must not be negative",
                     "set dist.threads_per_rank >= 1, or 0 for the cores owned")
        cores = os.cpu_count() or 1
        self.require("threads_per_rank", self.threads_per_rank <= cores, f"is more than "
                     f"this machine's {cores} cores", "set dist.threads_per_rank to at most "
                     "the cores of one rank, or 0 for the cores it owns")
        self.one_of("comm_hook", "auto", "allreduce", "shm", "bf16")


@dataclass
class PreemptionConfig(Checked):
    section: ClassVar[str] = "preemption"
    signals: list[str] = field(default_factory=lambda: ["USR1", "USR2", "TERM"])
    """Signals that ask the run to checkpoint after the step in progress (or the next) and
    exit for requeue (75). TERM is how SLURM preempts and torchrun stops its workers.
    Ctrl-C (INT) is always handled, apart: saved the same way, exit 75, not requeued."""
    deadline_margin_s: float = 120.0
    """Stop for requeue when the job's end time (DGXTRAIN_JOB_END_TIME, set by the batch
    script) is nearer than two steps + one checkpoint (both measured) + this margin."""
    poll_s: float = 1.0
    """How often rank 0 looks at the stop file and the clock."""
    max_idle_requeues: int = 3
    """slurm/train.sbatch ends the job, instead of requeueing it, once this many attempts in
    a row ended without a newer checkpoint (a start-up longer than an attempt's time, say);
    0 = never."""

    def __post_init__(self) -> None:
        for name in self.signals:
            self.require("signals", f"SIG{name}" in signal.Signals.__members__,
                         f"{name} is not a signal name",
                         "list names without SIG, e.g. preemption.signals=[USR1,USR2]")
            self.require("signals", name not in ("KILL", "STOP"), f"SIG{name} cannot be "
                         "caught", "use USR1, USR2 or TERM")
            self.require("signals", name != "INT", "SIGINT is Ctrl-C, always handled: "
                         "saved, then not requeued", "remove INT from preemption.signals")
        self.not_negative("deadline_margin_s", "max_idle_requeues")
        self.positive("poll_s")


@dataclass
class FaultConfig(Checked):
    """Fault injection for tests and drills; each fault fires once per run dir."""

    section: ClassVar[str] = "fault"
    crash_at_step: int = 0
    """The process exits at once (exit code 17) at this step; 0 = off."""
    hang_at_step: int = 0
    """The process stops making progress at this step."""
    nan_at_step: int = 0
    """The model's output, hence the loss, of this step is NaN."""
    nan_steps: int = 1
    """How many steps in a row, from fault.nan_at_step on, are NaN."""
    enospc_at_step: int = 0
    """Writing the checkpoint of this step fails with ENOSPC (disk full)."""
    enospc_saves: int = 1
    """How many saves in a row, from fault.enospc_at_step on, fail that way."""
    step_delay_s: float = 0.0
    """Every step of fault.rank takes this much longer: a straggler, and a slow job (the
    others wait for it), for preemption and deadline drills."""
    rank: int = 0
    """The rank the fault hits; -1 = every rank."""

    def __post_init__(self) -> None:
        self.not_negative("step_delay_s")
        self.positive("enospc_saves", "nan_steps")


@dataclass
class LoggerConfig(Checked):
    section: ClassVar[str] = "logger"
    backend: str = "none"
    """wandb (a W&B run, beside the run dir's files) or none (the run dir's files only)."""
    project: str = "dgxtrain"
    """The W&B project."""
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

    def __post_init__(self) -> None:
        self.require("backend", self.backend in ("wandb", "none"), "unknown logger backend",
                     "use logger=wandb or logger=none")
        self.require("mode", self.mode in ("auto", "online", "offline", "disabled"),
                     "unknown mode", "use logger.mode=auto, online, offline or disabled")
        self.positive("init_timeout_s")


@dataclass
class Config(Checked):
    run_name: str | None = None
    """The run dir's name (under outputs/): launched again, the run continues there. Unset,
    the name is <experiment>-<a digest of the config> (docs/checkpoints.md), or the SLURM
    job's id; DGXTRAIN_RUN_ID overrides both."""
    seed: int = 0
    """Seeds the model init, the data and the sample order."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    model: Any = MISSING
    """The model: `_target_` names any nn.Module; the other keys are its arguments."""
    data: Any = MISSING
    """The data: data=synthetic (the built-in regression, generated on the device), or
    data=dataset and data.train / data.eval, map-style Datasets of your own."""
    loss: Any = MISSING
    """The loss: `_target_` names any callable module (output, target) -> scalar mean, e.g.
    torch.nn.CrossEntropyLoss; the other keys are its arguments."""
    metrics: list[Any] = field(default_factory=lambda: ["loss"])
    """Eval metrics, by name (loss, accuracy, r2, bits_per_token, perplexity) or as
    {_target_: your.Metric}; summary.json gets eval_<name>, W&B eval/<name>."""
    optim: Any = MISSING
    """The optimizer: `_target_` names any torch.optim class; the other keys are its
    arguments."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        self.require("device", self.device in ("auto", "cpu", "cuda"), "unknown device",
                     "use device=auto, device=cpu or device=cuda")


TARGET_GROUPS = ("model", "data", "loss", "optim")
SECTIONS = ("trainer", "checkpoint", "dist", "preemption", "fault", "logger")
