"""Saving's failure policy on its own, with checkpoint.save answering as told: only failures
in a row count towards checkpoint.max_failures (the CLI tests inject one failure; this one
takes failures between good saves)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dgxtrain import checkpoint
from dgxtrain.loop import saving
from dgxtrain.loop.state import TrainState
from dgxtrain.observe.trackers import NullTracker


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append((step, metrics))


def _saving(monkeypatch, answers: list[str | None]) -> tuple[saving.Saving, Recorder]:
    """A Saving whose saves answer `answers` in turn (None: saved; text: the failure)."""
    answers = list(answers)
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: answers.pop(0))
    monkeypatch.setattr(checkpoint, "contents", lambda *a, **k: {})
    monkeypatch.setattr(saving, "checkpoint_meta", lambda job: {})
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(every_steps=2, max_failures=2, keep_last=2),
                          trainer=SimpleNamespace(max_steps=100),
                          dist=SimpleNamespace(init_timeout_s=60.0))
    job = SimpleNamespace(cfg=cfg, watchdog=SimpleNamespace(arm=lambda s: None), run_dir=None,
                          env=None, model=None, optimizer=None, scheduler=None,
                          faults=SimpleNamespace(before_write=None))
    tracker = Recorder()
    return saving.Saving(job, tracker, first_step=1), tracker


def test_failures_between_good_saves_never_add_up(monkeypatch):
    s, tracker = _saving(monkeypatch, ["disk full", None, "disk full", None, "disk full"])
    for step in (2, 4, 6, 8, 10):
        s.save(TrainState(step=step))
    assert [(step, m["checkpoint/failures"]) for step, m in tracker.rows] == [
        (2, 1), (6, 1), (10, 1)]
    assert s.saved_at == 8


def test_max_failures_in_a_row_end_the_run_naming_the_last_good_save(monkeypatch):
    s, _ = _saving(monkeypatch, [None, "disk full", "disk full"])
    s.save(TrainState(step=2))
    s.save(TrainState(step=4))
    with pytest.raises(checkpoint.CheckpointError, match=r"2 checkpoints in a row failed.*"
                       r"resumes from checkpoints/step-2"):
        s.save(TrainState(step=6))
