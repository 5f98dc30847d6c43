"""Evaluating: held-out evaluation every trainer.eval_every steps and at the end, each rank
on its slice of the eval samples, every sample once, the task's metrics summed over ranks
in one float64 all-reduce."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dgxtrain.distributed.collectives import all_reduce_
from dgxtrain.distributed.env import DistEnv
from dgxtrain.loop.build import Job
from dgxtrain.loop.state import TrainState
from dgxtrain.loop.step import StepOutput
from dgxtrain.observe.trackers import NullTracker
from dgxtrain.tasks import Task
from dgxtrain.tasks.losses import logits


class Evaluating:
    def __init__(self, job: Job, tracker: NullTracker):
        t = job.cfg.trainer
        self.job, self.tracker = job, tracker
        self.every, self.max_steps = t.eval_every, t.max_steps

    def due(self, step: int) -> bool:
        """Evaluation during training; the final one is the loop's finish()."""
        return bool(self.every) and step % self.every == 0 and step != self.max_steps

    def after_step(self, state: TrainState, out: StepOutput) -> None:
        if self.due(out.step) and state.running:
            self.run(out.step)

    def run(self, step: int) -> dict[str, float]:
        """Evaluate now and log it; returns summary.json's eval_<name> values."""
        job = self.job
        job.watchdog.arm(job.cfg.dist.init_timeout_s)
        result = evaluate(job.task, job.model, job.env, job.cfg.trainer.eval_batch_size,
                          job.autocast)
        self.tracker.log_metrics(step, {"eval/" + k.removeprefix("eval_"): v
                                        for k, v in result.items()})
        return result


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, env: DistEnv, batch_size: int,
             autocast: Callable) -> dict[str, float]:
    """`model` is the unwrapped module: no DDP hooks or buffer broadcasts in evaluation."""
    was_training = model.training
    model.eval()
    metrics = task.metrics()
    sums = [torch.zeros(m.size, dtype=torch.float64, device=env.device) for m in metrics]
    for inputs, target in task.eval_batches(env.rank, env.world_size, batch_size, env.device):
        with autocast():
            output = task.forward(model, inputs, target)
        scores = logits(output)
        sums = [s + m.statistics(output if m.whole_output else scores, target)
                for s, m in zip(sums, metrics)]
    model.train(was_training)
    totals = all_reduce_(torch.cat(sums)).tolist()
    out: dict[str, float] = {}
    for m in metrics:
        out.update(m.values(totals[:m.size]))
        totals = totals[m.size:]
    return out
