"""A front program against a job's workers started without a master (LocalJob): small models
trained on the virtual device with the backward on the workers, with it traced on the front, and
natively on the CPU, in this one process. Prints one JSON line per model.

argv: the secret, then the workers' addresses, rank 0 first.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from offload import activation, session

BATCH = 10   # uneven over 4 workers (3, 3, 3, 1)
STEPS = 3


class GroupNormNet(nn.Module):
    """``native_group_norm_backward`` fails on the ranks' pieces: it must run as its
    decomposition or on whole tensors, inside the workers' backward too."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(F.silu(self.norm(self.a(x))))


class DropoutNet(nn.Module):
    """Dropout runs on whole tensors (its random numbers are one device's): a plain part of the
    graph inside the workers' DTensor one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.a(x))))


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def bce(out, target):
    return F.binary_cross_entropy(torch.sigmoid(out), torch.sigmoid(target))


# name -> (model, loss). Each loss is normalized by the batch's size: the gradients of mse_loss,
# smooth_l1_loss and binary_cross_entropy came out N times too large on N workers.
MODELS = {
    "mse": (mlp, F.mse_loss),
    "smooth_l1": (mlp, F.smooth_l1_loss),
    "bce": (mlp, bce),
    "group_norm": (GroupNormNet, F.mse_loss),
    "dropout": (DropoutNet, F.mse_loss),
}


def train(name: str, dev: str, remote_backward: bool = True) -> dict:
    make, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 8, generator=data).to(dev)
    y = torch.randn(BATCH, 4, generator=data).to(dev)
    current = session.current() if dev == "cuda" else None
    default = current.runs_backward if current else None
    if current is not None and not remote_backward:
        current.runs_backward = False   # for this model's life: its backwards stay traced
    losses, records = [], 0
    for _ in range(STEPS):
        seq = current.stream.seq if current else 0
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        records = current.stream.seq - seq if current else 0   # the last step's: parameters marked
    params = [p.detach().cpu().flatten().tolist() for p in model.parameters()]
    if current is not None:
        current.runs_backward = default
    return {"losses": losses, "params": params, "records": records}


def main():
    secret, addresses = sys.argv[1], sys.argv[2:]
    activation.activate()
    session.connect(addresses, secret)
    for name in MODELS:
        print(json.dumps({"model": name, "native": train(name, "cpu"),
                          "remote": train(name, "cuda"),
                          "traced": train(name, "cuda", remote_backward=False)}), flush=True)
    session.close()


if __name__ == "__main__":
    main()
