"""What a rank of a multi-worker job does when an op fails: go on, or end the job at once.

Every rank runs the same records, so an op's own error (bad shapes) happens at the same record on
all of them; they stay in step, hold the same error and the job goes on. Some errors happen on one
rank only: a bad class index in one worker's rows (CUDA's device-side assert), a CPU worker's memory
cap on an uneven split. The others then go on into the op's collective and wait there for a peer
that never comes; asking them with a barrier, as this once did, waited as long (the group's
``collective_timeout_s``, 300 s by default), and the error the program finally saw said only that a
worker was gone.

So the ranks agree through the job's TCPStore, which rank 0's process serves from a thread of its
own (it answers while that rank's main thread waits in a collective): a failing rank counts itself
in for its round and waits up to ``out_of_step_s`` for the others. If they all come, the error was
the op's own and the job goes on. If not, the rank failed alone (or a peer is gone): it writes why
into the store, holds that as its error for every later record, and answers the front at once,
which raises the first error any rank answers (offload/stream.py) and, this one being
``device_lost``, sends nothing more: every later call raises it at once. The peers stay in their
collective until the group's timeout (gloo cannot be woken: neither aborting nor destroying a
group closes its connections while tensors still hold it) or until the job ends and their
processes are stopped; whichever rank fails later finds the reason in the store and holds it too.
The job cannot go on (CUDA's context is lost after a device-side assert too), but the program
learns it in seconds, with the op and the error that started it.
"""
from __future__ import annotations

import logging
import time

import torch.distributed as dist

log = logging.getLogger("moai.worker.faults")

# gloo's words when a peer's connection closed: the peer died or left the group. A closed pair never
# reopens, so no agreement is waited for (only a shortcut: without it the wait ends the same way).
CLOSED_CONNECTION = "Connection closed by peer"
REASON_KEY = "out_of_step"
POLL_S = 0.002   # ranks failing alike arrive within about an op of each other


class GroupBroken(RuntimeError):
    """The job's workers cannot go on together: a peer died, hung, or failed an op alone."""

    wire_code = "device_lost"   # the error code of the held error (docs/PROTOCOL.md)


class GroupFaults:
    def __init__(self, store: dist.Store, rank: int, world_size: int, out_of_step_s: float):
        self.store = dist.PrefixStore("moai/faults/", store)
        self.rank, self.world_size = rank, world_size
        self.out_of_step_s = out_of_step_s
        self._rounds = 0
        self.broken: str | None = None

    def check(self):
        if self.broken:
            raise GroupBroken(self.broken)

    def settle(self, exc: Exception, what: str):
        """After ``what`` raised ``exc`` on this rank: return if every rank failed there alike (the
        caller re-raises the op's error); else break the job and raise ``GroupBroken`` with why."""
        if isinstance(exc, GroupBroken):
            raise exc
        self.check()
        # An op's parts run guarded too (a decomposition, a backward's ops): settled once, where
        # it was raised first.
        if getattr(exc, "_moai_settled", False):
            return
        self._rounds += 1
        try:
            reason = self._reason()
            if reason is None and CLOSED_CONNECTION not in str(exc):
                if self._all_failed_here(f"round/{self._rounds}"):
                    exc._moai_settled = True
                    return
                reason = self._reason() or self._publish(exc, what)
        except dist.DistError as store_error:   # rank 0, which serves the store, is gone
            reason = f"the job's store is unreachable ({store_error})"
        self._break(reason or f"a worker of the job is gone: a collective failed "
                              f"({type(exc).__name__}: {exc})")

    def _all_failed_here(self, key: str) -> bool:
        arrived = self.store.add(key, 1)
        deadline = time.monotonic() + self.out_of_step_s
        while arrived < self.world_size and time.monotonic() < deadline:
            time.sleep(POLL_S)
            arrived = self.store.add(key, 0)
        return arrived >= self.world_size

    def _reason(self) -> str | None:
        if not self.store.check([REASON_KEY]):
            return None
        return self.store.get(REASON_KEY).decode(errors="replace")

    def _publish(self, exc: Exception, what: str) -> str:
        reason = (f"the job's workers are out of step: {what} failed on worker rank {self.rank} "
                  f"({type(exc).__name__}: {exc}) and the other workers did not fail there within "
                  f"{self.out_of_step_s:g} s (an error in one GPU's part of the data, "
                  f"or a worker gone); the device cannot go on")
        # compare_set keeps the first rank's reason if two ranks fail alone at once.
        return self.store.compare_set(REASON_KEY, "", reason).decode(errors="replace")

    def _break(self, reason: str):
        self.broken = reason
        log.error("%s", reason)
        raise GroupBroken(reason) from None
