"""The agent's bookkeeping, apart from I/O: which job each GPU's worker belongs to.

Events come in (a launch, a stop, an observation of the supervisor's process table) and decisions
come out (start or not, stop or not, which workers died and must be reported). No sockets, no
supervisor: tests drive it directly.
"""
from __future__ import annotations

from dataclasses import dataclass

from daemons.agent.programs import EXITED_STATES, ProgramState


class GpuBusy(Exception):
    """The GPU's worker serves another job; the master must stop that one first."""


@dataclass
class Slot:
    job_id: int
    state: str = "starting"    # last supervisor state seen, lower-cased for the wire
    # False between the claim and the start request: until then supervisor's table still shows
    # the GPU's previous worker, whose exit is not this job's.
    started: bool = False


@dataclass(frozen=True)
class WorkerExit:
    gpu: int
    job_id: int
    exit_code: int | None      # None when killed by a signal or never started
    reason: str

    def as_wire(self, node: str) -> dict:
        return {"node": node, "gpu": self.gpu, "job_id": self.job_id,
                "exit_code": self.exit_code, "reason": self.reason}


class AgentState:
    def __init__(self, gpu_count: int):
        self.gpu_count = gpu_count
        self.slots: dict[int, Slot] = {}

    def check_gpu(self, gpu) -> int:
        if not isinstance(gpu, int) or isinstance(gpu, bool) or not 0 <= gpu < self.gpu_count:
            raise ValueError(f"gpu must be an index in 0..{self.gpu_count - 1}, got {gpu!r}")
        return gpu

    def claim(self, gpu: int, job_id: int) -> bool:
        """Bind ``gpu`` to ``job_id``. True: start its worker; False: it is already this job's."""
        slot = self.slots.get(self.check_gpu(gpu))
        if slot is None:
            self.slots[gpu] = Slot(job_id)
            return True
        if slot.job_id == job_id:
            return False
        raise GpuBusy(f"gpu {gpu} runs a worker of job {slot.job_id}")

    def started(self, gpu: int):
        """The worker of a claimed GPU was asked to start: from now on its exit is a crash."""
        self.slots[gpu].started = True

    def release(self, gpu: int, job_id: int) -> bool:
        """Unbind ``gpu`` from ``job_id``. True when its worker must be stopped (it is not
        another job's). Unbinding first means the coming exit is not reported as a crash."""
        slot = self.slots.get(self.check_gpu(gpu))
        if slot is not None and slot.job_id != job_id:
            return False
        self.slots.pop(gpu, None)
        return True

    def forget(self, gpu: int):
        """Undo a claim whose worker could not be started at all."""
        self.slots.pop(gpu, None)

    def observe(self, programs: dict[int, ProgramState]) -> list[WorkerExit]:
        """Take the supervisor's process table; return (and unbind) workers that died on their job."""
        exits = []
        for gpu, slot in list(self.slots.items()):
            prog = programs.get(gpu)
            if prog is None or not slot.started:
                continue
            if prog.state in EXITED_STATES or prog.state == "STOPPED":
                exits.append(_exit_of(gpu, slot.job_id, prog))
                del self.slots[gpu]
            else:
                slot.state = prog.state.lower()
        return exits

    def workers(self) -> list[dict]:
        return [{"gpu": gpu, "job_id": s.job_id, "state": s.state} for gpu, s in sorted(self.slots.items())]


def _exit_of(gpu: int, job_id: int, prog: ProgramState) -> WorkerExit:
    if prog.state == "FATAL":
        return WorkerExit(gpu, job_id, None, "worker could not be started (supervisor state FATAL)")
    if prog.state == "STOPPED":
        return WorkerExit(gpu, job_id, None, "worker was stopped outside the agent")
    if prog.exit_status == -1:  # supervisor's code for "terminated by a signal"
        return WorkerExit(gpu, job_id, None, "worker process was killed by a signal")
    return WorkerExit(gpu, job_id, prog.exit_status, f"worker process exited with status {prog.exit_status}")
