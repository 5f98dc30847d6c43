"""Where metrics go. Rank 0 gets a real tracker; every other rank gets NullTracker.

LocalTracker always writes the run dir's files (config.yaml, metrics.jsonl, summary.json,
model.pt) and the console progress line; experiment trackers (W&B) plug in beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dgxtrain import logs

log = logging.getLogger(__name__)


class NullTracker:
    """Accepts everything and does nothing: the tracker of every rank but 0."""

    def state_dict(self) -> dict[str, Any]:
        """The tracker's run identity, kept in checkpoints (a W&B run id, say)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def log_config(self, cfg: DictConfig, derived: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def save_model(self, model: torch.nn.Module) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def _finite(obj: dict[str, Any]) -> dict[str, Any]:
    """NaN and inf are not JSON: they become null (strict parsers reject the file otherwise)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in obj.items()}


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _fmt(v: float) -> str:
    return f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:.0f}"


class LocalTracker(NullTracker):
    def __init__(self, run_dir: Path, max_steps: int):
        self.run_dir, self.max_steps = run_dir, max_steps
        run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a crash leaves every line logged so far readable.
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def log_config(self, cfg: DictConfig, derived: dict[str, Any]) -> None:
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        write_json_atomic(self.run_dir / "derived.json", derived)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics.write(json.dumps(_finite({"step": step, **metrics}), allow_nan=False)
                            + "\n")
        if "loss" in metrics:
            self._progress(step, metrics)
        else:
            log.info("step %d | %s", step,
                     " | ".join(f"{k} {v:.6g}" for k, v in metrics.items()))

    def _progress(self, step: int, m: dict[str, float]) -> None:
        frac = step / self.max_steps
        eta = timedelta(seconds=round(m["step_time_s"] * (self.max_steps - step)))
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        logging.getLogger(logs.PROGRESS).info(
            f"step {step}/{self.max_steps} [{bar}] | loss {m['loss']:.4g} | lr {m['lr']:.2e}"
            f" | grad {m['grad_norm']:.3g} | {_fmt(m['samples_per_s'])} samples/s"
            f" | {m['step_time_s'] * 1e3:.1f} ms/step | eta {eta}")

    def save_model(self, model: torch.nn.Module) -> None:
        """The trained weights as a plain state_dict (loads with weights_only=True)."""
        tmp = self.run_dir / "model.pt.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, self.run_dir / "model.pt")

    def finish(self, summary: dict[str, Any]) -> None:
        logs.end_progress()
        self._metrics.close()
        write_json_atomic(self.run_dir / "summary.json", summary)
        log.info("summary: %s", json.dumps(summary, sort_keys=True))


def build_tracker(cfg: DictConfig, is_main: bool, run_dir: Path) -> NullTracker:
    if not is_main:
        return NullTracker()
    return LocalTracker(run_dir, cfg.trainer.max_steps)
