"""Ports for daemons started later (daemons/loopback_ports.py) come from below the kernel's
ephemeral range, where no ``bind(0)`` listener or connection's local end can take them first."""
import socket

from daemons import loopback_ports


def test_ports_are_free_and_below_the_ephemeral_range():
    start = loopback_ports._ephemeral_start()
    for _ in range(50):
        port = loopback_ports.free_port()
        assert loopback_ports.LOWEST <= port < start
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        with socket.socket() as s:  # the kernel's own numbering stays in its range
            s.bind(("127.0.0.1", 0))
            assert s.getsockname()[1] >= start


def test_a_block_skips_a_taken_port():
    base = loopback_ports.free_port_block(4, offsets=(0, 100))
    assert base + 104 < loopback_ports._ephemeral_start()
    taken = socket.socket()
    taken.bind(("127.0.0.1", base + 102))
    try:
        for _ in range(50):
            other = loopback_ports.free_port_block(4, offsets=(0, 100))
            assert not (other + 100 <= base + 102 < other + 104 or other <= base + 102 < other + 4)
    finally:
        taken.close()


def test_blocks_handed_out_never_overlap_though_none_is_bound_yet(monkeypatch):
    """A test cluster picks every node's worker ports before any worker binds them: a random draw
    once gave two nodes the bases B and B + 1, and two workers the same port. The draws are forced
    here, and every port reads as free, as the ports of daemons not started yet do."""
    monkeypatch.setattr(loopback_ports, "_handed_out", set())
    monkeypatch.setattr(loopback_ports, "_all_free", lambda ports: True)
    draws = iter([20000, 20001, 19999, 20100, 20002])
    monkeypatch.setattr(loopback_ports.random, "randrange", lambda lo, hi: next(draws))
    assert loopback_ports.free_port_block(2, offsets=(0, 100)) == 20000
    assert loopback_ports.free_port_block(2, offsets=(0, 100)) == 20002
