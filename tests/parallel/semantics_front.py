"""A front program against a job's workers (LocalJob): what one device does that a tensor split over
the workers by its first dim must do too (writes through views and into the bases of views, dtypes
the process group cannot move), each case run on the virtual device and natively on the CPU in this
one process. Prints one JSON line per case: the values both gave, or the device's error.

argv: the secret, then the workers' addresses, rank 0 first.
"""
from __future__ import annotations

import gc
import json
import sys
import traceback

import torch

from offload import activation, session


def rows(dev, n=8):
    """A batch-like upload: split over the workers by rows (3 rows over 4 workers leave one empty)."""
    return torch.arange(n * 6, dtype=torch.float32).reshape(n, 6).to(dev)


def padding_mask(dev):
    # transformers' attention_mask built on the device: padding lost here trained on it silently.
    ids = torch.randint(0, 9, (4, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)
    mask[0, 28:] = 0
    return mask, mask.bool().sum()


def select_fill(dev):
    x = rows(dev)
    x[0, 3:] = 0
    x[1] += 100
    return x


def slices(dev):
    x = rows(dev)
    strided = x[1:3, ::2]
    strided.mul_(10)
    x.add_(1)
    x[:3].copy_(torch.ones(3, 6).to(dev))
    x.narrow(0, 5, 2).sqrt_()
    return x, strided


def tiny_batch(dev):
    x = rows(dev, 3)
    x[2] = -1
    top = x[:2]
    x.mul_(2)
    return x, top.clone()


def base_written_after(dev):
    x = rows(dev)
    row, pair = x[2], x[0:2]
    x.mul_(2)
    pair[0, 0] = 42
    return row.clone(), pair.clone(), x


def splits(dev):
    x = rows(dev)
    head, tail = x.split([3, 5])
    tail.zero_()
    head.add_(1)
    x.unbind(0)[5].fill_(-1)
    x.chunk(4)[1].neg_()
    return x, head


def reshaped_views(dev):
    x = rows(dev)
    x.view(-1)[7] = 3.5
    x.t()[:, 4] = 9
    x.unsqueeze(0)[0, 3].fill_(1)
    x.as_strided((2, 2), (6, 1), 12).fill_(5)
    x[:6].diagonal().fill_(0)
    return x


def chains_and_out(dev):
    x = rows(dev)
    tail = x[4:]
    tail[1][2:] = 7
    torch.add(x[0], x[1], out=x[2])
    x[3].detach().fill_(8)
    return x, tail


def resized(dev):
    # A DTensor's shape cannot change in place: resize_ failed on whole tensors' write-back.
    x = rows(dev)
    x.resize_(4, 6)
    y = torch.arange(10.0).to(dev)
    y.resize_(3)
    y.add_(1)
    return x.clone(), y


def dtypes_collectives_lack(dev):
    # gloo moves none of these (NCCL no int16/uint16): reading one back failed.
    out = []
    for dtype in (torch.int16, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
                  torch.float8_e5m2):
        x = (torch.arange(40).reshape(10, 4) * 3).to(dtype).to(dev)
        both = torch.cat([x, x])[3:15]
        out += [x, both] if dtype.is_floating_point else [x, both, x.sum(0, dtype=torch.int64)]
    return [t.view(torch.uint8) if t.dtype.itemsize == 1 else t.to(torch.int64) for t in out]


def small_batches(dev):
    # 5, 6 and 9 rows over 4 workers would leave one an empty piece, where a full reduction fails
    # while the others reduce theirs: the job hung until the collective timeout.
    out = []
    for n in (5, 6, 9):
        x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n)).to(dev)
        out += [x.max(), x.min(), x.argmax(), x.amax(), x.max(0).values, x.softmax(0).sum(1)]
    return out


def autograd_through_views(dev):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6).to(dev)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).to(dev)
    h = lin(x)
    h[0] = h[0] * 2
    h[2:5].mul_(3)
    out = torch.zeros(8, 6, device=dev)
    out[1:4] = h[1:4].tanh()
    out[6] = h[0]
    loss = (h ** 2).sum() + sum((r * (i + 1)).sum() for i, r in enumerate(out.unbind(0)))
    loss.backward()
    return h.detach(), out.detach(), lin.weight.grad, lin.bias.grad


CASES = [padding_mask, select_fill, slices, tiny_batch, base_written_after, splits, reshaped_views,
         chains_and_out, resized, dtypes_collectives_lack, small_batches,
         autograd_through_views]


def as_lists(values) -> list:
    return [v.detach().cpu().tolist() for v in values]


def main():
    secret, addresses = sys.argv[1], sys.argv[2:]
    activation.activate()
    session.connect(addresses, secret)
    for case in CASES:
        line = {"case": case.__name__, "cpu": as_lists(case("cpu"))}
        try:
            line["device"] = as_lists(case("cuda"))
        except Exception:
            line["error"] = traceback.format_exc()
        print(json.dumps(line), flush=True)
    gc.collect()
    torch.cuda.synchronize()   # the frees of the cases' tensors reach the workers
    session.close()


if __name__ == "__main__":
    main()
