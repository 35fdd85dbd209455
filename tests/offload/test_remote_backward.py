"""``loss.backward()`` run by the worker (offload/remote_backward.py), against plain CPU PyTorch.

The first backward of a parameter is traced on the front and names it a leaf; the backwards after
it are one ``moai::backward`` record each. Everything the worker's graph cannot reproduce (hooks,
custom Functions, ``retain_graph``, ``autograd.grad`` ...) is traced as before; both give the CPU's
numbers.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("activated")]

BACKWARD = "moai::backward"
FP32 = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture
def records(monkeypatch):
    """Names of the records the front streams during the test."""
    from offload import remote_backward, session

    monkeypatch.setattr(remote_backward, "_graph_hooks_seen", False)  # restored after the test
    names: list[str] = []
    s = session.current()
    enqueue = s.enqueue
    monkeypatch.setattr(s, "enqueue", lambda op, *rest: names.append(op) or enqueue(op, *rest))
    return names


def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def pair(seed=0):
    local = mlp(seed)
    return local, copy.deepcopy(local).cuda()


def train(model, steps, between=lambda model, step: None, **adamw):
    """Losses of ``steps`` AdamW steps on one batch; ``between`` runs after each backward."""
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batch())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **adamw)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        between(model, step)
        opt.step()
        losses.append(loss.item())
    return losses


def same_parameters(remote, local):
    for (name, p), q in zip(local.named_parameters(), remote.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), **FP32, msg=name)
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad.cpu(), p.grad, **FP32, msg=name)


def test_backwards_after_the_first_run_on_the_worker_with_the_cpu_numbers(records):
    local, remote = pair()
    expected = train(local, 4)
    got = train(remote, 4)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **FP32)
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 3
    # The traced backward's gradient ops are gone from the stream: the optimizer's are left.
    assert records.count("moai::linear_backward") == 2


def test_a_gradient_of_zeros_holding_no_memory_is_stored_by_the_worker(records):
    """sgn's gradient is a ZeroTensor, which has no storage for the worker's table to count."""
    grads = []
    for device in ("cpu", "cuda"):
        scale = nn.Parameter(torch.tensor([-1.5, 0.0, 2.0]).to(device))
        for _ in range(2):   # the second backward runs on the worker
            scale.grad = None
            (torch.sgn(scale) * 3).sum().backward()
        grads.append(scale.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0])
    assert records.count(BACKWARD) == 1


@pytest.mark.parametrize("options", [{"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["fused", "foreach", "for-loop"])
def test_every_optimizer_path_reads_the_gradients_the_worker_stored(records, options):
    local, remote = pair()
    expected = train(local, 3, **options)
    got = train(remote, 3, **options)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **FP32)
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 2


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads-set-to-none", "grads-zeroed"])
def test_gradients_accumulate_over_micro_batches(records, set_to_none):
    local, remote = pair()
    for model in (local, remote):
        device = next(model.parameters()).device
        for step in range(3):
            model.zero_grad(set_to_none=set_to_none)
            for micro in range(2):
                x, y = (t.to(device) for t in batch(seed=10 * step + micro))
                (F.cross_entropy(model(x), y) / 2).backward()
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 5


def test_a_graph_backwarded_on_the_worker_cannot_be_backwarded_again(records):
    local, remote = pair()
    x, y = batch()
    F.cross_entropy(remote(x.cuda()), y.cuda()).backward()   # traced: marks the parameters
    loss = F.cross_entropy(remote(x.cuda()), y.cuda())
    loss.backward()
    assert records.count(BACKWARD) == 1
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    assert records.count(BACKWARD) == 1
    with pytest.raises(RuntimeError, match="second time"):
        loss.grad_fn._saved_self   # the front's saved tensors are freed, as torch frees them


def test_retain_graph_and_autograd_grad_are_traced_with_the_cpu_numbers(records):
    local, remote = pair()
    results = []
    for model in (local, remote):
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in batch())
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
        first = model[0].weight
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [first])
        loss = F.cross_entropy(model(x), y)
        loss.backward(inputs=[first])
        results.append([g.cpu(), first.grad.cpu()])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, **FP32)
    # The retained graph's traced backward unmarked the parameters: its second one is traced too.
    assert records.count(BACKWARD) == 0


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        return grad * 5   # not the true gradient: only the Function's own backward gives it


def with_leaf_hook(model):
    model[0].weight.register_hook(lambda g: g * 2)
    return model


def with_inner_hook(model):
    model[1].register_forward_hook(lambda m, i, out: out.register_hook(lambda g: g * 2) and None)
    return model


def with_module_backward_hook(model):
    model[2].register_full_backward_hook(lambda m, gin, gout: (gin[0] * 2,))
    return model


def with_accumulator_hooks(model):
    """Megatron's and DeepSpeed's way to learn that a parameter's gradient is ready: a hook on its
    gradient accumulator, a node no tensor names."""
    def doubled(p):
        def hook(grad_inputs, grad_outputs):
            p.grad.mul_(2)
        return hook

    model.accumulators = []
    for p in model.parameters():
        accumulator = p.expand_as(p).grad_fn.next_functions[0][0]
        accumulator.register_hook(doubled(p))
        model.accumulators.append(accumulator)   # the node lives while something holds it
    return model


def with_node_prehook(model):
    model[2].register_forward_hook(
        lambda m, i, out: out.grad_fn.register_prehook(lambda grads: (grads[0] * 2,)) and None)
    return model


def with_custom_function(model):
    model[1].register_forward_hook(lambda m, i, out: Scale.apply(out))
    return model


@pytest.mark.parametrize("hooked", [with_leaf_hook, with_inner_hook, with_module_backward_hook,
                                    with_accumulator_hooks, with_node_prehook, with_custom_function],
                         ids=["leaf-hook", "inner-tensor-hook", "module-backward-hook",
                              "accumulator-hooks", "node-prehook", "custom-function"])
def test_graphs_the_worker_cannot_reproduce_are_traced_with_the_cpu_numbers(records, hooked):
    local, remote = pair()
    local, remote = hooked(local), hooked(remote)
    expected = train(local, 3)
    got = train(remote, 3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **FP32)
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 0


def test_retain_grad_of_an_inner_tensor_is_served(records):
    local, remote = pair()
    grads = []
    for model in (local, remote):
        device = next(model.parameters()).device
        x, y = (t.to(device) for t in batch())
        for _ in range(2):
            hidden = model[1](model[0](x))
            hidden.retain_grad()
            F.cross_entropy(model[3](model[2](hidden)), y).backward()
        grads.append(hidden.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], **FP32)
    assert records.count(BACKWARD) == 0


def trains_as_on_the_cpu(steps, between):
    """The MLP trained with ``between`` after each backward: the same losses and parameters."""
    local, remote = pair()
    expected = train(local, steps, between)
    got = train(remote, steps, between)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **FP32)
    same_parameters(remote, local)


def test_parameters_written_through_data_or_frozen_keep_the_cpu_numbers(records):
    """The worker's leaves refuse in-place writes in grad mode that the front's autograd allows:
    through ``.data``, and on a parameter frozen after it was named a leaf."""
    def between(model, step):
        for p in model.parameters():
            p.data.clamp_(-0.3, 0.3)
        if step == 2:
            model[0].weight.requires_grad_(False)
        model[0].weight.mul_(0.99) if step >= 2 else None

    trains_as_on_the_cpu(5, between)
    assert records.count(BACKWARD) == 4


def test_a_parameter_data_updated_from_other_parameters_keeps_the_cpu_numbers(records):
    """``w.data += b @ a`` with parameters ``a``, ``b`` in grad mode (PEFT's LoRA merge): the
    worker's tensors of an upload are no views, so the in-place update of one made under
    ``no_grad`` (the model's move) is allowed, as natively."""
    def between(model, step):
        model[0].weight.data += model[3].weight.t() @ model[3].weight[:, :6] * 1e-3

    trains_as_on_the_cpu(4, between)
    assert records.count(BACKWARD) == 3


def test_a_parameter_outside_the_graph_gets_no_gradient(records):
    local, remote = pair()
    for model in (local, remote):
        device = next(model.parameters()).device
        x, _ = batch()
        for _ in range(2):
            model[0](x.to(device)).sum().backward()   # model[3] takes no part
        assert model[3].weight.grad is None
    torch.testing.assert_close(remote[0].weight.grad.cpu(), local[0].weight.grad, **FP32)
    assert records.count(BACKWARD) == 1


def test_the_saved_activations_are_freed_by_the_worker_s_backward(records):
    """``loss`` stays alive, as in a training loop until the next step: the front's graph must not
    keep the activations on the device once the worker ran the backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh()).cuda()
    x = torch.randn(4096, 64).cuda()
    model(x).square().mean().backward()   # traced: marks the parameters
    activations = 2 * x.numel() * x.element_size()   # 2 MiB: what the two Tanh save
    torch.cuda.synchronize()
    loss = model(x).square().mean()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert records.count(BACKWARD) == 1
    assert after < before - activations * 3 // 4, (before, after)
    del loss


def test_a_job_of_several_workers_or_the_setting_off_traces_the_backward(records, monkeypatch):
    from offload import session

    monkeypatch.setattr(session.current(), "runs_backward", False)
    local, remote = pair()
    torch.testing.assert_close(torch.tensor(train(remote, 3)), torch.tensor(train(local, 3)), **FP32)
    assert records.count(BACKWARD) == 0


def test_a_backward_record_for_a_tensor_without_graph_is_a_clear_device_error(records):
    from offload import session

    t = torch.ones(3).cuda()
    p = nn.Parameter(torch.ones(3).cuda())
    s = session.current()
    s.enqueue(BACKWARD, [t._handle.ref, [p._handle.ref], [None]], {}, [s.new_id()])
    with pytest.raises(RuntimeError, match="no autograd graph on this worker"):
        torch.cuda.synchronize()
    assert (t + 1).sum().item() == 6   # the device goes on


def test_a_traced_backward_keeps_its_parameters_traced_from_then_on(records):
    """A graph the worker built for parameters whose backward is traced would only hold memory."""
    from offload.tensor import LeafHandle

    local, remote = pair()
    marked = []
    for model in (local, remote):
        x, y = (t.to(model[0].weight.device) for t in batch())
        for retain in (False, False, True, False, False):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward(retain_graph=retain)
            marked.append(all(type(getattr(p, "_handle", None)) is LeafHandle for p in model.parameters()))
    same_parameters(remote, local)
    assert marked[5:] == [True, True, False, False, False]
    assert records.count(BACKWARD) == 1   # the second backward
    fresh = copy.deepcopy(remote)   # a copy's parameters are new tensors: marked again
    x, y = (t.cuda() for t in batch())
    for _ in range(2):
        F.cross_entropy(fresh(x), y).backward()
    assert records.count(BACKWARD) == 2


def test_several_losses_backwarded_at_once_are_traced_and_keep_their_parameters_traced(records):
    from offload.tensor import LeafHandle

    local, remote = pair()
    for model in (local, remote):
        x, y = (t.to(model[0].weight.device) for t in batch())
        for step in range(3):
            model.zero_grad()
            if step == 1:
                out = model(x)
                torch.autograd.backward([F.cross_entropy(out, y), out.square().mean()])
            else:
                F.cross_entropy(model(x), y).backward()
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 0
    assert not any(type(p._handle) is LeafHandle for p in remote.parameters())


def test_a_checkpointed_model_is_traced_and_builds_no_graph_on_the_worker(records):
    from torch.utils.checkpoint import checkpoint

    from offload.tensor import LeafHandle

    local, remote = pair()
    losses = []
    for model in (local, remote):
        x, y = (t.to(model[0].weight.device) for t in batch())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(checkpoint(model, x, use_reentrant=False), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[3:]), torch.tensor(losses[:3]), **FP32)
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 0
    assert not any(type(p._handle) is LeafHandle for p in remote.parameters())


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class GroupedQueryAttention(nn.Module):
    def __init__(self, dim=16, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim * kv_heads // heads)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2 * self.kv_heads, -1).transpose(1, 2).chunk(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


MODELS = {
    "lstm": (Recurrent, lambda: torch.randn(4, 5, 6)),
    "conv-batchnorm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                             nn.Linear(4 * 6 * 6, 3)), lambda: torch.randn(4, 3, 8, 8)),
    # A CNN in channels_last (the usual recipe with mixed precision): its convolution weights are
    # not contiguous, and their backwards stayed traced.
    "channels-last-conv": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
                           .to(memory_format=torch.channels_last),
                           lambda: torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)),
    "embedding-dropout": (lambda: nn.Sequential(nn.Embedding(20, 8), nn.Dropout(0.2), nn.Linear(8, 3)),
                          lambda: torch.randint(0, 20, (4, 7))),
    "gqa-attention": (GroupedQueryAttention, lambda: torch.randn(2, 6, 16)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_beyond_the_mlp_train_alike_on_the_worker_traced_and_on_the_cpu(records, name):
    """The worker's graph of each layer kind gives the gradients of the traced backward and of
    the CPU, dropout's random draws included."""
    from offload import session

    build, make_input = MODELS[name]
    torch.manual_seed(0)
    local = build()
    x = make_input()
    models = {"cpu": local, "worker": copy.deepcopy(local).cuda(), "traced": copy.deepcopy(local).cuda()}
    losses = {side: [] for side in models}
    s = session.current()
    for step in range(3):
        for side, model in models.items():
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            opt.zero_grad()
            torch.manual_seed(step)   # the device's generator too: dropout draws the CPU's numbers
            loss = model(x.to(next(model.parameters()).device)).float().square().mean()
            s.runs_backward = side != "traced"
            try:
                loss.backward()
            finally:
                s.runs_backward = True
            opt.step()
            losses[side].append(loss.item())
    for side in ("worker", "traced"):
        torch.testing.assert_close(torch.tensor(losses[side]), torch.tensor(losses["cpu"]), **FP32)
        same_parameters(models[side], local)
        # Each gradient laid out as the CPU's (a dense parameter's strides).
        assert [p.grad.stride() for p in models[side].parameters()] == [p.grad.stride() for p in local.parameters()]
    assert records.count(BACKWARD) == 2


def test_autocast_and_grad_scaler_steps_match_the_traced_backward(records):
    """Mixed precision: the casts autocast streams are in the worker's graph; the scaled loss's
    gradients are unscaled from the gradients the worker stored."""
    from offload import session

    torch.manual_seed(0)
    local = GroupedQueryAttention()
    models = {"worker": copy.deepcopy(local).cuda(), "traced": copy.deepcopy(local).cuda()}
    x = torch.randn(2, 6, 16).cuda()
    s = session.current()
    losses = {side: [] for side in models}
    for side, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean()
            s.runs_backward = side == "worker"
            try:
                scaler.scale(loss).backward()
            finally:
                s.runs_backward = True
            scaler.step(opt)
            scaler.update()
            losses[side].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["worker"]), torch.tensor(losses["traced"]), rtol=1e-3, atol=1e-4)
    for p, q in zip(models["traced"].parameters(), models["worker"].parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach().cpu(), rtol=1e-3, atol=1e-4)
    assert records.count(BACKWARD) == 2


def test_a_graph_recorded_in_another_thread_before_the_parameters_were_marked_is_traced(records):
    """Autograd numbers its nodes per thread, so a graph's numbers say it came after the marking
    only in the thread that marked. Here another thread's numbers run past the main thread's, that
    thread records a graph, the main thread then marks the parameters, and the other thread's
    graph, which names them as plain tensors, must still be traced."""
    from concurrent.futures import ThreadPoolExecutor

    def sequence_number() -> int:
        with torch.enable_grad():
            return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()

    local, remote = pair()
    x, y = batch()
    main_thread_number = sequence_number()
    other = ThreadPoolExecutor(max_workers=1)

    def forward_past(number):
        while sequence_number() <= number + 1000:
            pass
        return F.cross_entropy(remote(x.cuda()), y.cuda())

    early = other.submit(forward_past, main_thread_number).result()
    F.cross_entropy(remote(x.cuda()), y.cuda()).backward()   # traced: marks the parameters
    other.submit(early.backward).result()
    other.shutdown()
    for _ in range(2):
        F.cross_entropy(local(x), y).backward()
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 0


class TiedLanguageModel(nn.Module):
    """Input embedding and output projection share one weight, as in GPT-2 and Llama variants."""

    def __init__(self, vocab=12, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.body(self.embed(tokens)))


def test_tied_weights_frozen_layers_and_evaluation_between_steps(records):
    """One leaf reached from two places, parameters that take no gradient, and evaluation passes
    (under no_grad, and without it, its result dropped) between the training steps."""
    torch.manual_seed(0)
    local = TiedLanguageModel()
    local.body[0].bias.requires_grad_(False)
    remote = copy.deepcopy(local).cuda()
    tokens = torch.randint(0, 12, (4, 6))
    losses = {}
    for model in (local, remote):
        x = tokens.to(model.embed.weight.device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        trace = []
        for step in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            with torch.no_grad():
                trace.append(model(x).square().mean().item())
            trace.append(model(x).sum().item())   # a graph nobody backwards
            trace.append(loss.item())
        losses[model is remote] = trace
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), **FP32)
    same_parameters(remote, local)
    assert remote.head.weight is remote.embed.weight and remote.body[0].bias.grad is None
    assert records.count(BACKWARD) == 3


def test_what_the_program_detaches_takes_no_part_in_the_worker_s_graph(records):
    """``detach()`` names no op of its own (the same remote tensor): a target made from the
    model's own output (distillation, a KL term, a GAN's fake batch) must still carry no gradient
    in the worker's backward, and a write through the detached tensor changes the tensor only."""
    def loss_of(model, x):
        out = model(x)
        teacher = F.softmax(out.detach() * 0.5, 1)
        hidden = model[0](x)
        hidden.detach().mul_(0.5)   # in place through the alias: the values change, not the graph
        return F.kl_div(F.log_softmax(out, 1), teacher, reduction="batchmean") + hidden.square().mean()

    local, remote = pair()
    for model in (local, remote):
        x = batch()[0].to(model[0].weight.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss_of(model, x).backward()
            opt.step()
    same_parameters(remote, local)
    assert records.count(BACKWARD) == 2


@pytest.mark.parametrize("detach", ["in place", "out of place"])
def test_truncated_backpropagation_through_time_detaches_the_carried_state(records, detach):
    """``hidden.detach_()`` between steps (truncated BPTT) changes only autograd's metadata on the
    front: the worker's tensor must lose its graph too, or the next step's backward runs into the
    last step's freed graph."""
    def run(device):
        torch.manual_seed(0)
        rnn, head = nn.RNN(4, 6, batch_first=True).to(device), nn.Linear(6, 3).to(device)
        opt = torch.optim.SGD([*rnn.parameters(), *head.parameters()], lr=0.1)
        g = torch.Generator().manual_seed(1)
        xs, ys = torch.randn(5, 2, 3, 4, generator=g), torch.randint(0, 3, (5, 2), generator=g)
        hidden, losses = torch.zeros(1, 2, 6, device=device), []
        for step in range(5):
            if detach == "in place":
                hidden.detach_()
            else:
                hidden = hidden.detach()
            out, hidden = rnn(xs[step].to(device), hidden)
            loss = F.cross_entropy(head(out[:, -1]), ys[step].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [*rnn.parameters(), *head.parameters()]

    local, local_params = run("cpu")
    remote, remote_params = run("cuda")
    torch.testing.assert_close(remote, local, **FP32)
    for q, p in zip(remote_params, local_params):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), **FP32)
    assert records.count("moai::backward") == 4   # the first backward marks the parameters


def test_anomaly_detection_traces_the_backward_and_finds_nan_as_on_the_cpu(records):
    """``detect_anomaly`` checks every gradient op's results and names the forward op that made a
    NaN: only a traced backward has those ops on the front."""
    local, remote = pair()
    x, _ = batch()
    for model, inputs in ((local, x), (remote, x.cuda())):
        for step in range(2):   # the second backward would run on the worker
            model(inputs).sum().backward()
        with torch.autograd.detect_anomaly(), pytest.warns(UserWarning, match="Error detected in MulBackward0"):
            with pytest.raises(RuntimeError, match="Function 'MulBackward0' returned nan values"):
                (model(inputs) * 0).sqrt().sum().backward()
    assert records.count("moai::backward") == 1
    same_parameters(remote, local)
