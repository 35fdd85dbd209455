"""The agent's GPU health checks against NVML. No GPU here: NVML is a stand-in module on the
path, answering as the driver does for a healthy, a hot and a lost GPU; the part it replaces
cannot run without a GPU."""
import sys
import textwrap

import pytest

from daemons.agent.inventory import Inventory

FAKE_NVML = textwrap.dedent('''
    from types import SimpleNamespace

    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
    TEMPS = {0: 61, 1: 93, 2: 55}
    LOST = set()


    class NVMLError(Exception):
        pass


    def nvmlInit():
        pass


    def nvmlDeviceGetCount():
        return 3


    def nvmlDeviceGetHandleByIndex(i):
        if i in LOST:
            raise NVMLError("GPU is lost")
        return i


    def nvmlDeviceGetName(h):
        return b"NVIDIA H200"


    def nvmlDeviceGetMemoryInfo(h):
        return SimpleNamespace(total=141 << 30, used=(h + 1) << 30)


    def nvmlDeviceGetUtilizationRates(h):
        return SimpleNamespace(gpu=10 * h, memory=5 * h)


    def nvmlDeviceGetTemperature(h, sensor):
        return TEMPS[h]


    def nvmlDeviceGetTemperatureThreshold(h, kind):
        assert kind == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return 90
''')


@pytest.fixture
def nvml(tmp_path, monkeypatch):
    (tmp_path / "pynvml.py").write_text(FAKE_NVML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    import pynvml
    yield pynvml
    sys.modules.pop("pynvml", None)


def test_a_hot_gpu_has_a_fault_and_a_lost_one_is_reported_alone(nvml):
    inventory = Inventory(virtual_gpus=2, virtual_gpu_memory_mb=64)
    assert inventory.has_real_gpus and [g.name for g in inventory.gpus] == ["NVIDIA H200"] * 3
    healthy, hot, _ = inventory.sample({})
    assert (healthy["temp_c"], healthy["fault"], healthy["lost"]) == (61, None, False)
    assert (hot["temp_c"], hot["fault"], hot["lost"]) == (93, "over temperature: 93 C, slowdown at 90 C", False)

    nvml.LOST.add(2)  # fell off the bus: the node's other GPUs are still sampled
    records = inventory.sample({})
    assert [r["index"] for r in records] == [0, 1, 2]
    assert records[0]["mem_used"] == 1 << 30 and records[0]["fault"] is None
    assert records[2]["lost"] and records[2]["fault"] == "NVML cannot read the GPU: GPU is lost"
    assert records[2]["mem_total"] == 141 << 30, "the size it registered with"


def test_a_gpu_lost_before_the_agent_starts_is_registered_and_reported_lost(nvml):
    nvml.LOST.add(1)
    inventory = Inventory(virtual_gpus=2, virtual_gpu_memory_mb=64)
    assert [(g.index, g.name) for g in inventory.gpus] == [(0, "NVIDIA H200"), (1, "unreadable GPU"),
                                                         (2, "NVIDIA H200")]
    assert [r["lost"] for r in inventory.sample({})] == [False, True, False]


def test_virtual_gpus_report_no_fault():
    inventory = Inventory(virtual_gpus=2, virtual_gpu_memory_mb=64)
    assert [(r["fault"], r["lost"]) for r in inventory.sample({})] == [(None, False), (None, False)]
