"""moreh-smi's tables reproduce the seed documents' layout (seed 000), line for line."""
import re

from moreh_cli.smi import device_table, physical_table, process_table, timestamp

SEED_DEVICES = """\
+-----------------------------------------------------------------------------------------------------+
|                                                    Current Version: 24.5.0  Latest Version: 24.5.0  |
+-----------------------------------------------------------------------------------------------------+
|  Device  |        Name         |       Model      |  Memory Usage  |  Total Memory  |  Utilization  |
+=====================================================================================================+
|  * 0     |  MoAI Accelerator   |  4xLarge.2048GB  |  1064128 MiB   |  2096640 MiB   |  100 %        |
+-----------------------------------------------------------------------------------------------------+"""

SEED_PROCESSES = """\
Processes:
+--------------------------------------------------------------------------------------+
|  Device  |  Job ID  |    PID    |               Process             |  Memory Usage  |
+======================================================================================+
|       0  |  977195  |  1968084  |  python tutorial/train_llama2.py  |  1064128 MiB   |
+--------------------------------------------------------------------------------------+"""

SEED_PHYSICAL = """\
+--------------------------------------------------------------------------------------+
|  Dev  |  Location  |  Dev Temp  |  Mem Temp  |  Dev Util  |  Mem Util  |  Mem Usage  |
+======================================================================================+
|    0  |  back24:0  |    50 C    |    59 C    |   100 %    |    33 %    |    59 %     |
|    1  |  back24:1  |    58 C    |    59 C    |   100 %    |    35 %    |    59 %     |
|   10  |  back25:2  |    65 C    |    64 C    |   100 %    |    32 %    |    45 %     |
+--------------------------------------------------------------------------------------+"""


def column_bars(line: str) -> list[int]:
    return [i for i, ch in enumerate(line) if ch == "|"]


def assert_same_layout(ours: list[str], seed: str):
    """Identical lines, except that header words may be centred one space differently (the
    seeds are not consistent about odd padding): there the column boundaries must match."""
    seed_lines = seed.splitlines()
    assert len(ours) == len(seed_lines)
    for got, want in zip(ours, seed_lines):
        if got != want:
            assert column_bars(got) == column_bars(want) and got.split() == want.split(), (got, want)


def test_device_table_matches_seed():
    devices = [{"id": 0, "current": True, "flavor": "4xLarge.2048GB", "used_mib": 1064128,
                "memory_mib": 2096640, "utilization": 100}]
    assert_same_layout(device_table(devices, "24.5.0", "24.5.0"), SEED_DEVICES)


def test_process_table_matches_seed():
    processes = [{"device_id": 0, "job_id": 977195, "pid": 1968084, "process": "python tutorial/train_llama2.py",
                  "memory_mib": 1064128}]
    assert_same_layout(process_table(processes), SEED_PROCESSES)


def test_physical_table_matches_seed_exactly():
    rows = [(0, "back24:0", 50, 59, 100, 33, 59), (1, "back24:1", 58, 59, 100, 35, 59),
            (10, "back25:2", 65, 64, 100, 32, 45)]
    gpus = [dict(zip(["dev", "location", "temp_c", "mem_temp_c", "util", "mem_util", "mem_usage_pct"], r))
            for r in rows]
    assert physical_table(gpus) == SEED_PHYSICAL.splitlines()


def test_idle_device_shows_dashes_and_empty_process_table():
    lines = device_table([{"id": 7, "current": False, "flavor": "Small.64GB", "used_mib": None,
                           "memory_mib": 65520, "utilization": None}], "0.1.0", "0.1.0")
    assert re.match(r"\|    7 +\|  MoAI Accelerator   \|  Small\.64GB  \|  -  +\|  65520 MiB  +\|  -  +\|$", lines[5])
    empty = process_table([])
    assert empty[-1] == empty[1] and empty[3].startswith("+===") and len(empty) == 5


def test_timestamp_has_the_seed_format():
    assert re.fullmatch(r"\d\d:\d\d:\d\d [A-Z][a-z]+ \d\d, \d{4}", timestamp())
