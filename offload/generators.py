"""``torch.Generator(device="cuda")``: a random number generator of the virtual device.

Programs seed one to draw reproducible noise apart from the global stream (diffusion pipelines'
``torch.Generator("cuda").manual_seed(0)``, samplers, augmentations) and pass it to device ops
(``torch.randn(..., generator=g, device="cuda")``, ``x.normal_(generator=g)``). Its state is a
worker's: a generator of the worker's device, created by a ``moai::generator`` record in the op
stream when an op first names it (docs/PROTOCOL.md), seeded and read by the RNG records that
name it, freed with the program's object. So its draws are the worker device's, as a CUDA
generator's are CUDA's.

``torch.Generator`` itself is a C type whose constructor cannot make a CUDA generator in a CPU
build; the name is given a class that makes this one for the virtual device and the C type's
generator for any other, and that ``isinstance`` treats as the C type.
"""
from __future__ import annotations

import random
import weakref

import torch

from daemons.wire import EXT_GENERATOR_REF, packed_ref
from offload import session as sessions
from offload.device_mapping import map_device, virtual_device

_C_GENERATOR = torch._C.Generator
_DEFAULT_SEED = _C_GENERATOR().initial_seed()   # a fresh generator's, CUDA's as the CPU's
# The dispatcher hands an op's generator to Python as a new object of the C type around the same
# C generator: the program's object is found again by that one's address.
_BY_ADDRESS: weakref.WeakValueDictionary[int, DeviceGenerator] = weakref.WeakValueDictionary()


class DeviceGenerator(_C_GENERATOR):
    """A generator of cuda:0. The C object underneath is a CPU generator that no device op draws
    from: it lets torch's argument parsing take this object where a ``Generator`` goes, and the op
    then reaches the virtual device's dispatch, which names the worker's generator instead."""

    def __init__(self, device=None):
        _BY_ADDRESS[self._cdata] = self
        self._seed = _DEFAULT_SEED
        self._session = None   # the session whose workers hold its state, once an op named it
        self._id = None

    @property
    def device(self) -> torch.device:
        from offload.tensor import VISIBLE_DEVICE
        return VISIBLE_DEVICE

    def wire_ref(self):
        """This generator as records name it, created on the workers at its first use there."""
        session = sessions.current()
        if self._session is not session:   # first use, or a new session (the old one's is gone)
            self._id = session.new_generator(self._seed)
            self._session = session
            self._ref = packed_ref(self._id, EXT_GENERATOR_REF)
        return self._ref

    def manual_seed(self, seed) -> DeviceGenerator:
        self._seed = int(seed) & ((1 << 64) - 1)   # torch takes any int and keeps its low 64 bits
        # The C generator too: a CPU op given this one (CUDA would refuse it) draws from the seed.
        _C_GENERATOR.manual_seed(self, self._seed)
        if self._session is not None and self._session is sessions.peek():
            self._session.manual_seed(self._seed, self._ref)
        return self

    def seed(self) -> int:
        seed = random.SystemRandom().randrange(1 << 63)
        self.manual_seed(seed)
        return seed

    def initial_seed(self) -> int:
        return self._seed

    def get_state(self) -> torch.Tensor:
        return sessions.current().get_rng_state(self.wire_ref())

    def set_state(self, new_state: torch.Tensor) -> DeviceGenerator:
        sessions.current().set_rng_state(new_state, self.wire_ref())
        return self

    def __del__(self, current_session=sessions.peek):   # bound when defined, as Handle.__del__'s
        if self._session is not None and self._session is current_session():
            self._session.release_id(self._id)


class DefaultDeviceGenerator(DeviceGenerator):
    """``torch.cuda.default_generators[0]``: the device's default generator, which
    ``torch.cuda.manual_seed`` and ``get_rng_state`` act on and ops given no generator draw from."""

    def wire_ref(self):
        return None   # a record naming no generator draws from the default one

    def manual_seed(self, seed) -> DefaultDeviceGenerator:
        torch.cuda.manual_seed(seed)
        return self

    def initial_seed(self) -> int:
        return torch.cuda.initial_seed()

    def get_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state()

    def set_state(self, new_state: torch.Tensor) -> DefaultDeviceGenerator:
        torch.cuda.set_rng_state(new_state)
        return self


class _GeneratorType(type(_C_GENERATOR)):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _C_GENERATOR)

    def __subclasscheck__(cls, subclass) -> bool:
        return issubclass(subclass, _C_GENERATOR)


class Generator(_C_GENERATOR, metaclass=_GeneratorType):
    """``torch.Generator`` as programs call it: ``device="cuda"`` makes the virtual device's."""

    def __new__(cls, device="cpu"):
        device = map_device("cpu" if device is None else device)
        if torch.device(device) == virtual_device():
            return DeviceGenerator()
        return _C_GENERATOR(device)


def wire_ref(generator: torch.Generator):
    """How an op record names the generator an op was given; one of another device fails as on
    CUDA."""
    program_generator = _BY_ADDRESS.get(generator._cdata)
    if program_generator is None:
        raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{generator.device.type}'")
    return program_generator.wire_ref()
