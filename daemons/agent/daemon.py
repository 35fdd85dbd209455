"""The back-node agent: registers the node's GPUs with the master, heartbeats their telemetry, and
starts/stops one worker per GPU on the master's request through the node's supervisord.

Two threads: the request server (``launch_worker``, ``stop_worker``, ``node_status``) and the
heartbeat loop, which also polls supervisor's process table to notice workers that died on their
job and reports them with ``report_worker_exit``. Whenever the master does not answer or does not
know this node (it restarted, or it declared the node dead), the agent registers again.
"""
from __future__ import annotations

import logging
import threading
import xmlrpc.client

from daemons import config, wire
from daemons.agent.inventory import Inventory
from daemons.agent.programs import ProgramStuck, SupervisorUnavailable, WorkerPrograms
from daemons.agent.state import AgentState, GpuBusy
from daemons.worker.spec import WorkerSpec

log = logging.getLogger("moai.agent")

_LAUNCH_FIELDS = {"job_id": int, "gpu": int, "rank": int, "world_size": int,
                  "job_secret": str, "rendezvous": str, "memory_cap": int}


class Agent:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.node = settings.node_name
        self.inventory = Inventory(settings.virtual_gpus, settings.virtual_gpu_memory_mb,
                                   settings.worker_threads)
        self.programs = WorkerPrograms(settings.supervisor_url, settings.supervisor_worker_group)
        self.state = AgentState(len(self.inventory.gpus))
        # Held across "read supervisor table + observe" and around every change of ``state``, so
        # that an observation always sees the table as it was after the changes it judges (an old
        # exit of a GPU's previous worker is never taken for a crash of the one just launched).
        # Never held while waiting on supervisord to start or stop a worker.
        self.lock = threading.Lock()
        self.spec_dir = settings.path("state_dir") / "workers"
        self.stopped = threading.Event()
        self.registered = False
        self.unreported_exits: list = []

        self.master_handlers = {
            "launch_worker": self.launch_worker,
            "stop_worker": self.stop_worker,
            "node_status": self.node_status,
        }
        self.server = wire.Server(settings.agent_bind, self._authorized(self.master_handlers),
                                  name=f"agent[{self.node}]")

    def _authorized(self, handlers: dict) -> dict:
        def guard(handler):
            def check(msg: wire.Message):
                if msg.token != self.settings.cluster_secret:
                    raise wire.RequestError("unauthorized", "agents obey only the cluster secret")
                return handler(_body_map(msg))
            return check
        return {name: guard(h) for name, h in handlers.items()}

    # ------------------------------------------------------------------ requests from the master

    def launch_worker(self, body: dict) -> dict:
        req = _fields(body, _LAUNCH_FIELDS)
        gpu = self._gpu(req["gpu"])
        if not 0 <= req["rank"] < req["world_size"]:
            raise wire.RequestError("bad_request", f"rank {req['rank']} outside world_size {req['world_size']}")
        port = self.settings.worker_port_base + gpu
        spec = WorkerSpec(job_id=req["job_id"], gpu=gpu, rank=req["rank"], world_size=req["world_size"],
                          job_secret=req["job_secret"], rendezvous=req["rendezvous"],
                          memory_cap=req["memory_cap"],
                          bind=f"tcp://{self.settings.worker_bind_host}:{port}",
                          device=f"cuda:{gpu}" if self.inventory.has_real_gpus else "cpu",
                          threads=self.settings.worker_threads)
        with self.lock:
            try:
                fresh = self.state.claim(gpu, spec.job_id)
            except GpuBusy as e:
                raise wire.RequestError("gpu_busy", str(e)) from None
        if fresh:
            # Not under the lock: start() may wait seconds for the GPU's previous worker to exit,
            # and heartbeats must go on meanwhile (observe() ignores a claim not started yet).
            try:
                spec.save(self.spec_dir / f"gpu-{gpu}.json")
                self.programs.start(gpu)
            except (OSError, SupervisorUnavailable, ProgramStuck, xmlrpc.client.Fault) as e:
                with self.lock:
                    self.state.forget(gpu)
                raise wire.RequestError("launch_failed", f"cannot start worker {gpu}: {e}") from None
            with self.lock:
                self.state.started(gpu)
        log.info("%s worker for job %s rank %d on gpu %d", "started" if fresh else "already had",
                 spec.job_id, spec.rank, gpu)
        return {"address": f"tcp://{self.settings.worker_host}:{port}"}

    def stop_worker(self, body: dict) -> dict:
        req = _fields(body, {"job_id": int, "gpu": int})
        gpu = self._gpu(req["gpu"])
        with self.lock:
            if not self.state.release(gpu, req["job_id"]):
                return {}  # the GPU already serves another job: this job's worker is long gone
        try:
            self.programs.stop(gpu)
        except (SupervisorUnavailable, xmlrpc.client.Fault) as e:
            raise wire.RequestError("stop_failed", f"cannot stop worker {gpu}: {e}") from None
        log.info("stopping worker of job %s on gpu %d", req["job_id"], gpu)
        return {}

    def node_status(self, body: dict) -> dict:
        try:
            return self.heartbeat_body(self.poll_workers())
        except SupervisorUnavailable as e:
            raise wire.RequestError("supervisor_unavailable", str(e)) from None

    def _gpu(self, gpu) -> int:
        try:
            return self.state.check_gpu(gpu)
        except ValueError as e:
            raise wire.RequestError("bad_request", str(e)) from None

    # ------------------------------------------------------------------ talking to the master

    def heartbeat_body(self, programs) -> dict:
        pids = {gpu: p.pid for gpu, p in programs.items() if p.alive and p.pid}
        return {"node": self.node, "gpus": self.inventory.sample(pids), "workers": self.state.workers()}

    def register(self, master: wire.Client):
        master.call("register_node", {"node": self.node, "agent_addr": self.settings.agent_addr,
                                      "worker_host": self.settings.worker_host,
                                      "worker_port_base": self.settings.worker_port_base,
                                      "gpus": [g.as_wire() for g in self.inventory.gpus]})
        self.registered = True
        log.info("registered node %s (%d GPUs) with %s", self.node, len(self.inventory.gpus),
                 self.settings.master_addr)

    def poll_workers(self) -> dict:
        """Supervisor's table of the workers, after noting those that died on their job (the
        heartbeat loop reports them)."""
        with self.lock:
            programs = self.programs.states()
            exits = self.state.observe(programs)
        for ex in exits:
            log.warning("worker of job %s on gpu %d died: %s", ex.job_id, ex.gpu, ex.reason)
        self.unreported_exits.extend(exits)
        return programs

    def heartbeat_once(self, master: wire.Client):
        """Poll the workers, report the dead ones, then heartbeat (registering first if needed)."""
        programs = self.poll_workers()
        if not self.registered:
            self.register(master)
        # Reported before the heartbeat so the master never sees a dead worker's GPU as busy;
        # a report is dropped only once the master has taken it, so an outage loses none.
        while self.unreported_exits:
            try:
                master.call("report_worker_exit", self.unreported_exits[0].as_wire(self.node))
            except wire.RemoteError as e:  # refused (job already over): nothing left to tell
                log.info("exit report refused: %s", e)
            self.unreported_exits.pop(0)
        try:
            master.call("heartbeat_node", self.heartbeat_body(programs))
        except wire.RemoteError as e:
            # The master does not know us (restarted with a fresh DB, or declared us dead).
            log.warning("heartbeat refused (%s); registering again", e)
            self.register(master)

    def heartbeat_loop(self):
        master = self._master_client()
        while not self.stopped.is_set():
            try:
                self.heartbeat_once(master)
            except wire.TransportTimeout as e:
                log.warning("master unreachable: %s", e)
                self.registered = False
                master.close()  # a fresh socket drops requests queued for the dead peer
                master = self._master_client()
            except (wire.WireError, SupervisorUnavailable) as e:
                log.warning("heartbeat failed: %s", e)
                self.registered = False
            except Exception:
                log.exception("heartbeat failed")
            self.stopped.wait(self.settings.heartbeat_interval_s)
        master.close()

    def _master_client(self) -> wire.Client:
        # Half the dead-node timeout: a slow answer is retried before the master gives up on us.
        return wire.Client(self.settings.master_addr, self.settings.cluster_secret,
                           timeout_s=max(1.0, self.settings.heartbeat_timeout_s / 2))

    # ------------------------------------------------------------------ lifecycle

    def recover(self):
        """Re-adopt workers still running from before an agent restart (their specs say whose)."""
        for gpu, prog in self.programs.states().items():
            spec_path = self.spec_dir / f"gpu-{gpu}.json"
            if prog.alive and gpu < self.state.gpu_count and spec_path.exists():
                self.state.claim(gpu, WorkerSpec.load(spec_path).job_id)
                self.state.started(gpu)
                log.info("re-adopted running worker of job %s on gpu %d", self.state.slots[gpu].job_id, gpu)

    def run(self):
        try:
            self.recover()
        except (SupervisorUnavailable, OSError, ValueError, TypeError) as e:
            log.warning("could not inspect running workers: %s", e)
        beat = threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        log.info("agent of node %s serving %s, %d %s GPUs", self.node, self.server.address,
                 len(self.inventory.gpus), "real" if self.inventory.has_real_gpus else "virtual")
        try:
            self.server.serve_forever()
        finally:
            self.stopped.set()
            beat.join(timeout=self.settings.heartbeat_timeout_s)
            log.info("agent stopped")


def _body_map(msg: wire.Message) -> dict:
    if msg.body is None:
        return {}
    if not isinstance(msg.body, dict):
        raise wire.RequestError("bad_request", f"{msg.type} body must be a map")
    return msg.body


def _fields(body: dict, types: dict) -> dict:
    out = {}
    for name, typ in types.items():
        value = body.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise wire.RequestError("bad_request", f"field {name!r} must be {typ.__name__}, got {value!r}")
        out[name] = value
    return out
