"""torch's own test databases run through the virtual device, against plain CPU torch.

torch describes its operators (``op_db``: OpInfo, with sample inputs), modules (``module_db``) and
optimizers (``optim_db``) for its own tests. Each sample here runs on the device, as a program
would call it, and on the CPU; results (and gradients) must agree. Sweeping them found failures
that no hand-written test had (two crashes of the program, one of the worker). Bounded: float32
with a few samples per operator, int64 and complex128 with one, about four minutes.

What cannot agree is listed in ``KNOWN`` with the reason; anything else that fails fails the test.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
import unittest
import warnings

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("activated")]

# Operators that draw random numbers or return uninitialized memory: not comparable sample by sample.
RANDOM = ("rand", "normal", "bernoulli", "multinomial", "dropout", "uniform", "exponential", "geometric",
          "cauchy", "log_normal", "poisson", "empty", "randperm", "rrelu")
SPARSE = "sparse tensors are refused on the virtual device, by name"
KNOWN = {
    "sparse.sampled_addmm": SPARSE, "sparse.mm.reduce": SPARSE, "to_sparse": SPARSE,
    "histogramdd": "refused by name (no meta kernel, several results of data-dependent sizes)",
    "tensor_split": "its samples pass the indices as a tensor, which torch wants on the CPU (CUDA refuses too)",
    "as_strided.partial_views": "its samples read storage outside the view they pass, which no copy to "
                                "another device keeps (a CUDA copy neither)",
}
# Samples per operator: float32 the most; integers and complex128 (whose 16-byte elements a
# received frame may misalign) one each.
FORWARD_SAMPLES = {torch.float32: 3, torch.int64: 1, torch.complex128: 1}
GRADIENT_SAMPLES = 1


@pytest.fixture(scope="module")
def databases():
    # torch's databases import expecttest (a package of torch's own test runner, not a dependency
    # of this project) for the base class of torch's TestCase, which the databases never use.
    if importlib.util.find_spec("expecttest") is None:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase, stand_in.ACCEPT = unittest.TestCase, False
        sys.modules["expecttest"] = stand_in
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db
    from torch.testing._internal.common_optimizers import optim_db
    return op_db, module_db, optim_db


def _name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def _on(device):
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.detach().to(device).requires_grad_(x.requires_grad)
        return x
    return move


def _outcome(run, compare) -> str | None:
    """None if the device agrees with the CPU; else what went wrong. A sample the CPU itself
    rejects is not a case."""
    try:
        expected = run("cpu")
    except Exception:
        return None
    try:
        compare(run("cuda"), expected)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def _sweep(cases) -> tuple[int, dict]:
    compared, failures = 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, run, compare in cases:
            torch.manual_seed(0)
            failure = _outcome(run, compare)
            compared += 1
            if failure is not None:
                failures.setdefault(name, failure)
    return compared, failures


def _unexpected(failures: dict) -> dict:
    return {name: why for name, why in failures.items() if name not in KNOWN}


def _ops(op_db, dtype=torch.float32, autograd=False):
    for op in op_db:
        if any(word in op.name for word in RANDOM) or dtype not in op.supported_dtypes("cpu"):
            continue
        if autograd and not op.supports_autograd:
            continue
        torch.manual_seed(0)
        samples = list(op.sample_inputs("cpu", dtype, requires_grad=autograd))
        yield op, samples[:GRADIENT_SAMPLES if autograd else FORWARD_SAMPLES[dtype]]


def _close(tol):
    def close(got, expected):
        torch.testing.assert_close(got, expected, equal_nan=True, check_device=False, **tol)
    return close


@pytest.mark.parametrize("dtype", list(FORWARD_SAMPLES), ids=str)
def test_every_operator_s_samples_give_the_cpu_s_results(databases, dtype):
    def case(op, sample):
        def run(device):
            move = _on(device)
            out = op(move(sample.input), *tree_map(move, sample.args), **tree_map(move, sample.kwargs))
            return tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, out)
        return _name(op), run, _close({"rtol": 1e-4, "atol": 1e-5})

    compared, failures = _sweep(case(op, s) for op, samples in _ops(databases[0], dtype) for s in samples)
    assert compared > 350 * FORWARD_SAMPLES[dtype], compared
    assert not _unexpected(failures), _unexpected(failures)


def test_every_operator_s_gradients_give_the_cpu_s(databases):
    """Twice per sample on the device: the second backward of the same leaves runs on the worker
    (offload/remote_backward.py), the first is traced on the front."""
    def case(op, sample):
        def run(device):
            move = _on(device)
            inputs = (move(sample.input), tree_map(move, sample.args), tree_map(move, sample.kwargs))
            leaves = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = []
            for _ in range(2 if device == "cuda" else 1):
                out = op(inputs[0], *inputs[1], **inputs[2])
                outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad
                        and o.dtype.is_floating_point]
                if not outs:
                    return []
                for t in leaves:
                    t.grad = None
                # Weights per element, so that a gradient in the wrong place shows.
                sum((o * (torch.arange(o.numel(), device=o.device).reshape(o.shape) % 7 + 1)).sum()
                    for o in outs).backward()
                grads.append([None if t.grad is None else t.grad.cpu() for t in leaves])
            return grads[-1] if device == "cpu" else grads
        return _name(op), run, lambda got, expected: [_close({"rtol": 1e-4, "atol": 1e-4})(g, expected)
                                                      for g in got]

    compared, failures = _sweep(case(op, s) for op, samples in _ops(databases[0], autograd=True)
                                for s in samples)
    assert compared > 450, compared
    assert not _unexpected(failures), _unexpected(failures)


def test_every_module_s_outputs_and_parameter_gradients_give_the_cpu_s(databases):
    def case(info, module_input):
        def run(device):
            torch.manual_seed(0)
            module = info.module_cls(*module_input.constructor_input.args,
                                     **module_input.constructor_input.kwargs).to(device)
            move = _on(device)
            results = []
            for _ in range(2):   # the second backward on the worker (a parameter's first is traced)
                module.zero_grad()
                torch.manual_seed(0)
                out = module(*tree_map(move, module_input.forward_input.args),
                             **tree_map(move, module_input.forward_input.kwargs))
                outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.dtype.is_floating_point]
                results = [o.detach().cpu() for o in outs]
                differentiable = [o for o in outs if o.requires_grad]
                if differentiable:
                    sum((o * (torch.arange(o.numel(), device=o.device).reshape(o.shape) % 5 + 1)).sum()
                        for o in differentiable).backward()
                    results += [None if p.grad is None else p.grad.cpu() for p in module.parameters()]
            return results
        return info.module_cls.__name__, run, _close({"rtol": 1e-4, "atol": 1e-4})

    def cases():
        for info in databases[1]:
            if any(word in info.module_cls.__name__ for word in ("Dropout", "RReLU")):
                continue
            inputs = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True,
                                             training=True)
            for module_input in inputs[:3]:
                yield case(info, module_input)

    compared, failures = _sweep(cases())
    assert compared > 250, compared
    assert not _unexpected(failures), _unexpected(failures)


def test_every_optimizer_configuration_steps_as_on_the_cpu(databases):
    """Three steps of each configuration torch tests (foreach, fused, capturable, maximize ...);
    fused and capturable run on the device only, as they do on CUDA."""
    def case(info, config):
        def run(device):
            torch.manual_seed(0)
            weight = torch.nn.Parameter(torch.randn(4, 3).to(device))
            bias = torch.nn.Parameter(torch.randn(3).to(device))
            kwargs = dict(config.kwargs)
            if device == "cpu":
                kwargs.pop("fused", None), kwargs.pop("capturable", None)
            params = [weight] if info.optim_cls.__name__ == "Muon" else [weight, bias]   # matrices only
            optimizer = info.optim_cls(params, **kwargs)
            g = torch.Generator().manual_seed(1)
            for _ in range(3):
                x = torch.randn(5, 4, generator=g).to(device)

                def closure():
                    optimizer.zero_grad()
                    loss = ((x @ weight + bias) ** 2).mean()
                    loss.backward()
                    return loss
                optimizer.step(closure)
            return [weight.detach().cpu(), bias.detach().cpu()]
        return info.optim_cls.__name__, run, _close({"rtol": 1e-4, "atol": 1e-5})

    def cases():
        for info in databases[2]:
            if info.optim_cls.__name__ == "SparseAdam":   # sparse gradients: SPARSE
                continue
            for config in info.optim_inputs_func(device="cuda"):
                yield case(info, copy.deepcopy(config))

    compared, failures = _sweep(cases())
    assert compared > 100, compared
    assert not _unexpected(failures), _unexpected(failures)
