"""CUDA's wording in the device checks torch makes in C++ before an op reaches the dispatcher.

Those checks print a tensor's device as torch registered it, ``moai:0``, where the program's
device is ``cuda:0``: an RNN given a host input ("parameter tensor at moai:0"), ``torch.stft``
given a host window, ``take_along_dim`` and ``tensor_split`` given host indices. The dispatcher's
own device check already names ``cuda:0``; these functions have their messages reworded, the
error's type and traceback kept (and scripted code still compiles them as torch's builtins).
"""
from __future__ import annotations

import functools
import re

import torch

from offload.device import BACKEND
from offload.device_mapping import script_builtin

FUNCTIONS = {
    torch._VF: ("lstm", "gru", "rnn_tanh", "rnn_relu", "stft", "istft"),
    torch: ("take_along_dim", "tensor_split"),
    torch.Tensor: ("take_along_dim", "tensor_split"),
}
_DEVICE_NAME = re.compile(rf"\b{BACKEND}\b")


def _in_cuda_words(original):
    @functools.wraps(original)
    def call(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except RuntimeError as e:
            if e.args and isinstance(e.args[0], str):
                e.args = (_DEVICE_NAME.sub("cuda", e.args[0]), *e.args[1:])
            raise
    call._moai_worded = True
    return call


def install():
    """Idempotent."""
    for owner, names in FUNCTIONS.items():
        for name in names:
            original = getattr(owner, name)
            if not getattr(original, "_moai_worded", False):
                setattr(owner, name, script_builtin(original, _in_cuda_words(original)))
