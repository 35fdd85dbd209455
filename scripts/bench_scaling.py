"""Data-parallel scaling of one training step over a job's workers, on this machine.

Runs the reference workload (daemons/worker/op_recording.py: MLP with dropout, cross-entropy,
Adam, the loss read with ``.item()`` each step) on jobs of 1, 2 and 4 worker daemons driven over
the wire as a front would (daemons/worker/local_job.py), with one intra-op thread per worker, and
prints the time per step and the speed-up over one worker. Every worker is a CPU "virtual GPU":
on a machine with C cores, more than C workers share cores and cannot scale; record the core count
with the numbers.

    python scripts/bench_scaling.py [--batch 2048] [--steps 6] [--world-sizes 1 2 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemons.worker.local_job import LocalJob  # noqa: E402
from daemons.worker.op_recording import record_mlp_training  # noqa: E402

WORKLOAD = {"features": 512, "hidden": 1024, "classes": 10}


def time_per_step(world_size: int, recorder, steps: int) -> float:
    """Median seconds per training step; the first step (warm-up) is left out."""
    with LocalJob(world_size) as job:
        reads = job.replay(recorder.steps)
        job.sync()
    per_step = len(reads) // steps
    ends = [t for _, t in reads[per_step - 1::per_step]]   # the loss read closes each step
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


def run(world_sizes=(1, 2, 4), batch: int = 2048, steps: int = 6) -> dict[int, float]:
    """Seconds per step by world size; prints them with the speed-up over the smallest size."""
    recorder, _ = record_mlp_training(batch=batch, steps=steps, **WORKLOAD)
    times = {n: time_per_step(n, recorder, steps) for n in world_sizes}
    base_n = min(times)
    print(f"MLP {WORKLOAD['features']}-{WORKLOAD['hidden']}-{WORKLOAD['classes']}, batch {batch}, "
          f"Adam; {os.cpu_count()} CPU cores, 1 thread per worker")
    print(f"{'workers':>8} {'s/step':>10} {'speed-up':>9} {'efficiency':>11}")
    for n, t in times.items():
        speedup = times[base_n] / t
        print(f"{n:>8} {t:>10.4f} {speedup:>8.2f}x {speedup / (n / base_n):>10.0%}")
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    run(tuple(args.world_sizes), args.batch, args.steps)


if __name__ == "__main__":
    main()
