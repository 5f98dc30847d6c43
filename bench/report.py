"""The benchmark's outputs: the table, the PNG, and its runs of the real CLI (peak memory
for a small and a huge dataset, and the time from launch to the first step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dgxtrain.tools.measure import human_bytes

# A launcher's variables would make the CLI wait for ranks that never come.
_LAUNCH_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC_", "SLURM_STEP",
                    "GROUP_", "ROLE_", "DGXTRAIN_RUN_ID", "DGXTRAIN_LAUNCH_TIME")


def memory_and_startup(overrides: list[str], micro_batch: int, steps: int) -> dict[str, Any]:
    """One process of `python -m dgxtrain` per data.num_samples (1e3, 1e9): the peak memory
    the trainer logs, and its launch-to-first-step time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_PREFIXES)}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dgxtrain-bench-mem-") as tmp:
        for n in (1_000, 1_000_000_000):
            run_dir = Path(tmp) / f"n{n}"
            cmd = [sys.executable, "-m", "dgxtrain", *overrides, f"data.num_samples={n}",
                   f"trainer.global_batch_size={micro_batch}", "trainer.micro_batch_size=null",
                   f"trainer.max_steps={steps}", f"trainer.log_every={steps}",
                   "checkpoint.every_steps=0", "data.eval_samples=256",
                   f"hydra.run.dir={run_dir}"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): "
                                   f"{done.stderr.strip().splitlines()[-1:]}")
            last = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()][-2:]
            row = {k: v for d in last for k, v in d.items() if k.startswith("mem/")}
            summary = json.loads((run_dir / "summary.json").read_text())
            out[f"num_samples_{n}"] = {
                "peak_gb": row.get("mem/max_allocated_gb", row["mem/max_rss_gb"]),
                "measure": "cuda max allocated" if "mem/max_allocated_gb" in row else "max RSS",
                "startup_s": summary["startup_s"]}
    out["peak_ratio_1e9_vs_1e3"] = (out["num_samples_1000000000"]["peak_gb"]
                                    / out["num_samples_1000"]["peak_gb"])
    return out


def table(r: dict[str, Any]) -> str:
    """The human-readable report (also what the README's performance section shows)."""
    w, lines = r["workload"], []
    lines.append(f"dgxtrain bench: {w['world_size']} x {w['device_name']} ({w['backend']}, "
                 f"{w['threads_per_rank']} threads/rank), {w['precision']}, compile="
                 f"{w['compile']}, {w['micro_batch_per_rank']} samples/rank/step, "
                 f"{w['rounds']} rounds x {w['steps_per_round']} steps, torch {w['torch']}")
    lines.append(f"{'loop':<12} {'samples/s':>11} {'ms/step':>8} {'TFLOP/s/dev':>12} "
                 f"{'of peak':>8}   data  fwd+bwd  optim  (comm wait, in fwd+bwd)")
    for name, loop in r["loops"].items():
        sh = loop["phase_share"]
        frac = loop["fraction_of_matmul_peak"]
        lines.append(f"{name:<12} {loop['median_samples_per_s']:>11,.0f} "
                     f"{loop['step_time_s'] * 1e3:>8.2f} {loop['tflops_per_device']:>12.4f} "
                     f"{frac if frac is not None else float('nan'):>8.2f}  {sh['data']:>6.1%} "
                     f"{sh['fwd_bwd']:>8.1%} {sh['optim']:>6.1%}  ({loop['comm_share']:.1%})")
    a = r["agreement"]
    n = r["noise"]
    lines.append(f"speedup trainer / reference (both copies): {r['speedup']:.3f}x (medians), "
                 f"{r['paired_speedup']:.3f}x (median of the rounds' ratios); the noise, "
                 f"reference_2 / reference: {n['speedup']:.3f}x, {n['paired_speedup']:.3f}x")
    lines.append(f"matmul peak {r['matmul_peak_tflops_per_device']:.4f} TFLOP/s per device")
    if "speedup_shm" in r:
        lines.append(f"speedup trainer_shm / reference: {r['speedup_shm']:.3f}x (opt-in "
                     "dist.comm_hook=shm)")
    if r.get("trainer_vs"):
        lines.append("trainer's throughput over: " + ", ".join(
            f"{name} {x:.3f}x" for name, x in r["trainer_vs"].items()))
    for name, why in w.get("loops_left_out", {}).items():
        lines.append(f"left out: {name} ({why})")
    if "mfu_vs_data_sheet" in r:
        lines.append(f"MFU vs data sheet ({r['data_sheet_peak_tflops']:.1f} TFLOP/s): "
                     f"{r['mfu_vs_data_sheet']:.3f}")
    verdict = "equal" if a["equal"] else "DIFFERENT"
    lines.append(f"parameters after {a['steps']} steps: max |diff| {a['max_abs_diff']:.2e}, "
                 f"max relative {a['max_rel_diff']:.2e} ({verdict} within {a['tolerance']:g})")
    if r["allreduce"]:
        lines.append("all-reduce   size     algbw GB/s  busbw GB/s")
        for row in r["allreduce"]:
            lines.append(f"       {human_bytes(row['bytes']):>10} {row['algbw_gbps']:>12.3f} "
                         f"{row['busbw_gbps']:>11.3f}")
    m = r.get("memory_and_startup")
    if m:
        small, huge = m["num_samples_1000"], m["num_samples_1000000000"]
        lines.append(f"peak memory ({small['measure']}): {small['peak_gb']:.3f} GB at 1e3 "
                     f"samples, {huge['peak_gb']:.3f} GB at 1e9 "
                     f"(x{m['peak_ratio_1e9_vs_1e3']:.3f}); launch to first step "
                     f"{small['startup_s']:.1f} s / {huge['startup_s']:.1f} s")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """Samples/s per round, the phase shares, and busbw over sizes, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, loop in r["loops"].items():
        axes[0].plot(range(1, len(loop["samples_per_s"]) + 1), loop["samples_per_s"], "o-",
                     label=f"{name} (median {loop['median_samples_per_s']:,.0f})")
    axes[0].set(title=f"throughput, speedup {r['speedup']:.2f}x", xlabel="round",
                ylabel="samples/s")
    axes[0].legend()
    names = list(r["loops"])
    bottom = [0.0] * len(names)
    for phase in ("data", "fwd_bwd", "optim"):
        ms = [r["loops"][n]["phase_s"][phase] * 1e3 for n in names]
        axes[1].bar(names, ms, bottom=bottom, label=phase)
        bottom = [b + m for b, m in zip(bottom, ms)]
    axes[1].plot(names, [r["loops"][n]["phase_s"]["comm"] * 1e3 for n in names], "k_",
                 markersize=30, label="comm wait (in fwd_bwd)")
    axes[1].set(title="time per step by phase", ylabel="ms")
    axes[1].legend()
    if r["allreduce"]:
        sizes = [row["bytes"] for row in r["allreduce"]]
        axes[2].semilogx(sizes, [row["busbw_gbps"] for row in r["allreduce"]], "o-",
                         label="busbw")
        axes[2].semilogx(sizes, [row["algbw_gbps"] for row in r["allreduce"]], "s--",
                         label="algbw")
        axes[2].legend()
    axes[2].set(title=f"all-reduce ({r['workload']['backend']})", xlabel="bytes",
                ylabel="GB/s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
