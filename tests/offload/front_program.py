"""A small training program, run as a front process by the offload tests (and on the CPU to get
the reference numbers). Prints ``step N loss X`` per step; ``--steps 0`` trains until it fails.

Device: ``--cpu`` native; ``--direct ADDRESS SECRET`` a worker started without a master; else the
job session allocates its device from the master named by the MOAI_* environment.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--direct", nargs=2, metavar=("ADDRESS", "SECRET"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--telemetry", action="store_true", help="print torch.cuda's GPU telemetry at the end")
    args = parser.parse_args()
    if args.cpu:
        dev = torch.device("cpu")
    else:
        import offload.dispatch  # noqa: F401
        from offload import device, session

        device.register()
        dev = device.DEVICE
        if args.direct:
            session.connect([args.direct[0]], args.direct[1])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 4)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    torch.manual_seed(1)  # dropout draws from the device's generator: seed it as the CPU's
    step = 0
    while args.steps == 0 or step < args.steps:
        loss = F.cross_entropy(model(x.to(dev)), y.to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        print(f"step {step} loss {loss.item():.8f}", flush=True)
    if args.telemetry:
        print("utilization", torch.cuda.utilization(), torch.cuda.memory_usage(), flush=True)
        for sensor in (torch.cuda.temperature, torch.cuda.power_draw):
            try:
                sensor()
            except RuntimeError as e:
                print("no sensor:", e, flush=True)


if __name__ == "__main__":
    main()
