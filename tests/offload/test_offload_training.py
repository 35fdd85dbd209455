"""Training on the virtual device gives the numbers of plain CPU training: autograd, optimizers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.timeout(180)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_backward_of_an_mlp(dev):
    local = mlp()
    remote = copy.deepcopy(local).to(dev)
    x, y = batch()
    F.cross_entropy(local(x), y).backward()
    loss = F.cross_entropy(remote(x.to(dev)), y.to(dev))
    loss.backward()
    for (name, p), q in zip(local.named_parameters(), remote.parameters()):
        assert q.grad is not None and q.grad.is_cuda, name
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture
def cuda_means_the_device():
    """Library code passes ``p.device`` (``cuda:0``) on, as fused AdamW does for its step counts."""
    from offload import device_mapping

    device_mapping.install()
    yield
    device_mapping.uninstall()


@pytest.mark.parametrize("options", [{"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["fused", "foreach", "for-loop"])
def test_adamw_steps(dev, cuda_means_the_device, options):
    local = mlp()
    remote = copy.deepcopy(local).to(dev)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **options) for m in (local, remote)]
    x, y = batch()
    rx, ry = x.to(dev), y.to(dev)
    for _ in range(3):
        for model, opt, inputs, target in ((local, opts[0], x, y), (remote, opts[1], rx, ry)):
            opt.zero_grad()
            F.cross_entropy(model(inputs), target).backward()
            opt.step()
    for p, q in zip(local.parameters(), remote.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)


def test_training_loop_runs_on_the_device_without_waiting_per_op(dev, monkeypatch):
    """Only ``.item()`` waits: a step's ops all go out with one round trip."""
    from offload import session

    model = mlp().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    rx, ry = x.to(dev), y.to(dev)
    stream = session.current().stream
    waits = []
    request = stream.request
    monkeypatch.setattr(stream, "request", lambda kind, body: waits.append(kind) or request(kind, body))
    seq0 = stream.seq
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(rx), ry)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert waits == ["item"] * 5
    assert stream.seq - seq0 >= 50  # 14 records a step (the linear layers fused: docs/PROTOCOL.md)
    assert losses[-1] < losses[0]


def test_optimizer_and_clipping_take_the_multi_tensor_paths_as_on_cuda(dev, cuda_means_the_device):
    """Without options, AdamW and clip_grad_norm_ run ``_foreach_*`` ops on the device as they do
    on a GPU: the op records of a step do not grow with the number of parameters."""
    from offload import session

    stream = session.current().stream

    def records_of_a_step(layers: int) -> int:
        model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(layers))).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.ones(2, 8, device=dev)).sum().backward()
        opt.step()  # the first step creates the optimizer's state
        seq = stream.seq
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return stream.seq - seq

    assert records_of_a_step(2) == records_of_a_step(8)
