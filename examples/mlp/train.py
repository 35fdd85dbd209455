"""Train a small MLP classifier on data.csv: an ordinary single-GPU PyTorch script.

It runs on ``cuda`` when there is one (on the MoAI Platform: the virtual accelerator) and on the
CPU otherwise, with the same per-step losses for the same ``--seed``. Batches come from a
``DataLoader`` (``--workers`` forked loader processes, pinned memory on a GPU) and move to the
device with ``non_blocking=True``, as GPU training scripts usually do. One sample counts as one
token in the throughput figure.

    python train.py --steps 20 --batch-size 64 --workers 2
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

DATA = Path(__file__).with_name("data.csv")


def load_dataset():
    table = np.loadtxt(DATA, delimiter=",", skiprows=1, dtype=np.float32)
    return TensorDataset(torch.from_numpy(table[:, :-1]), torch.from_numpy(table[:, -1]).long())


def endless(loader):
    while True:
        yield from loader


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    dataset = load_dataset()
    features = dataset.tensors[0].shape[1]
    classes = int(dataset.tensors[1].max()) + 1
    model = nn.Sequential(nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=device == "cuda",
                        generator=torch.Generator().manual_seed(args.seed))

    batches = endless(loader)
    for step in range(1, args.steps + 1):
        started = time.time()
        inputs, labels = next(batches)
        inputs = inputs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        duration = time.time() - started
        print(f"[Step {step}/{args.steps}] | Loss: {loss_value} | Duration: {duration:.2f} | "
              f"Throughput: {len(inputs) / duration:.2f} tokens/sec", flush=True)


if __name__ == "__main__":
    main()
