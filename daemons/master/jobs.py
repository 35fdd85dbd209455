"""Job lifecycle: queue, GPU reservation, worker launch, end of job, and the liveness timers.

queued -> starting (GPUs reserved, agents asked to launch) -> running -> finished | failed.
Every transition is committed before anything is sent to an agent or a front.
"""
from __future__ import annotations

import logging
import secrets
from concurrent.futures import Future

from daemons import flavors as flavor_catalog
from daemons import wire
from daemons.config import Settings
from daemons.master import accounting, scheduler
from daemons.master.agents import AgentLink, LaunchError
from daemons.master.store import Store

log = logging.getLogger(__name__)

RENDEZVOUS_PORT_OFFSET = 100     # the TCPStore of a job sits at worker_port_base + 100 + gpu
HOLDING_STATES = ("starting", "running")


class JobManager:
    def __init__(self, store: Store, settings: Settings, agents: AgentLink):
        self.store = store
        self.settings = settings
        self.agents = agents
        self.launching: dict[int, tuple[list, list[Future]]] = {}

    # --- capacity -----------------------------------------------------------------------------
    def free_gpus(self) -> tuple[scheduler.FreeGpus, int]:
        """Free GPUs of each live node, and the number of GPUs of all live nodes. A drained node
        or GPU, and a GPU whose last telemetry names a fault, count in the total but are not free:
        no new job goes there."""
        live = [n for n in self.store.nodes() if n["alive"]]
        total = sum(len(n["gpus"]) for n in live)
        free = {n["name"]: {g["index"] for g in n["gpus"]} - faulty_gpus(n) - set(n["drained_gpus"])
                for n in live if not n["drained"]}
        for job in self.store.jobs(HOLDING_STATES):
            for w in job["workers"]:
                free.get(w["node"], set()).discard(w["gpu"])
        return {n: sorted(g) for n, g in free.items()}, total

    def registered_gpus(self) -> int:
        return sum(len(n["gpus"]) for n in self.store.nodes())

    def queue_message(self, job: dict) -> str:
        queued = [j["id"] for j in self.store.jobs(("queued",))]
        free, total = self.free_gpus()
        return scheduler.queue_message(job["gpus"], sum(len(g) for g in free.values()), total,
                                       queued.index(job["id"]) + 1)

    # --- transitions --------------------------------------------------------------------------
    def allocate(self, token: str, device: dict, pid: int, process_name: str, hostname: str,
                 now: float) -> dict:
        flavor = flavor_catalog.catalog(self.settings.gpu_unit_gb)[device["flavor"] - 1]
        cluster = self.registered_gpus()
        if flavor.gpus > cluster:
            raise wire.RequestError(
                "too_large", f"device {device['id']} ({flavor.name}) needs {scheduler.gpus(flavor.gpus)} but "
                f"the whole cluster has {cluster}; pick a smaller size with `moreh-switch-model`")
        with self.store.tx():
            job_id = self.store.add_job(token, device["id"], flavor.number, flavor.gpus, pid,
                                        process_name, hostname, secrets.token_hex(16), now)
            self.store.touch_device(device["id"], now)
        self.serve_queue(now)
        return self.store.job(job_id)

    def serve_queue(self, now: float):
        waiting = self.store.jobs(("queued",))
        if not waiting:
            return
        free, _ = self.free_gpus()
        for job_id, slots in scheduler.serve_queue(free, [(j["id"], j["gpus"]) for j in waiting]):
            self._start(self.store.job(job_id), slots, now)

    def _start(self, job: dict, slots: list[scheduler.Slot], now: float):
        nodes = {n["name"]: n for n in self.store.nodes()}
        first = nodes[slots[0].node]
        rendezvous = (f"tcp://{first['worker_host']}:"
                      f"{first['worker_port_base'] + RENDEZVOUS_PORT_OFFSET + slots[0].gpu}")
        workers = [{"rank": s.rank, "node": s.node, "gpu": s.gpu, "address": None} for s in slots]
        with self.store.tx():
            self.store.update_job(job["id"], state="starting", started=now, workers=workers,
                                  rendezvous=rendezvous, message=f"starting {len(slots)} workers")
        launches = [(s.node, nodes[s.node]["agent_addr"],
                     {"job_id": job["id"], "gpu": s.gpu, "rank": s.rank, "world_size": len(slots),
                      "job_secret": job["job_secret"], "rendezvous": rendezvous,
                      "memory_cap": _gpu_memory(nodes[s.node], s.gpu)}) for s in slots]
        self.launching[job["id"]] = (launches, self.agents.start_launch(launches))

    def poll_launches(self, now: float) -> list[dict]:
        """Finish the launches whose agents all answered; returns those jobs as they now are."""
        resolved = []
        for job_id, (launches, futures) in list(self.launching.items()):
            if not all(f.done() for f in futures):
                continue
            del self.launching[job_id]
            job = self.store.job(job_id)
            if job["state"] != "starting":  # ended while launching (node lost, released)
                resolved.append(job)
                continue
            try:
                addresses = self.agents.collect(launches, futures)
            except LaunchError as e:
                self.end(job, "failed", f"launch failed: {e}", now)
            else:
                workers = [dict(w, address=a) for w, a in zip(job["workers"], addresses)]
                node_names = sorted({w["node"] for w in workers})
                with self.store.tx():
                    # The front was blocked in allocate_job: its heartbeat clock starts now.
                    self.store.update_job(job_id, state="running", workers=workers, last_heartbeat=now,
                                          message=f"running on {scheduler.gpus(len(workers))} ({', '.join(node_names)})")
            resolved.append(self.store.job(job_id))
        return resolved

    def end(self, job: dict, state: str, message: str, now: float, exit_code: int | None = None) -> float:
        """Finish a job, free its GPUs, bill it and tell its agents to stop its workers."""
        with self.store.tx():
            self.store.update_job(job["id"], state=state, message=message, ended=now, exit_code=exit_code)
            gpu_seconds = accounting.record_job_end(self.store, job, now)
        log.info("job %s %s: %s (%.1f GPU-seconds)", job["id"], state, message, gpu_seconds)
        if job["state"] in HOLDING_STATES:
            nodes = {n["name"]: n for n in self.store.nodes()}
            for w in job["workers"]:
                if w["node"] in nodes:
                    self.agents.stop(w["node"], nodes[w["node"]]["agent_addr"], job["id"], w["gpu"])
        return gpu_seconds

    # --- timers -------------------------------------------------------------------------------
    def expire(self, now: float):
        """Declare silent nodes lost and silent fronts dead, failing what depended on them."""
        timeout = self.settings.heartbeat_timeout_s
        for node in self.store.nodes():
            if node["alive"] and now - node["last_seen"] > timeout:
                reason = f"node {node['name']} lost (no heartbeat for {timeout:g} s)"
                log.warning(reason)
                with self.store.tx():
                    self.store.set_node_lost(node["name"])
                    self.store.add_event(now, "node_lost", node["name"], reason)
                for job in self.store.jobs(HOLDING_STATES):
                    if any(w["node"] == node["name"] for w in job["workers"]):
                        self.end(job, "failed", reason, now)
        for job in self.store.jobs(("queued", "running")):
            if now - job["last_heartbeat"] > timeout:
                self.end(job, "failed", f"front process {job['pid']} on {job['hostname']} stopped "
                                        f"(no heartbeat for {timeout:g} s)", now)

    def recover(self, now: float):
        """After a master restart: launches in flight were lost with the old process."""
        for job in self.store.jobs(("starting",)):
            self.end(job, "failed", "master restarted while the workers were starting", now)

    def stop_strays(self, node: dict, reported: list, now: float):
        """Stop the workers an agent reports that no live job holds: a job that ended while its
        agent was unreachable (lost node, agent restart) never got its stop request through, and
        its worker would keep the GPU forever."""
        held = {(w["gpu"], j["id"]) for j in self.store.jobs(HOLDING_STATES) for w in j["workers"]
                if w["node"] == node["name"]}
        for w in reported:
            gpu, job_id = (w.get("gpu"), w.get("job_id")) if isinstance(w, dict) else (None, None)
            if type(gpu) is not int or type(job_id) is not int or (gpu, job_id) in held:
                continue
            job = self.store.job(job_id)
            if job and job["ended"] is not None and now - job["ended"] < self.settings.heartbeat_timeout_s:
                continue  # just ended: the stop request end() sent is still on its way
            log.warning("node %s still runs a worker of job %s on gpu %s: stopping it",
                        node["name"], job_id, gpu)
            self.agents.stop(node["name"], node["agent_addr"], job_id, gpu)

    def note_gpu_health(self, node: dict, telemetry: list, now: float):
        """Log each GPU whose fault appeared or cleared since the node's last heartbeat, and fail
        the jobs using a GPU its agent reports lost: their worker cannot finish, and may hang."""
        before = {g.get("index"): g.get("fault") for g in node["telemetry"]}
        for g in telemetry:
            gpu, fault = g.get("index"), g.get("fault")
            if fault != before.get(gpu):
                if fault:
                    log.warning("node %s GPU %s: %s", node["name"], gpu, fault)
                else:
                    log.info("node %s GPU %s has no fault any more", node["name"], gpu)
                with self.store.tx():
                    self.store.add_event(now, "gpu_fault" if fault else "gpu_ok", f"{node['name']}:{gpu}",
                                         str(fault or f"no fault any more (was: {before.get(gpu)})"))
            if not g.get("lost"):
                continue
            for job in self.store.jobs(HOLDING_STATES):
                if any(w["node"] == node["name"] and w["gpu"] == gpu for w in job["workers"]):
                    self.end(job, "failed", f"GPU {node['name']}:{gpu} failed: {fault}", now)

    def worker_exited(self, job: dict, node: str, gpu: int, reason: str, now: float):
        if job["state"] not in HOLDING_STATES:
            return  # the master stopped it itself, or the job already ended for another reason
        if not any(w["node"] == node and w["gpu"] == gpu for w in job["workers"]):
            return
        # The agent's reason names the worker's exit status or signal; the job's exit_code is the front's.
        with self.store.tx():
            self.store.add_event(now, "worker_failed", f"{node}:{gpu}", f"job {job['id']}: {reason}")
        self.end(job, "failed", f"worker on {node}:{gpu} failed: {reason}", now)


def faulty_gpus(node: dict) -> set:
    """The GPUs of a node whose last telemetry names a fault (over temperature, lost)."""
    return {g.get("index") for g in node["telemetry"] if g.get("fault")}


def _gpu_memory(node: dict, gpu: int) -> int:
    return next((int(g.get("memory", 0)) for g in node["gpus"] if g.get("index") == gpu), 0)
