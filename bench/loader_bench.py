"""`python -m bench.loader_bench [--quick] [--workers N] [--json PATH]`: dgxtrain's
loader path (data/loader.py) against a plain DistributedSampler + DataLoader loop, in one
process, on Digits(train, augment=True) as rank 0 of 2 ranks, 128 samples per rank.

  - throughput, samples/s, at num_workers 0 and N (forkserver, persistent workers,
    prefetch_factor 2, both sides): the steady state only, from the first batch's arrival
    to the last, so worker start-up (reported apart) counts on neither side; rounds
    alternate the order (ours, plain, plain, ours, ...) so drift hits both; medians of the
    rounds, ratio = ours / plain (its target, >= 0.95, is shown, never enforced);
  - resume: ours, building the loader at step 10 and at step 1e6 to its first batch; against
    skipping k batches of a BatchSampler (Accelerate's skip_first_batches) and replaying k
    loaded batches (Lightning, Composer, when a sampler cannot seek), measured at two k and
    extrapolated linearly to k = 1e6.
Writes JSON (--json) and a table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from dgxtrain.data.loader import StepSampler, make_loader
from dgxtrain.data.order import GlobalBatchSchedule
from dgxtrain.observe import logs
from dgxtrain.tasks.examples.digits import Digits
from dgxtrain.tools import measure

log = logging.getLogger("bench.loader_bench")
BATCH, WORLD, SEED, TARGET, FAR = 128, 2, 0, 0.95, 10**6


# The RNGs Digits' augmentation draws from, as conf/data/digits.yaml lists them.
SEED_RNGS = ["torch"]


def ours(ds: Dataset, workers: int, start: int, end: int) -> tuple[DataLoader, StepSampler]:
    """The trainer's loader (tasks/dataset.py): rank 0's slice of global batches start..end."""
    sampler = StepSampler(GlobalBatchSchedule(len(ds), SEED, BATCH * WORLD, 0, WORLD, BATCH),
                          start, end, SEED)
    return make_loader(ds, sampler, num_workers=workers, prefetch_factor=2,
                       persistent_workers=True, start_method="forkserver",
                       pin_memory=False, seed_rngs=SEED_RNGS), sampler


def plain(ds: Dataset, workers: int) -> tuple[DataLoader, DistributedSampler]:
    """The loop a user writes; drop_last on the loader too: full batches, as ours."""
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=0, shuffle=True, seed=SEED,
                                 drop_last=True)
    extra = {"prefetch_factor": 2, "persistent_workers": True,
             "multiprocessing_context": "forkserver"} if workers else {}
    return DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers,
                      drop_last=True, **extra), sampler


def epochs(batches: Any, sampler: DistributedSampler, counter: Iterator[int]) -> Iterator:
    """The plain loop's batches, epoch after epoch (set_epoch each, as users must)."""
    for epoch in counter:
        sampler.set_epoch(epoch)
        yield from batches


def steady(batches: Iterator, n: int) -> tuple[float, float]:
    """(samples/s from the first batch's arrival to the n-th's, seconds to the first)."""
    t0 = time.perf_counter()
    next(batches)
    t1, samples = time.perf_counter(), 0
    for _ in range(n - 1):
        samples += len(next(batches)[1])
    return samples / (time.perf_counter() - t1), t1 - t0


def throughput(ds: Dataset, workers: int, rounds: int, steps: int) -> dict[str, Any]:
    """Interleaved rounds of `steps` batches per side."""
    (mine, step_sampler), (theirs, dist_sampler) = ours(ds, workers, 0, 0), plain(ds, workers)
    counter, starts = itertools.count(), itertools.count(0, steps)

    def run_ours() -> tuple[float, float]:
        # Each round reads new steps. Rounds start at multiples of `steps` (a divisor of 512)
        # so the schedule's refill (every 65536 // 128 = 512 steps) falls on a first batch,
        # outside the timing (the first refill is in ours' start-up figure).
        step_sampler.start = next(starts)
        step_sampler.end = step_sampler.start + steps
        return steady(iter(mine), steps)  # a new iter() drops what was prefetched

    sides = {"ours": run_ours,
             "plain": lambda: steady(epochs(theirs, dist_sampler, counter), steps)}
    startup = {name: fn()[1] for name, fn in sides.items()}  # round -1: workers start
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    for r in range(rounds):
        for name in (["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]):
            rates[name].append(sides[name]()[0])
        log.info("w%d round %d/%d: ours %.0f, plain %.0f samples/s", workers, r + 1, rounds,
                 rates["ours"][-1], rates["plain"][-1])
    a, b = statistics.median(rates["ours"]), statistics.median(rates["plain"])
    return {"ours_samples_per_s": rates["ours"], "plain_samples_per_s": rates["plain"],
            "ours_median": a, "plain_median": b, "ratio": a / b,
            "startup_s": startup, "meets_target": a / b >= TARGET}


def first_batch_s(ds: Dataset, workers: int, start: int) -> float:
    """Seconds from building our loader at step `start` to its first batch."""
    t0 = time.perf_counter()
    loader, _ = ours(ds, workers, start, start + 1)
    next(it := iter(loader))
    seconds = time.perf_counter() - t0
    del it  # stops the workers, outside the timing
    return seconds


def discard_s(batches: Any, sampler: DistributedSampler, k: int) -> float:
    """Seconds to produce and discard k batches across epochs: of indices (a BatchSampler,
    as Accelerate's skip_first_batches) or of data (a DataLoader, as a replay)."""
    t0 = time.perf_counter()
    for _ in itertools.islice(epochs(batches, sampler, itertools.count()), k):
        pass
    return time.perf_counter() - t0


def extrapolate(measured: dict[int, float], to: int = FAR) -> dict[str, Any]:
    """The line through the two measured points, at k = `to`."""
    (k1, t1), (k2, t2) = sorted(measured.items())
    slope = (t2 - t1) / (k2 - k1) if t2 > t1 else t2 / k2  # noise: the rate at the larger k
    return {"measured": {str(k): t for k, t in measured.items()},
            "extrapolated_1e6": t2 + slope * (to - k2)}


def resume(ds: Dataset, workers: int, repeats: int, skip_k: int,
           replay_k: int) -> dict[str, Any]:
    """Ours at steps 10 and 1e6 (0 workers: the seek alone; then with workers, start-up
    included), against skipping and replaying k batches."""
    log.info("resume: ours at steps 10 and 1e6, then skipping and replaying batches")
    starts, times = (10, FAR), {10: [], FAR: []}
    for r in range(repeats):  # alternating, as the throughput rounds
        for s in (starts if r % 2 == 0 else starts[::-1]):
            times[s].append(first_batch_s(ds, 0, s))
    with_workers = {str(s): first_batch_s(ds, workers, s) for s in starts} if workers else {}
    loader, sampler = plain(ds, workers)
    batches = BatchSampler(sampler, BATCH, drop_last=True)
    skip = extrapolate({k: discard_s(batches, sampler, k) for k in (10, skip_k)})
    discard_s(loader, sampler, 1)  # starts the workers: the replay is timed at its best
    replay = extrapolate({k: discard_s(loader, sampler, k) for k in (10, replay_k)})
    return {"ours_first_batch_s": {str(s): statistics.median(t) for s, t in times.items()},
            "ours_first_batch_rounds_s": {str(s): t for s, t in times.items()},
            "ours_first_batch_workers_s": with_workers,
            "skip_sampler_s": skip, "replay_loading_s": replay}


def table(r: dict[str, Any]) -> str:
    w, res, far = r["workload"], r["resume"], str(FAR)
    lines = [f"loader bench: {w['dataset']}, {w['samples']} samples, {w['batch_per_rank']}/rank"
             f" x {w['world_size']} ranks; {w['rounds']} rounds x {w['steps_per_round']} steps",
             "workers  ours/s  plain/s  ratio  target   start-up ours  plain"]
    for key, t in r["throughput"].items():
        lines.append(f"{key[1:]:>7} {t['ours_median']:>7.0f} {t['plain_median']:>8.0f} "
                     f"{t['ratio']:>6.2f}  {'met' if t['meets_target'] else 'MISSED':<6} "
                     f"{t['startup_s']['ours']:>14.2f}s {t['startup_s']['plain']:>5.2f}s")
    lines.append("resume (s)                        k/step=10  k/step=1e6")
    for name, label in (("ours_first_batch_s", "ours, build to 1st batch, 0 wkr"),
                        ("ours_first_batch_workers_s", f"ours, same, {w['workers'][-1]} workers")):
        if res[name]:
            lines.append(f"{label:<33} {res[name]['10']:>9.3f} {res[name][far]:>11.3f}")
    for name, label in (("skip_sampler_s", "skip batches, sampler only"),
                        ("replay_loading_s", "replay, loading")):
        (_, t), (k, t2) = sorted(res[name]["measured"].items(), key=lambda kv: int(kv[0]))
        lines.append(f"{label:<33} {t:>9.4f} {res[name]['extrapolated_1e6']:>11.1f}"
                     f"  (extrapolated; measured k={k}: {t2:.3f}s)")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loader_bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds, small k (CI)")
    p.add_argument("--workers", type=int, default=2, help="loader workers besides 0")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error("--workers must be >= 0")
    args.rounds, args.steps, args.repeats = (3, 32, 1) if args.quick else (11, 64, 3)
    args.skip_k, args.replay_k = (10**3, 50) if args.quick else (10**4, 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs.setup_logging(0)
    torch.set_num_threads(1)  # as a trainer's rank on a shared host; workers use 1 too
    ds = Digits(split="train", augment=True)
    workers = sorted({0, args.workers})
    result: dict[str, Any] = {
        "workload": {"dataset": "Digits(split='train', augment=True)", "samples": len(ds),
                     "batch_per_rank": BATCH, "world_size": WORLD, "rank": 0, "seed": SEED,
                     "workers": workers, "rounds": args.rounds, "steps_per_round": args.steps,
                     "start_method": "forkserver", "prefetch_factor": 2, "target_ratio": TARGET,
                     "seed_rngs": SEED_RNGS,
                     "quick": args.quick, "torch": torch.__version__},
        "throughput": {f"w{w}": throughput(ds, w, args.rounds, args.steps) for w in workers},
        "resume": resume(ds, args.workers, args.repeats, args.skip_k, args.replay_k)}
    sys.stdout.write(table(result))
    measure.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
