"""accelerate's find_executable_batch_size, fairseq's skipped batches: a program that catches the
out-of-memory error of a try and goes on with a smaller batch. ``train`` is imported by the tests
of a one-worker device; run as a program it trains against a job's workers.

argv: the secret, then the workers' addresses, rank 0 first. Prints one JSON line.
"""
from __future__ import annotations

import json
import sys

import torch


def train(device, sizes: list[int]) -> dict | None:
    """The first size whose 3 steps fit, and their losses; each OOM goes to stderr."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 10)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for size in sizes:
        data = torch.Generator().manual_seed(1)
        try:
            losses = []
            for _ in range(3):
                x, y = torch.randn(size, 512, generator=data), torch.randint(0, 10, (size,), generator=data)
                loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            return {"size": size, "losses": losses}
        except torch.OutOfMemoryError as e:
            print(e, file=sys.stderr)
            optimizer.zero_grad()
    return None


if __name__ == "__main__":
    from offload import activation, session

    activation.activate()
    session.connect(sys.argv[2:], sys.argv[1])
    print(json.dumps({"device": train("cuda", [1 << 14, 64]), "cpu": train("cpu", [64])}))
    session.close()
