"""`python -m dgxtrain.tools.report RUN_DIR [--out DIR]`: PNG plots from a run's metrics.jsonl,
for people without W&B access. Needs matplotlib: pip install 'dgxtrain[plots]'."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dgxtrain.observe.trackers import logged_rows

# Not under "dgxtrain": a training run in this process may have taken that logger over.
log = logging.getLogger("dgxtrain-report")
# The step-time breakdown, stacked: what the rank computes, then what it waits for.
PHASES = (("perf/data_s", "data"), ("perf/compute_s", "forward+backward compute"),
          ("perf/comm_wait_s", "waiting on gradient all-reduce"), ("perf/optim_s", "optimizer"))


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def render(run_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = logged_rows(run_dir)
    train = [r for r in rows if "train/loss" in r]
    for r in train:  # compute = forward+backward less the wait inside it
        r["perf/compute_s"] = r.get("perf/fwd_bwd_s", 0.0) - r.get("perf/comm_wait_s", 0.0)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(f"{title} ({run_dir.name})")
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(train, "train/loss"), label="train/loss")
    ax.plot(*_series(rows, "eval/loss"), "o-", label="eval/loss")
    ax.set(xlabel="step", ylabel="MSE", yscale="log")
    ax.legend()
    save(fig, "loss.png", "loss")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(train, "train/lr"))
    ax.set(xlabel="step", ylabel="learning rate")
    save(fig, "lr.png", "learning rate")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*_series(train, "perf/samples_per_s"), label="samples/s")
    ax.set(xlabel="step", ylabel="samples/s")
    if any(r.get("perf/mfu") is not None for r in train):
        mfu = ax.twinx()
        mfu.plot(*_series(train, "perf/mfu"), color="tab:orange", label="MFU")
        mfu.set(ylabel="MFU")
    save(fig, "throughput.png", "throughput")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in train]
    ax.stackplot(steps, *[[r.get(k, 0.0) * 1e3 for r in train] for k, _ in PHASES],
                 labels=[label for _, label in PHASES])
    ax.plot(*zip(*[(r["step"], r["perf/step_time_s"] * 1e3) for r in train]), "k--",
            label="step time (mean over the log interval)")
    ax.set(xlabel="step", ylabel="ms (on log steps, mean over ranks)")
    ax.legend(loc="upper right", fontsize="small")
    save(fig, "step_time.png", "step time")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgxtrain.tools.report", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/plots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.run_dir / "metrics.jsonl").is_file():
        log.error("dgxtrain: report: no metrics.jsonl in %s; fix: give a run dir", args.run_dir)
        return 2
    try:
        written = render(args.run_dir, args.out or args.run_dir / "plots")
    except ImportError:
        log.error("dgxtrain: report needs matplotlib; fix: pip install 'dgxtrain[plots]'")
        return 2
    for path in written:
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
