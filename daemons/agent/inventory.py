"""What GPUs this node has and how they are doing.

Three sources, tried in order: NVML through ``pynvml`` (real GPUs, full telemetry), ``torch.cuda``
(real GPUs without pynvml: memory only), and otherwise ``settings.virtual_gpus`` virtual GPUs whose
"utilization" and "memory" are the CPU time and resident memory of the worker process serving
each one, read from ``/proc``. A sensor the hardware does not have is reported as ``None``.

Each record also carries the GPU's ``fault`` (None when healthy) and whether it is ``lost``. A GPU
NVML cannot read any more has fallen off the bus or hung: it is lost, and only that GPU's record
says so, so the node's other GPUs keep their jobs. A GPU at or over its slowdown temperature
throttles: a fault, not lost. The master places no new job on a GPU with a fault and fails the
jobs on a lost one.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("moai.agent.inventory")

MIB = 1024 * 1024
_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_NVIDIA_DEVICE = Path("/dev/nvidia0")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory: int          # bytes
    virtual: bool

    def as_wire(self) -> dict:
        return {"index": self.index, "name": self.name, "memory": self.memory}


def _load_nvml():
    """The pynvml module, initialised, or None when it is missing or finds no driver."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml
    try:
        pynvml.nvmlInit()
    except Exception as e:  # library present, driver absent: a CPU node
        log.info("NVML unavailable: %s", e)
        return None
    return pynvml


def gpu_device_present() -> bool:
    """Whether this machine has an NVIDIA device node: only then may the inventory need torch."""
    return _NVIDIA_DEVICE.exists()


def _torch_cuda():
    # Importing torch costs seconds and memory; only pay for it where a GPU device node exists.
    if not gpu_device_present() or importlib.util.find_spec("torch") is None:
        return None
    import torch
    return torch.cuda if torch.cuda.is_available() else None


class Inventory:
    """The node's GPUs (fixed at start) and a ``sample`` of their telemetry on demand."""

    def __init__(self, virtual_gpus: int, virtual_gpu_memory_mb: int, worker_threads: int = 1):
        self.worker_threads = max(1, worker_threads)
        self._nvml = _load_nvml()
        self._cuda = None if self._nvml else _torch_cuda()
        if self._nvml:
            self.gpus = [self._nvml_gpu(i) for i in range(self._nvml.nvmlDeviceGetCount())]
        elif self._cuda:
            self.gpus = [Gpu(i, self._cuda.get_device_properties(i).name,
                             self._cuda.get_device_properties(i).total_memory, False)
                         for i in range(self._cuda.device_count())]
        else:
            self.gpus = [Gpu(i, "Virtual GPU (CPU)", virtual_gpu_memory_mb * MIB, True)
                         for i in range(virtual_gpus)]
        # pid -> (cpu seconds, wall time) at the previous sample, for utilization over the interval
        self._cpu_seen: dict[int, tuple[float, float]] = {}

    @property
    def has_real_gpus(self) -> bool:
        return bool(self.gpus) and not self.gpus[0].virtual

    def _nvml_gpu(self, i: int) -> Gpu:
        nv = self._nvml
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            memory = int(nv.nvmlDeviceGetMemoryInfo(h).total)
        except nv.NVMLError as e:  # registered all the same: its samples say it is lost
            log.error("GPU %d cannot be read at start: %s", i, e)
            return Gpu(i, "unreadable GPU", 0, False)
        return Gpu(i, name.decode() if isinstance(name, bytes) else name, memory, False)

    def sample(self, worker_pids: dict[int, int]) -> list[dict]:
        """One telemetry record per GPU (``heartbeat_node`` format). ``worker_pids``: gpu -> pid."""
        if self._nvml:
            return [self._sample_nvml(g) for g in self.gpus]
        if self._cuda:
            return [self._sample_cuda(g) for g in self.gpus]
        records = [self._sample_virtual(g, worker_pids.get(g.index)) for g in self.gpus]
        live = set(worker_pids.values())
        self._cpu_seen = {pid: v for pid, v in self._cpu_seen.items() if pid in live}
        return records

    def _sample_nvml(self, g: Gpu) -> dict:
        nv = self._nvml
        try:
            h = nv.nvmlDeviceGetHandleByIndex(g.index)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = nv.nvmlDeviceGetUtilizationRates(h)
        except nv.NVMLError as e:
            log.error("GPU %d cannot be read: %s", g.index, e)
            return {"index": g.index, "util": None, "mem_util": None, "mem_used": None,
                    "mem_total": g.memory, "temp_c": None, "mem_temp_c": None,
                    "fault": f"NVML cannot read the GPU: {e}", "lost": True}
        temp = _optional(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        slowdown = _optional(lambda: nv.nvmlDeviceGetTemperatureThreshold(
            h, nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
        hot = temp is not None and slowdown is not None and temp >= slowdown
        return {"index": g.index, "util": float(util.gpu), "mem_util": float(util.memory),
                "mem_used": int(mem.used), "mem_total": int(mem.total), "temp_c": temp,
                "mem_temp_c": _optional(lambda: _nvml_memory_temperature(nv, h)),
                "fault": f"over temperature: {temp} C, slowdown at {slowdown} C" if hot else None,
                "lost": False}

    def _sample_cuda(self, g: Gpu) -> dict:
        free, total = self._cuda.mem_get_info(g.index)
        return {"index": g.index, "util": None, "mem_util": None, "mem_used": int(total - free),
                "mem_total": int(total), "temp_c": None, "mem_temp_c": None, "fault": None, "lost": False}

    def _sample_virtual(self, g: Gpu, pid: int | None) -> dict:
        util, rss = (0.0, 0) if pid is None else self._process_usage(pid)
        return {"index": g.index, "util": util, "mem_util": round(100.0 * rss / g.memory, 1),
                "mem_used": rss, "mem_total": g.memory, "temp_c": None, "mem_temp_c": None,
                "fault": None, "lost": False}

    def _process_usage(self, pid: int) -> tuple[float, int]:
        """(CPU utilization % of the worker's thread budget since the last sample, RSS bytes)."""
        usage = read_proc_usage(pid)
        if usage is None:
            return 0.0, 0
        cpu_s, rss = usage
        now = time.monotonic()
        prev = self._cpu_seen.get(pid)
        self._cpu_seen[pid] = (cpu_s, now)
        if prev is None or now <= prev[1]:
            return 0.0, rss
        pct = 100.0 * (cpu_s - prev[0]) / (now - prev[1]) / self.worker_threads
        return round(min(100.0, max(0.0, pct)), 1), rss


def read_proc_usage(pid: int) -> tuple[float, int] | None:
    """(user+system CPU seconds, resident bytes) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fixed fields start after its ')'.
    fields = stat.rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return cpu_ticks / _CLOCK_TICKS_PER_S, int(statm.split()[1]) * _PAGE_BYTES


def _nvml_memory_temperature(nv, handle):
    # HBM temperature is a field value only some boards report (H100/A100 do, consumer cards not).
    field = getattr(nv, "NVML_FI_DEV_MEMORY_TEMP", None)
    if field is None:
        return None
    (value,) = nv.nvmlDeviceGetFieldValues(handle, [field])
    return None if value.nvmlReturn != 0 else int(value.value.uiVal)


def _optional(read):
    try:
        return read()
    except Exception:  # the board has no such sensor
        return None
