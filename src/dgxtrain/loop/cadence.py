"""Which steps log, evaluate, save, and read the ranks' decisions: a pure function of the
config and the step, so every rank agrees without a word."""

from __future__ import annotations

from dgxtrain.config import TrainerConfig


class Cadence:
    def __init__(self, t: TrainerConfig, save_every: int, first_step: int):
        self.t, self.save_every, self.first_step = t, save_every, first_step

    def logs(self, step: int) -> bool:
        return step % self.t.log_every == 0 or step == self.t.max_steps

    def evaluates(self, step: int) -> bool:
        """Evaluation during training; the final one follows the loop."""
        every = self.t.eval_every
        return bool(every) and step % every == 0 and step != self.t.max_steps

    def saves(self, step: int) -> bool:
        return step == self.t.max_steps or bool(self.save_every) and step % self.save_every == 0

    def decides(self, step: int) -> bool:
        """Steps where the host reads the decisions: those where it acts on the step anyway
        (logs, evaluations, saves, the end), and this attempt's first step."""
        return (step == self.first_step or self.logs(step) or self.evaluates(step)
                or self.saves(step))
