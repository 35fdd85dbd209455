"""A front program against a job's workers (LocalJob): errors of a multi-GPU device. Prints one
JSON line per step: what the program saw (the error's text, or a value) and how long it took.

1. An error every worker hits (a class index out of range in every row): raised, and the device
   goes on, as on one device (the front cannot foresee it: the values are on the workers).
2. An error in one worker's rows only (a class index out of range in the batch's last row, where
   CUDA fires a device-side assert): raised within seconds, naming the op and the error, though
   the other workers wait in a collective for the one that failed.
3. The device afterwards: lost, as CUDA's context is after an assert; every call raises that error
   at once.

argv: the secret, then the workers' addresses, rank 0 first.
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from offload import activation, session


def attempt(step: str, fn):
    start = time.monotonic()
    try:
        line = {"value": fn()}
    except Exception as exc:
        line = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"step": step, "seconds": time.monotonic() - start, **line}), flush=True)


def main():
    secret, addresses = sys.argv[1], sys.argv[2:]
    activation.activate()
    session.connect(addresses, secret)
    logits = torch.arange(40, dtype=torch.float32).reshape(8, 5).cuda()
    everywhere = torch.full((8,), 9).cuda()
    attempt("bad_class_everywhere", lambda: F.cross_entropy(logits, everywhere).item())
    attempt("after_bad_class_everywhere", lambda: logits.sum().item())
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 9]).cuda()
    attempt("bad_class_in_last_row", lambda: F.cross_entropy(logits, target).item())
    attempt("after_bad_class", lambda: logits.sum().item())
    session.close()


if __name__ == "__main__":
    main()
