"""The W&B run of a job: one per run dir, owned by rank 0, continued across restarts and
requeues, and never the reason a training run stops.

Identity: the run id lives in <run dir>/wandb/dgxtrain-run-id and in every checkpoint; a
restart resumes it (resume="allow"). Steps the run already has (a resume from a checkpoint
older than the last logged step) are not sent again: W&B would drop them ("step must only
increase") and metrics.jsonl keeps them anyway.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dgxtrain.observe.trackers import NullTracker
from dgxtrain.observe.wandb_records import last_step

log = logging.getLogger(__name__)
ID_FILE = "dgxtrain-run-id"


def has_credentials(env: Mapping[str, str] = os.environ) -> bool:
    """An API key in the environment, or a netrc entry for the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    try:
        return netrc.netrc(env.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str, env: Mapping[str, str] = os.environ) -> str:
    """auto: WANDB_MODE if set, else online with credentials and offline without."""
    if mode != "auto":
        return mode
    wanted = env.get("WANDB_MODE", "")
    if wanted in ("online", "offline", "disabled"):
        return wanted
    if wanted == "dryrun":
        return "offline"
    return "online" if has_credentials(env) else "offline"


class WandbTracker(NullTracker):
    def __init__(self, cfg: Any, run_dir: Path, *, group: str | None, name: str,
                 tags: list[str], fresh: bool, logged: list[dict[str, Any]]):
        """fresh: a new W&B run even if the run dir had one; logged: metrics.jsonl's rows."""
        self.cfg, self.run_dir = cfg, run_dir
        self.group, self.name, self.tags = group, name, tags
        self.mode = resolve_mode(cfg.mode)
        self.id_file = run_dir / "wandb" / ID_FILE
        self.id: str | None = None
        if not fresh and self.id_file.exists():
            self.id = self.id_file.read_text().strip() or None
        self.logged = logged
        # Steps up to here were logged before this start: never sent twice.
        self.last_step = max((r["step"] for r in logged if "train/loss" in r), default=0)
        self.run: Any = None
        self._failed = False
        self._skipped: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.id} if self.id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The checkpoint's id wins: it names the run the resumed state belongs to.
        self.id = state.get("wandb_run_id") or self.id

    def log_config(self, cfg: Any, derived: dict[str, Any]) -> None:
        if self.mode == "disabled":
            log.info("W&B disabled (logger.mode or WANDB_MODE)")
            return
        if self.id is None:
            self.id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        try:
            self.id_file.parent.mkdir(parents=True, exist_ok=True)
            self.id_file.write_text(self.id + "\n")
        except OSError as e:  # W&B never stops training: the run dir's files have it all
            self._warn_once(f"W&B: cannot write {self.id_file.parent} ({type(e).__name__}: "
                            f"{e.strerror or e}); no W&B run this time, metrics.jsonl and "
                            "summary.json hold every value")
            return
        config = {**cfg, "derived": derived}
        started = time.monotonic()
        try:
            import wandb  # slow to import, and only needed here

            self.run = self._start(wandb, self.mode, config)
        except Exception as e:  # unreachable server, bad key, timeout: train on regardless
            self._warn_once(f"W&B {self.mode} start failed ({type(e).__name__}: "
                            f"{_first_line(e)}); logging offline instead")
            self.mode = "offline"
            try:
                self.run = self._start(wandb, "offline", config)
            except Exception as e2:
                log.warning("W&B offline start failed too (%s); no W&B run this time",
                            _first_line(e2))
                return
        log.info("W&B run %s (%s, %s, group %s) started in %.1f s", self.id, self.mode,
                 self.name, self.group, time.monotonic() - started)
        try:
            self._backfill()
        except Exception as e:
            self._warn_once(f"W&B could not send the earlier steps ({_first_line(e)})")

    def _steps_held(self) -> int:
        """The last step the W&B run holds: the server's, or what the earlier offline
        starts managed to write (a crash loses what W&B had not flushed yet)."""
        if self.mode == "online":
            return max(0, self.run.starting_step - 1) if self.run.resumed else 0
        mine = Path(self.run.dir).parent
        held = 0
        for f in (self.run_dir / "wandb").glob(f"offline-run-*-{self.id}*/run-{self.id}.wandb"):
            if f.parent != mine:
                try:
                    held = max(held, last_step(f))
                except (OSError, ValueError) as e:
                    log.warning("W&B: cannot read %s (%s)", f, e)
        return held

    def _backfill(self) -> None:
        """Send what metrics.jsonl has and the W&B run lacks, so that it has every step."""
        if not self.logged:
            return
        held = self._steps_held()
        missing = [r for r in self.logged if r["step"] > held]
        for row in missing:
            step = row["step"]
            self._send({k: v for k, v in row.items() if k != "step"}, step)
        if missing:
            log.info("W&B: steps %d..%d sent again from metrics.jsonl (the run held up to %d)",
                     missing[0]["step"], missing[-1]["step"], held)
        if self.last_step:
            log.info("W&B: the run holds steps up to %d; later ones follow", self.last_step)

    def _start(self, wandb: Any, mode: str, config: dict[str, Any]) -> Any:
        """wandb.init, waiting while the run id is still held: by the W&B process of a start
        that just crashed (it lingers a few seconds), or by a failed online attempt."""
        deadline = time.monotonic() + float(self.cfg.init_timeout_s)
        while True:
            try:
                return self._init(wandb, mode, config)
            except Exception as e:
                if "in use" not in str(e) or time.monotonic() > deadline:
                    raise
                log.info("W&B: run %s is still held by an earlier start; waiting", self.id)
                wandb.teardown()
                time.sleep(1.0)

    def _init(self, wandb: Any, mode: str, config: dict[str, Any]) -> Any:
        c = self.cfg
        return wandb.init(
            project=c.project, entity=c.entity, group=self.group, name=self.name,
            tags=self.tags, id=self.id, resume="allow", dir=str(self.run_dir), mode=mode,
            # silent: dgxtrain says itself what matters (start, fallback, the sync command).
            config=config, settings=wandb.Settings(init_timeout=float(c.init_timeout_s),
                                                   silent=True))

    def _warn_once(self, message: str) -> None:
        if not self._failed:
            log.warning("%s; training goes on", message)
        self._failed = True

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        if step < self.last_step or (step == self.last_step and "train/loss" in metrics):
            self._skipped.append(step)
            return
        if self._skipped:
            log.info("W&B: steps %d..%d were logged before this restart; not sent again",
                     self._skipped[0], self._skipped[-1])
            self._skipped.clear()
        self._send(metrics, step)
        self.last_step = step

    def _send(self, metrics: dict[str, Any], step: int) -> None:
        try:
            self.run.log(metrics, step=step)
        except Exception as e:
            self._warn_once(f"W&B log failed ({_first_line(e)})")

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            if exit_code == 0:
                self.run.summary.update(summary)
            else:
                self.run.mark_preempting()  # the UI says preempted, not crashed
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            self._warn_once(f"W&B finish failed ({_first_line(e)})")
        if self.mode == "offline":
            log.info("W&B run saved offline; to upload it: wandb sync %s",
                     " ".join(str(p) for p in sorted(
                         (self.run_dir / "wandb").glob(f"offline-run-*-{self.id}"))))
        self.run = None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
