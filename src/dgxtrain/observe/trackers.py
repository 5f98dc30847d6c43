"""Where metrics go. Rank 0 gets real trackers; every other rank gets NullTracker.

LocalTracker always writes the run dir's files (config.yaml, metrics.jsonl, summary.json,
model.pt) and the console progress line; the W&B tracker (wandb_tracker.py) runs beside it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dgxtrain.distributed import slurm
from dgxtrain.distributed.env import shared_run_id
from dgxtrain.files import finite, write_json_atomic
from dgxtrain.observe import logs

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

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        """The end of this process's part; exit_code != 0: the run goes on in a later one."""


class TrackerGroup(NullTracker):
    """Several trackers as one: each gets every call, in order."""

    def __init__(self, *trackers: NullTracker):
        self.trackers = trackers

    def state_dict(self) -> dict[str, Any]:
        return {k: v for t in self.trackers for k, v in t.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for t in self.trackers:
            t.load_state_dict(state)

    def log_config(self, cfg: DictConfig, derived: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_config(cfg, derived)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_metrics(step, metrics)

    def save_model(self, model: torch.nn.Module) -> None:
        for t in self.trackers:
            t.save_model(model)

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        for t in self.trackers:
            t.finish(summary, exit_code)


SECRET_NAME = re.compile(r"api_?key|token|secret|passw(or)?d|credential", re.IGNORECASE)


def redact(obj: Any, secrets: tuple[str, ...] | None = None) -> Any:
    """A config with secrets replaced: keys that name one, and any value holding the value
    of a secret-named environment variable (WANDB_API_KEY, HF_TOKEN, ...)."""
    if secrets is None:
        secrets = tuple(v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8)
    if isinstance(obj, dict):
        return {k: "<redacted>" if SECRET_NAME.search(str(k)) else redact(v, secrets)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return "<redacted>"
    return obj


def _fmt(v: float) -> str:
    return f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:.0f}"


class LocalTracker(NullTracker):
    def __init__(self, run_dir: Path, max_steps: int):
        self.run_dir, self.max_steps = run_dir, max_steps
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = MetricsFile(run_dir / "metrics.jsonl")

    def log_config(self, cfg: DictConfig, derived: dict[str, Any]) -> None:
        # cfg is already redacted (see _run): the run dir must hold no secret either.
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        write_json_atomic(self.run_dir / "derived.json", derived)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        self._metrics.append(step, json.dumps(finite({"step": step, **metrics}),
                                              allow_nan=False))
        if "train/loss" in metrics:
            self._progress(step, metrics)
        else:
            log.info("step %d | %s", step, " | ".join(
                f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in metrics.items()))

    def _progress(self, step: int, m: dict[str, Any]) -> None:
        frac = step / self.max_steps
        eta = timedelta(seconds=round(m["perf/step_time_s"] * (self.max_steps - step)))
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        logging.getLogger(logs.PROGRESS).info(
            f"step {step}/{self.max_steps} [{bar}] | loss {m['train/loss']:.4g}"
            f" | lr {m['train/lr']:.2e} | grad {m['train/grad_norm']:.3g}"
            f" | {_fmt(m['perf/samples_per_s'])} samples/s"
            f" | {m['perf/step_time_s'] * 1e3:.1f} ms/step | eta {eta}")

    def save_model(self, model: torch.nn.Module) -> None:
        """The trained weights as a plain state_dict (loads with weights_only=True)."""
        tmp = self.run_dir / "model.pt.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, self.run_dir / "model.pt")

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        logs.end_progress()
        self._metrics.close()
        if exit_code == 0:
            write_json_atomic(self.run_dir / "summary.json", summary)
            log.info("summary: %s", json.dumps(summary, sort_keys=True))


class MetricsFile:
    """metrics.jsonl, one whole line per row: each row is one unbuffered write, so a crash
    leaves every row logged so far; a write the disk cannot take (ENOSPC, EIO, a quota) is
    cut back to the last whole line and warned of once while it lasts, and training goes
    on (the console and W&B still get the rows). A line torn by a kill mid-write is removed
    at the next start, so the first row appended after it is not swallowed by it."""

    def __init__(self, path: Path):
        self.path = path
        _drop_torn_tail(path)
        self._f = open(path, "ab", buffering=0)
        self._whole = self._f.tell()  # bytes up to the end of the last whole line
        self._lost: list[int] = []  # steps whose rows could not be written, this episode

    def append(self, step: int, line: str) -> None:
        data = (line + "\n").encode()
        try:
            if self._f.write(data) != len(data):  # a short write: the disk filled mid-row
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            self._cut_back()
            if not self._lost:
                log.warning("%s: cannot write the row of step %d (%s); training goes on, "
                            "rows not saved until it can (the log and W&B still get them)",
                            self.path, step, e.strerror or e)
            self._lost.append(step)
            return
        self._whole += len(data)
        if self._lost:
            log.warning("%s: writing again from step %d; the rows of %d log steps (%d..%d) "
                        "are not in it", self.path, step, len(self._lost), self._lost[0],
                        self._lost[-1])
            self._lost = []

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._f.fileno(), self._whole)
        except OSError as e:  # the start drops what is left, and readers skip it
            log.debug("could not cut %s back to its last whole line: %s", self.path, e)

    def close(self) -> None:
        self._f.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut `path` back to its last newline, if a kill left it ending mid-line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            chunk = f.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        f.truncate(end)
    log.warning("%s ended in a line cut short (%d bytes, written when the run was killed or "
                "the disk was full): removed", path, size - end)


def logged_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows by step, training row before eval row; a step logged again after
    a resume counts once (the later line). Lines cut short by a kill are skipped."""
    path, rows = run_dir / "metrics.jsonl", {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            rows[(row["step"], "train/loss" not in row)] = row
    return [rows[k] for k in sorted(rows)]


def build_tracker(cfg: DictConfig, is_main: bool, run_dir: Path, *, fresh: bool = False,
                  group: str | None = None, name: str = "", tags: tuple[str, ...] = ()
                  ) -> NullTracker:
    """Rank 0: the run dir's files, plus W&B with logger=wandb. Every other rank: nothing.
    fresh: the run started over, so a new W&B run, not a continuation."""
    if not is_main:
        return NullTracker()
    local = LocalTracker(run_dir, cfg.trainer.max_steps)
    if cfg.logger.backend != "wandb":
        return local
    from dgxtrain.observe.wandb_run import WandbTracker

    return TrackerGroup(local, WandbTracker(
        cfg.logger, run_dir, group=group, name=name or run_dir.name,
        tags=redact([*cfg.logger.tags, *tags]), fresh=fresh,
        logged=[] if fresh else logged_rows(run_dir)))


def run_identity(cfg: DictConfig, run_dir: Path, derived: dict[str, Any]) -> dict[str, Any]:
    """W&B group, name and tags: a sweep's points share the sweep's group, a SLURM job's
    attempts its job's; the tags say where it ran."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    group = cfg.logger.group or (shared_run_id() if sweep else slurm.run_id(os.environ))
    name = cfg.logger.name or (f"{run_dir.parent.name}/{run_dir.name}" if sweep
                               else run_dir.name)
    device = str(derived.get("device_name", "")).removeprefix("NVIDIA ").replace(" ", "-")
    tags = (f"nodes:{derived.get('nodes', 1)}", f"world:{derived.get('devices', 1)}",
            f"device:{device}")
    return {"group": group, "name": name, "tags": tags}
