"""Data-parallel scaling of the Llama-style reference model over a job's workers, on this machine.

Issue 5: throughput with 1, 2 and 4 workers (one thread each) at a fixed per-worker batch, as
efficiency against ideal scaling, and the communication volume per step next to what plain data
parallelism needs.

The workload is examples/llama/train.py's own ``Llama`` (default size) and ``train_step``
(imported: cross-entropy, gradient clipping, AdamW), the loss read with ``.item()`` and a fresh
batch uploaded each step, as that script does. Its op stream is recorded natively
(daemons/worker/op_recording.py) with the hints the front gives (parameters ``param``, the rotary
tables ``buffer``, inputs and targets ``batch``) and AdamW's ``foreach`` implementation (what
torch picks on a cuda device), then replayed on jobs of N worker daemons driven over the wire as a
front would (daemons/worker/local_job.py). The global batch is N times the per-worker batch (weak
scaling); efficiency = tokens/s with N workers / (N x tokens/s with 1).

Communication: every worker counts the bytes it puts into collectives (collectives.py,
``BYTES``, reported by ``memory_stats``); the table shows rank 0's per step. Plain data
parallelism puts each gradient into one all-reduce per step: G = the model's gradient bytes (the
"DP" column); a ring all-reduce of that moves 2(N-1)/N x G per rank over the wire ("DP ring").
Every worker is a CPU "virtual GPU": on a machine with C cores more than C workers share cores
and cannot scale; the core count and load are printed with the numbers.

    python scripts/bench_scaling.py [--batch 8] [--seq-len 64] [--steps 5] [--world-sizes 1 2 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "llama"))

import train  # noqa: E402  examples/llama/train.py
from daemons.worker.local_job import LocalJob  # noqa: E402
from daemons.worker.op_recording import OpRecorder  # noqa: E402


def record_llama_training(batch: int, seq_len: int, steps: int, seed: int = 0):
    """The op stream of train.py's loop for ``steps`` steps of ``batch`` sequences; returns the
    recorder and the model's gradient bytes."""
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(train.CORPUS.read_bytes()), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    model = train.Llama(max_len=max(128, seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, foreach=True)
    batches = [train.sample_batch(data, batch, seq_len, generator) for _ in range(steps)]
    recorder = OpRecorder()
    with recorder:
        for p in model.parameters():
            recorder.put(p, "param")
        for b in model.buffers():
            recorder.put(b, "buffer")
        for inputs, targets in batches:
            inputs, targets = inputs.contiguous(), targets.contiguous()
            recorder.put(inputs, "batch")
            recorder.put(targets, "batch")
            train.train_step(model, optimizer, inputs, targets, "cpu").item()
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return recorder, grad_bytes


def measure(world_size: int, recorder, steps: int) -> tuple[float, dict[str, float]]:
    """(median seconds per step, rank 0's collective bytes per step by collective); the first
    step (warm-up) is left out."""
    def collective_bytes(job) -> Counter:
        return Counter(job.call("memory_stats", {})[0].get("collective_bytes", {}))

    fetches = [i for i, step in enumerate(recorder.steps) if step[0] == "fetch"]
    # The loss read closes each step. The recording also reads AdamW's step counters (host
    # tensors in a real program, recorded as device tensors here): those are not step ends.
    per_step = len(fetches) // steps
    with LocalJob(world_size) as job:
        warm = job.replay(recorder.steps[:fetches[per_step - 1] + 1])
        start_bytes = collective_bytes(job)
        reads = warm + job.replay(recorder.steps[fetches[per_step - 1] + 1:])
        job.sync()
        moved = collective_bytes(job) - start_bytes
    ends = [t for _, t in reads[per_step - 1::per_step]]
    return (statistics.median(b - a for a, b in zip(ends, ends[1:])),
            {name: n / (steps - 1) for name, n in moved.items()})


def run(world_sizes=(1, 2, 4), batch: int = 8, seq_len: int = 64, steps: int = 5) -> list[dict]:
    rows = []
    for n in world_sizes:
        recorder, grad_bytes = record_llama_training(batch * n, seq_len, steps)
        seconds, comm = measure(n, recorder, steps)
        rows.append({"workers": n, "batch": batch, "seconds": seconds,
                     "tokens_per_s": batch * n * seq_len / seconds,
                     "collective_bytes": sum(comm.values()), "by_collective": comm,
                     "dp_bytes": grad_bytes if n > 1 else 0,
                     "dp_ring_bytes": 2 * (n - 1) / n * grad_bytes})
    base = next(r for r in rows if r["workers"] == min(world_sizes))
    for r in rows:
        ideal = base["tokens_per_s"] * r["workers"] / base["workers"]
        r["efficiency"] = r["tokens_per_s"] / ideal
    load = os.getloadavg()
    print(f"Llama (examples/llama, default size, {grad_bytes / 1e6:.2f} MB of float32 parameters), "
          f"seq len {seq_len}, AdamW; {os.cpu_count()} CPU cores, 1 thread per worker, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'workers':>7} {'batch/worker':>12} {'s/step':>8} {'tokens/s':>9} {'efficiency':>10} "
          f"{'collective B/step':>17} {'DP (G)':>9} {'DP ring':>9}")
    for r in rows:
        print(f"{r['workers']:>7} {r['batch']:>12} {r['seconds']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['efficiency']:>10.0%} {r['collective_bytes']:>17,.0f} {r['dp_bytes']:>9,} "
              f"{r['dp_ring_bytes']:>9,.0f}")
    for r in rows:
        if r["by_collective"]:
            print(f"{r['workers']} workers, bytes per step by collective: "
                  + ", ".join(f"{name} {n:,.0f}" for name, n in sorted(r["by_collective"].items())))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per worker")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per run, the first is warm-up")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    run(tuple(args.world_sizes), args.batch, args.seq_len, args.steps)


if __name__ == "__main__":
    main()
