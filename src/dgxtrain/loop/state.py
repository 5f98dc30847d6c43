"""The loop's state: the counters every checkpoint keeps, and why the loop stopped."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any


class StopReason(Enum):
    """Why the loop ended; the value is what summary.json says."""

    RUNNING = ""
    MAX_STEPS = "max_steps"
    REQUEUE = "requeue"  # stopped early with a checkpoint: a later attempt continues
    NON_FINITE = "non_finite"  # trainer.nonfinite=error: the first non-finite step
    TOO_MANY_SKIPS = "too_many_skips"  # trainer.nonfinite=skip: max_skipped in a row

    @property
    def failed(self) -> bool:
        return self in (StopReason.NON_FINITE, StopReason.TOO_MANY_SKIPS)


@dataclass
class TrainState:
    """The loop's counters, saved in every checkpoint; the rest follows from the config."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    checkpoint_s: float = 0.0  # the last save's measured time: the deadline's budget
    # Not saved: a resumed run is running again, whatever stopped the attempt before.
    stop_reason: StopReason = StopReason.RUNNING

    @property
    def running(self) -> bool:
        return self.stop_reason is StopReason.RUNNING

    def advance(self, samples: int) -> None:
        self.step += 1
        self.samples_seen += samples

    def state_dict(self) -> dict[str, Any]:
        saved = dataclasses.asdict(self)
        del saved["stop_reason"]
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in saved and f.name != "stop_reason":
                setattr(self, f.name, saved[f.name])
