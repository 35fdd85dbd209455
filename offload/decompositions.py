"""Ops the workers cannot run as such, composed of ordinary ops on the virtual device.

The fused LSTM / GRU cells: torch's RNN code takes the fused-cell path for every non-CPU input
(``input.is_privateuseone()`` in aten/src/ATen/native/RNN.cpp), so ``nn.LSTM`` / ``nn.GRU`` on the
device emit ``_thnn_fused_lstm_cell`` / ``_thnn_fused_gru_cell`` and their backward ops. Those
have CUDA kernels only: a worker running on CPU cannot execute them. They are rewritten here, on
the front, into the elementwise ops of the same math (the CUDA kernels' formulas and workspace
layouts), which every worker runs.

``F.ctc_loss`` with its lengths as host tensors, and ``pack_padded_sequence``'s batch sizes, which
CUDA keeps on the host.

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


@DISPATCHER.rule(aten._pack_padded_sequence.default)
def pack_padded_sequence(func, args, kwargs):
    """``nn.utils.rnn.pack_padded_sequence``: the packed data on the device, ``batch_sizes`` on the
    host, as CUDA's kernel returns them (``PackedSequence`` insists, and the packed RNN reads them
    there). The lengths are on the host already, so the steps are known here: the kernel's own
    loop (aten/src/ATen/native/PackedSequence.cpp), made of ordinary device ops."""
    input, lengths, batch_first = _args(args, kwargs, ("input", "lengths", "batch_first"))
    if batch_first:
        input = input.transpose(0, 1)
    lengths = lengths.contiguous().tolist()
    batch_size = input.size(1)
    if input.numel() == 0:
        raise RuntimeError("Cannot pack empty tensors.")
    if len(lengths) != batch_size:
        raise RuntimeError(f"Expected `len(lengths)` to be equal to batch_size, but got {len(lengths)} "
                           f"(batch_size={batch_size})")
    if lengths[-1] <= 0:
        raise RuntimeError("Length of all samples has to be greater than 0, but found an element in "
                           "'lengths' that is <= 0")
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise RuntimeError("`lengths` array must be sorted in decreasing order when `enforce_sorted` is "
                           "True. You can pass `enforce_sorted=False` to pack_padded_sequence and/or "
                           "pack_sequence to sidestep this requirement if you do not need ONNX "
                           "exportability.")
    steps, batch_sizes, previous = [], [], 0
    step_shape = [-1, *input.shape[2:]]
    for i, length in enumerate(reversed(lengths)):
        if length > previous:
            current = batch_size - i
            steps.append(input[previous:length, :current].contiguous().view(step_shape))
            batch_sizes += [current] * (length - previous)
            previous = length
    return torch.cat(steps), torch.tensor(batch_sizes, dtype=torch.int64)


def _ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction=1, zero_infinity=False):
    # For a tensor subclass torch's ctc_loss takes a path that divides the losses by the target
    # lengths where they are: on the host, as CUDA allows them, which a device op refuses. As
    # lists, they take the path CUDA takes.
    return aten.ctc_loss.IntList(log_probs, targets, _lengths(input_lengths), _lengths(target_lengths),
                                 blank, reduction, zero_infinity)


def _lengths(t) -> list[int]:
    return t.tolist() if isinstance(t, torch.Tensor) else list(t)


@DISPATCHER.rule(aten.ctc_loss.Tensor)
def ctc_loss(func, args, kwargs):
    """Here whole only under ``inference_mode``; elsewhere the device's autograd kernel
    (``register``) takes the call."""
    return _ctc_loss(*args, **kwargs)


def register(library: torch.library.Library):
    library.impl("ctc_loss.Tensor", _ctc_loss, "AutogradPrivateUse1")


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
