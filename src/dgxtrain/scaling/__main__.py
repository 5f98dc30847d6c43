"""Predict a DDP step's time and weak-scaling efficiency from 1 to 1024 GPUs, for the model
that Hydra overrides (as for training) choose, from its FLOPs and a GPU's rate:
    python -m dgxtrain.scaling experiment=dgx_8gpu --peak-tflops 989 --mfu 0.42
or the model against published scaling results: python -m dgxtrain.scaling --published.
With the GEMM rate and all-reduce measured on your own nodes instead:
    torchrun --standalone --nproc_per_node=8 -m dgxtrain.tools.doctor --predict <overrides>
The bandwidth is the published DGX H100/H200 figures' (scaling/bandwidth.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dgxtrain.observe import logs
from dgxtrain.scaling import model, published, workload
from dgxtrain.tools import measure


def from_flops(args: argparse.Namespace) -> dict[str, Any]:
    """One GPU's compute from the model's FLOPs at peak x MFU."""
    w = workload.build(args.overrides, args.micro_batch)
    compute = w.compute(args.peak_tflops, args.mfu)
    return {"workload": {"overrides": args.overrides, **w.describe(),
                         "peak_tflops": args.peak_tflops, "mfu": args.mfu},
            "compute": {"forward_s": compute.forward_s, "backward_s": compute.backward_s,
                        "optimizer_s": 0.0, "step_s": compute.step_s},
            "table": model.table(compute, w.bucket_bytes, model.GPUS, overlap=True)}


def render(r: dict[str, Any]) -> str:
    w, c = r["workload"], r["compute"]
    lines = [f"workload: {w['parameters']:,} parameters, {w['grad_bytes'] / 2**20:.1f} MiB of "
             f"gradients in {len(w['bucket_bytes'])} buckets, {w['micro_batch_per_rank']} "
             f"samples per GPU; one device's step {c['step_s'] * 1e3:.2f} ms (forward "
             f"{c['forward_s'] * 1e3:.2f}, backward {c['backward_s'] * 1e3:.2f}, optimizer "
             f"{c['optimizer_s'] * 1e3:.2f})"]
    if "measured_step_s" in r:
        lines.append(f"world of {w['world_size']}: measured step {r['measured_step_s'] * 1e3:.2f} "
                     f"ms, predicted {r['predicted_step_s'] * 1e3:.2f} ms "
                     f"({r['error']:+.1%}); all-reduce {r['predicted_comm_s'] * 1e3:.2f} ms, "
                     f"{'overlapped with' if w['overlap'] else 'after'} the backward")
    return "\n".join(lines + model.render_table(r["table"])) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dgxtrain.scaling", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the model and batch")
    p.add_argument("--micro-batch", type=int, help="samples per GPU and step (default: the "
                   "experiment's micro-batch, or its global batch over 8)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak TFLOP/s (989: H100/H200 "
                   "dense bf16)")
    p.add_argument("--mfu", type=float, default=0.42,
                   help="the share of the peak reached (default 0.42)")
    p.add_argument("--published", action="store_true", help="the model against published "
                   "scaling results (torchtitan, Horovod), and nothing else")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.micro_batch is not None and args.micro_batch < 1:
        p.error("--micro-batch must be >= 1")
    if not 0 < args.mfu <= 1:
        p.error("--mfu must be in (0, 1]")
    return args


def render_published(rows: list[dict]) -> str:
    lines = [f"{'case':<32} {'GPUs':>9} {'published':>9} {'model':>6} {'no overlap':>10} "
             f"{'comm/compute':>12}"]
    lines += [f"{r['case']:<32} {'%d->%d' % tuple(r['gpus']):>9} {r['published_kept']:>9.1%} "
              f"{r['predicted_kept']:>6.1%} {r['predicted_kept_no_overlap']:>10.1%} "
              f"{r['comm_to_compute']:>12.2f}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs.setup_logging(0)
    if args.published:
        result: dict[str, Any] = {"published": published.comparisons()}
        text = render_published(result["published"])
    elif args.peak_tflops is None:
        sys.stderr.write("dgxtrain.scaling: give --peak-tflops (and --mfu) for the compute; "
                         "to measure it and the all-reduce on your nodes, run "
                         "python -m dgxtrain.tools.doctor --predict <overrides> under torchrun "
                         "or srun\n")
        return 2
    else:
        result = from_flops(args)
        text = render(result)
    sys.stdout.write(text)
    measure.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
