"""Free loopback ports for daemons started next on this machine (a local job, a test cluster).

A port is picked here and bound seconds later, by a process still importing torch. A port of the
kernel's ephemeral range (``bind(0)``'s answer) can be taken in between: the kernel numbers every
connection's local end and every ``bind(0)`` listener from that range, gloo's and zmq's included.
So the ports here come from below it, checked free by binding them.

A port handed out is not handed out again by this process: the blocks of a test cluster's nodes
are all picked before any of their daemons binds, so a check by binding cannot see the others.
"""
from __future__ import annotations

import random
import socket

LOWEST = 10000
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_handed_out: set[int] = set()
MAX_REMEMBERED = 5000  # of the ~22,000 ports below the range: forgetting them all keeps draws cheap


def _ephemeral_start() -> int:
    try:
        with open(_RANGE_FILE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems keep theirs higher


def _all_free(ports) -> bool:
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port_block(width: int, offsets=(0,)) -> int:
    """A base port such that ``base + offset + i`` is free for every offset and ``i < width``."""
    top = _ephemeral_start() - max(offsets) - width
    if top <= LOWEST:
        raise RuntimeError(f"no room for loopback ports below the ephemeral range ({_RANGE_FILE})")
    for _ in range(200):
        base = random.randrange(LOWEST, top)
        ports = [base + offset + i for offset in offsets for i in range(width)]
        if _handed_out.isdisjoint(ports) and _all_free(ports):
            if len(_handed_out) > MAX_REMEMBERED:  # a process running many local jobs, one after another
                _handed_out.clear()
            _handed_out.update(ports)
            return base
    raise RuntimeError("no free block of loopback ports found")


def free_port() -> int:
    return free_port_block(1)
