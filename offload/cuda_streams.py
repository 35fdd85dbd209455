"""``torch.cuda`` streams, events and graphs on the virtual device.

The virtual device runs its op stream in order, so every stream is the one ordered stream:
ordering between streams (``wait_stream``, ``wait_event``) holds trivially and a side stream only
loses overlap, never correctness. Events time with the wall clock after a synchronize, which is
what ``elapsed_time`` means to a user measuring a training step. What cannot be honoured (raw
stream handles, external streams, IPC, CUDA graphs) raises ``NotImplementedError`` naming the API.
"""
from __future__ import annotations

import contextlib
import time

import torch

from offload.unsupported import not_supported, refusing


def _synchronize():
    from offload import cuda_facade
    cuda_facade.synchronize()


class Stream:
    """Any ``torch.cuda.Stream``: all of them are the virtual device's single ordered stream."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        self.device_index = 0
        self.priority = priority

    @property
    def device(self):
        import torch
        return torch.device("cuda", 0)

    @property
    def cuda_stream(self):
        raise not_supported("torch.cuda.Stream.cuda_stream (a raw CUDA stream handle)")

    def synchronize(self):
        _synchronize()

    def query(self) -> bool:
        _synchronize()
        return True

    def is_capturing(self) -> bool:
        return False  # CUDA graphs are refused (cuda_graph below), so nothing is ever captured

    def wait_stream(self, stream):
        pass  # one ordered stream: the other stream's work is already ahead of ours

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def __eq__(self, other):
        return isinstance(other, Stream)

    def __hash__(self):
        return 0

    def __repr__(self):
        return "<torch.cuda.Stream device=cuda:0 (MoAI Accelerator ordered stream)>"


_DEFAULT_STREAM = Stream()


class Event:
    """A ``torch.cuda.Event``; ``elapsed_time`` is wall-clock milliseconds between records."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False, **kwargs):
        if interprocess:
            raise not_supported("torch.cuda.Event(interprocess=True)")
        self.enable_timing = enable_timing
        self._recorded_at: float | None = None

    def record(self, stream=None):
        if self.enable_timing:
            _synchronize()
        self._recorded_at = time.perf_counter()

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        _synchronize()
        return True

    def synchronize(self):
        _synchronize()

    def elapsed_time(self, end_event: "Event") -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end_event._recorded_at - self._recorded_at) * 1000.0

    def ipc_handle(self):
        raise not_supported("torch.cuda.Event.ipc_handle")


def current_stream(device=None) -> Stream:
    return _DEFAULT_STREAM


def default_stream(device=None) -> Stream:
    return _DEFAULT_STREAM


def set_stream(stream):
    pass


@contextlib.contextmanager
def stream(stream=None):
    yield stream


class StreamContext(contextlib.AbstractContextManager):
    def __init__(self, stream):
        self.stream = stream

    def __exit__(self, *exc):
        return None


class _DeviceAgnosticType(type):
    """``torch.Stream`` / ``torch.Event``: their objects, and this device's, are instances."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, (cls._stock, cls._device_class))

    def __subclasscheck__(cls, subclass) -> bool:
        return issubclass(subclass, (cls._stock, cls._device_class))


def device_agnostic(stock: type, device_class: type, takes_device: bool) -> type:
    """``torch.Stream`` / ``torch.Event`` as programs call them: for ``cuda`` or the current
    accelerator (no device), the virtual device's; torch's own events on it cannot synchronize
    ("Backend doesn't support synchronizing events"). Any other device gets the stock type's."""
    from offload.device_mapping import is_virtual

    def __new__(cls, device=None, *args, **kwargs):
        if device is None or is_virtual(device):
            return device_class(device, *args, **kwargs) if takes_device else device_class(*args, **kwargs)
        return stock(device, *args, **kwargs)
    return _DeviceAgnosticType(stock.__name__, (), {
        "__new__": __new__, "_stock": stock, "_device_class": device_class,
        "__module__": stock.__module__, "__qualname__": stock.__qualname__, "__doc__": stock.__doc__})


_GRAPHS = "CUDA graphs (torch.cuda.graph / CUDAGraph / make_graphed_callables)"
cuda_graph = refusing(_GRAPHS)

PATCHES = {
    "Stream": Stream, "Event": Event, "current_stream": current_stream,
    "default_stream": default_stream, "set_stream": set_stream, "stream": stream,
    "StreamContext": StreamContext,
    "ExternalStream": refusing("torch.cuda.ExternalStream", torch.cuda.streams.ExternalStream),
    "get_stream_from_external": refusing("torch.cuda.get_stream_from_external"),
    "graph": refusing(_GRAPHS, torch.cuda.graphs.graph),
    "CUDAGraph": refusing(_GRAPHS, torch.cuda.graphs.CUDAGraph),
    "make_graphed_callables": cuda_graph, "graph_pool_handle": cuda_graph,
}
