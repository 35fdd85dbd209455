"""Ops the workers cannot run as such, composed of ordinary ops on the virtual device.

The fused LSTM / GRU cells: torch's RNN code takes the fused-cell path for every non-CPU input
(``input.is_privateuseone()`` in aten/src/ATen/native/RNN.cpp), so ``nn.LSTM`` / ``nn.GRU`` on the
device emit ``_thnn_fused_lstm_cell`` / ``_thnn_fused_gru_cell`` and their backward ops. Those
have CUDA kernels only: a worker running on CPU cannot execute them. They are rewritten here, on
the front, into the elementwise ops of the same math (the CUDA kernels' formulas and workspace
layouts), which every worker runs.

Ops whose result is a Python value (``torch.equal``, ``torch.allclose``): their meta kernels
cannot answer, so they become a device reduction and one ``.item()``.

Imported by offload/dispatch.py for its rules.
"""
from __future__ import annotations

import torch

from offload.dispatch import DISPATCHER

aten = torch.ops.aten


def _args(args, kwargs, names):
    return list(args) + [kwargs.get(n) for n in names[len(args):]]


@DISPATCHER.rule(aten._thnn_fused_lstm_cell.default)
def fused_lstm_cell(func, args, kwargs):
    igates, hgates, cx, b_ih, b_hh = _args(args, kwargs, ("input_gates", "hidden_gates", "cx",
                                                          "input_bias", "hidden_bias"))
    # The CPU cell's order of additions: (h @ W_hh + b_hh) + (x @ W_ih + b_ih).
    if b_hh is not None:
        hgates = hgates + b_hh
    if b_ih is not None:
        igates = igates + b_ih
    i, f, g, o = (hgates + igates).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy, torch.cat([i, f, g, o], 1)  # workspace: the activated gates, as CUDA's


@DISPATCHER.rule(aten._thnn_fused_lstm_cell_backward_impl.default)
def fused_lstm_cell_backward(func, args, kwargs):
    grad_hy, grad_cy, cx, cy, workspace, has_bias = _args(
        args, kwargs, ("grad_hy", "grad_cy", "cx", "cy", "workspace", "has_bias"))
    i, f, g, o = workspace.chunk(4, 1)
    tanh_cy = cy.tanh()
    gcx = grad_cy if grad_cy is not None else torch.zeros_like(cx)
    if grad_hy is not None:
        gcx = gcx + grad_hy * o * (1 - tanh_cy * tanh_cy)
        grad_o = grad_hy * tanh_cy * o * (1 - o)
    else:
        grad_o = torch.zeros_like(o)
    grad_gates = torch.cat([gcx * g * i * (1 - i), gcx * cx * f * (1 - f),
                            gcx * i * (1 - g * g), grad_o], 1)
    return grad_gates, gcx * f, grad_gates.sum(0) if has_bias else None


@DISPATCHER.rule(aten._thnn_fused_gru_cell.default)
def fused_gru_cell(func, args, kwargs):
    igates, hgates, hx, b_ih, b_hh = _args(args, kwargs, ("input_gates", "hidden_gates", "hx",
                                                          "input_bias", "hidden_bias"))
    if b_ih is not None:
        igates = igates + b_ih
    if b_hh is not None:
        hgates = hgates + b_hh
    ir, ii, in_ = igates.chunk(3, 1)
    hr, hi, hn = hgates.chunk(3, 1)
    r = (hr + ir).sigmoid()
    z = (hi + ii).sigmoid()
    n = (in_ + hn * r).tanh()
    hy = (hx - n) * z + n
    return hy, torch.cat([r, z, n, hn, hx], 1)  # workspace as CUDA's: gates, h's n part, hx


@DISPATCHER.rule(aten._thnn_fused_gru_cell_backward.default)
def fused_gru_cell_backward(func, args, kwargs):
    grad_hy, workspace, has_bias = _args(args, kwargs, ("grad_hy", "workspace", "has_bias"))
    r, z, n, hn, hx = workspace.chunk(5, 1)
    grad_z = grad_hy * (hx - n) * (1 - z) * z
    grad_in = grad_hy * (1 - z) * (1 - n * n)
    grad_hn = grad_in * r
    grad_r = grad_in * hn * (1 - r) * r
    grad_igates = torch.cat([grad_r, grad_z, grad_in], 1)
    grad_hgates = torch.cat([grad_r, grad_z, grad_hn], 1)
    bias = (grad_igates.sum(0), grad_hgates.sum(0)) if has_bias else (None, None)
    return grad_igates, grad_hgates, grad_hy * z, *bias


def _value(t):
    # Not t.item(): below autograd, aten.item would reach the dispatcher instead of its composite.
    return aten._local_scalar_dense.default(t)


@DISPATCHER.rule(aten.equal.default)
def equal(func, args, kwargs):
    a, b = args
    if a.shape != b.shape:
        return False
    return bool(_value((a == b).all()))


@DISPATCHER.rule(aten.allclose.default)
def allclose(func, args, kwargs):
    a, b, rtol, atol, equal_nan = _args(args, kwargs, ("self", "other", "rtol", "atol", "equal_nan"))
    close = torch.isclose(a, b, rtol=1e-05 if rtol is None else rtol,
                          atol=1e-08 if atol is None else atol, equal_nan=bool(equal_nan))
    return bool(_value(close.all()))
