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


class EncoderNet(nn.Module):
    """Attention with ``batch_first`` views its batch transposed: a view that runs on whole tensors
    must leave them laid out as on one device, or a later view of them fails."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.encoder = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True, norm_first=True)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        h = self.a(x).view(len(x), 3, 4)
        causal = nn.Transformer.generate_square_subsequent_mask(3, device=x.device)
        padding = torch.zeros(len(x), 3, device=x.device)
        padding[::3, 2] = float("-inf")
        return self.out(self.encoder(h, src_mask=causal, is_causal=True, src_key_padding_mask=padding)
                        .reshape(len(x), 12))


class PaddedAttentionNet(nn.Module):
    """GPT-2's attention (transformers): q, k and v split from one projection, a causal mask
    joined with a padding mask into (B, 1, S, S), and the heads' output viewed back. The mask
    holds the batch: it must be sharded with it (the op ran on whole tensors in every layer)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.proj = nn.Linear(4, 4)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        batch = len(x)
        q, k, v = (t.view(batch, 2, 2, 2).transpose(1, 2)
                   for t in self.qkv(x.view(batch, 2, 4)).split(4, dim=2))
        padding = torch.ones(batch, 2, dtype=torch.bool, device=x.device)
        padding[::3, 1] = False
        causal = torch.ones(2, 2, dtype=torch.bool, device=x.device).tril()
        mask = (causal[None, None] & padding[:, None, None, :]).expand(batch, 1, 2, 2)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = heads.transpose(1, 2).reshape(batch, 2, 4).contiguous()
        return self.out(self.proj(h.view(-1, 4)).view(batch, 8))


class SplitDropoutNet(nn.Module):
    """Dropout (run on whole tensors) of a transposed piece of a split, viewed back: the whole
    input must be laid out as one device copies a non-dense tensor, and the result's pieces must
    keep that layout, or the view fails."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        first, second = self.a(x).view(len(x), 2, 8).split(4, dim=2)
        dropped = F.dropout(first.transpose(1, 2), 0.3).transpose(1, 2)
        return self.out(dropped.view(len(x), 8) + second.reshape(len(x), 8))


class ChannelsLastNet(nn.Module):
    """A CNN in channels_last: ATen re-strides the (N, C, 1, 1) mean of its 1x1 adaptive pooling
    in place (``as_strided_``), which failed in the workers' forward that builds their graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.norm = nn.BatchNorm2d(4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        image = x.view(len(x), 2, 2, 2).contiguous(memory_format=torch.channels_last)
        pooled = F.adaptive_avg_pool2d(F.relu(self.norm(self.conv(image))), 1)
        return self.out(pooled.flatten(1))


class GRUNet(nn.Module):
    """torch's GRU ``transpose_``s its batch_first output in place, which a DTensor cannot."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 4, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.gru(x.view(len(x), 2, 4))[0].mean(1))


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def bce(out, target):
    return F.binary_cross_entropy(torch.sigmoid(out), torch.sigmoid(target))


def weighted_cross_entropy(out, target):
    return F.cross_entropy(out, target, weight=torch.tensor([0.5, 1.0, 1.5, 2.0], device=out.device))


def values(data: torch.Generator) -> torch.Tensor:
    return torch.randn(BATCH, 4, generator=data)


def classes(data: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 4, (BATCH,), generator=data)


def padded_classes(data: torch.Generator) -> torch.Tensor:
    # Both ignored targets (padding's -100) in the first worker's rows.
    return torch.cat([torch.tensor([-100, -100]), torch.randint(0, 4, (BATCH - 2,), generator=data)])


# name -> (model, loss, targets). Each loss is normalized by the batch's size (mse_loss,
# smooth_l1_loss and binary_cross_entropy's gradients came out N times too large on N workers) or
# by the targets' total weight (a cross-entropy with ignored targets or class weights read the
# mean of the workers' means).
MODELS = {
    "mse": (mlp, F.mse_loss, values),
    "smooth_l1": (mlp, F.smooth_l1_loss, values),
    "bce": (mlp, bce, values),
    "group_norm": (GroupNormNet, F.mse_loss, values),
    "dropout": (DropoutNet, F.mse_loss, values),
    "cross_entropy_padded": (mlp, F.cross_entropy, padded_classes),
    "cross_entropy_weighted": (mlp, weighted_cross_entropy, classes),
    "encoder": (EncoderNet, F.cross_entropy, classes),
    "gru": (GRUNet, F.cross_entropy, classes),
    "attention_padded": (PaddedAttentionNet, F.cross_entropy, classes),
    "split_dropout": (SplitDropoutNet, F.mse_loss, values),
    "channels_last": (lambda: ChannelsLastNet().to(memory_format=torch.channels_last), F.cross_entropy,
                      classes),
}


def train(name: str, dev: str, remote_backward: bool = True) -> dict:
    make, loss_fn, targets = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 8, generator=data).to(dev)
    y = targets(data).to(dev)
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
