"""The device-size catalog (flavors) of SPEC.md, in menu order, scaled by the cluster's GPU unit."""
from __future__ import annotations

from dataclasses import dataclass

# (label, number of GPU units) in the seeds' menu order; numbering in menus starts at 1.
_CATALOG = [
    ("Small", 1), ("Medium", 2), ("Large", 4), ("xLarge", 8), ("2xLarge", 16), ("3xLarge", 24),
    ("4xLarge", 32), ("6xLarge", 48), ("8xLarge", 64), ("12xLarge", 96), ("24xLarge", 192),
    ("1.5xLarge", 12),
]


@dataclass(frozen=True)
class Flavor:
    number: int          # position in the menu, 1-based
    name: str            # e.g. "Medium.128GB"
    gpus: int            # physical GPUs behind a device of this size
    memory_gb: int

    @property
    def memory_mib(self) -> int:
        # The seeds show 2048GB as 2096640 MiB: 1023.75 MiB per GB, i.e. 64 GB -> 65520 MiB.
        return self.memory_gb * 1023 + self.memory_gb * 3 // 4


def catalog(gpu_unit_gb: int = 64) -> list[Flavor]:
    return [Flavor(i + 1, f"{label}.{units * gpu_unit_gb}GB", units, units * gpu_unit_gb)
            for i, (label, units) in enumerate(_CATALOG)]


def find(key: str | int, gpu_unit_gb: int = 64) -> Flavor:
    """A flavor by menu number (1-12), full name ("Large.256GB") or label ("Large")."""
    flavors = catalog(gpu_unit_gb)
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        n = int(key)
        if 1 <= n <= len(flavors):
            return flavors[n - 1]
        raise KeyError(f"no device size number {n} (choose 1-{len(flavors)})")
    for f in flavors:
        if key in (f.name, f.name.rsplit(".", 1)[0]):
            return f
    raise KeyError(f"no device size named {key!r}")
