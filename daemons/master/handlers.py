"""The master's request handlers, grouped by who calls them (see docs/PROTOCOL.md).

The three dicts at the top of ``Master.__init__`` are the whole API. Client handlers receive the
caller's token (already checked against the database) and the body; agent and admin handlers
are reachable only with the cluster secret. Bodies are validated field by field: a wrong type
is a ``bad_request`` error, never a crash.
"""
from __future__ import annotations

import hmac
import importlib.metadata
import logging
import secrets
import sqlite3
import time
from pathlib import Path

from daemons import flavors as flavor_catalog
from daemons import wire
from daemons.wire import field
from daemons.config import Settings
from daemons.master import accounting, scheduler
from daemons.master.agents import AgentLink
from daemons.master.jobs import HOLDING_STATES, JobManager
from daemons.master.store import ACTIVE_STATES, Store

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def _body(msg: wire.Message) -> dict:
    if msg.body is None:
        return {}
    if not isinstance(msg.body, dict):
        raise wire.RequestError("bad_request", f"the body of {msg.type} must be a map")
    return msg.body


def server_version() -> str:
    try:
        return importlib.metadata.version("moai-platform")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def new_token() -> str:
    """A user token: 24 URL-safe characters, never starting with '-', which a command line
    (``moreh-docker-run --token T``) would read as an option: 1 token in 64 did."""
    while True:
        token = secrets.token_urlsafe(18)
        if not token.startswith("-"):
            return token


class Master:
    def __init__(self, settings: Settings, store: Store, agents: AgentLink, clock=time.time):
        self.settings = settings
        self.store = store
        self.clock = clock
        self.jobs = JobManager(store, settings, agents)
        self.server: wire.Server | None = None
        self.allocation_waiters: dict[int, tuple[bytes, int]] = {}   # job id -> (peer, request id)

        self.client_handlers = {
            "list_flavors": self.list_flavors,
            "list_devices": self.list_devices,
            "add_device": self.add_device,
            "remove_device": self.remove_device,
            "switch_device": self.switch_device,
            "set_device_flavor": self.set_device_flavor,
            "allocate_job": self.allocate_job,
            "job_status": self.job_status,
            "heartbeat_job": self.heartbeat_job,
            "release_job": self.release_job,
            "list_processes": self.list_processes,
            "list_physical_gpus": self.list_physical_gpus,
            "usage": self.usage,
        }
        self.agent_handlers = {
            "register_node": self.register_node,
            "heartbeat_node": self.heartbeat_node,
            "report_worker_exit": self.report_worker_exit,
        }
        self.admin_handlers = {
            "create_token": self.create_token,
            "list_tokens": self.list_tokens,
            "revoke_token": self.revoke_token,
            "drain_node": self.drain_node,
            "end_job": self.end_job,
            "limit_token": self.limit_token,
            "list_events": self.list_events,
            "backup_db": self.backup_db,
            "list_nodes": self.list_nodes,
            "list_all_jobs": self.list_all_jobs,
            "list_usage": self.list_usage,
        }

    def handlers(self) -> dict:
        """The dispatch table for ``wire.Server``, with authentication applied per group."""
        table = {"hello": lambda msg: {"server_version": server_version(), "protocol": wire.PROTOCOL_VERSION}}
        for name, fn in self.client_handlers.items():
            table[name] = self._as_user(fn)
        for name, fn in {**self.agent_handlers, **self.admin_handlers}.items():
            table[name] = self._as_cluster(fn)
        return table

    def _as_user(self, fn):
        def check(msg: wire.Message):
            row = self.store.token(msg.token) if msg.token else None
            if row is None:
                raise wire.RequestError("unauthorized", "unknown or missing token; set MOAI_TOKEN or "
                                                        f"write it to {self.settings.token_file}")
            if row["revoked"] is not None:
                raise wire.RequestError("unauthorized", f"this token was revoked by the cluster's "
                                                        f"administrator on {_date(row['revoked'])}; "
                                                        "ask them for a new one")
            return fn(msg.token, _body(msg), msg)
        return check

    def _as_cluster(self, fn):
        def check(msg: wire.Message):
            if not hmac.compare_digest((msg.token or "").encode(), self.settings.cluster_secret.encode()):
                raise wire.RequestError("unauthorized", "this request needs the cluster secret")
            return fn(_body(msg))
        return check

    # --- helpers ------------------------------------------------------------------------------
    def _user(self, token: str) -> str:
        row = self.store.token(token)
        return row["user"] if row else "?"

    def _flavor(self, key) -> flavor_catalog.Flavor:
        try:
            return flavor_catalog.find(key, self.settings.gpu_unit_gb)
        except KeyError as e:
            raise wire.RequestError("bad_request", e.args[0]) from None

    def _flavor_of(self, device: dict) -> flavor_catalog.Flavor:
        return flavor_catalog.catalog(self.settings.gpu_unit_gb)[device["flavor"] - 1]

    def _check_gpu_limit(self, token: str, flavor: flavor_catalog.Flavor, what: str):
        limit = self.store.token(token)["max_gpus"]
        if limit is not None and flavor.gpus > limit:
            raise wire.RequestError("gpu_limit", f"{what} ({flavor.name}) needs {scheduler.gpus(flavor.gpus)} but "
                                                 f"this token may use at most {scheduler.gpus(limit)}; pick a "
                                                 "smaller size with `moreh-switch-model`")

    def _device(self, token: str, device_id: int) -> dict:
        device = self.store.device(token, device_id)
        if device is None:
            raise wire.RequestError("not_found", f"you have no device {device_id}; "
                                                 "list yours with `moreh-smi`")
        return device

    def _current_device(self, token: str) -> dict | None:
        current = self.store.token(token)["current_device"]
        return self.store.device(token, current) if current is not None else None

    def _job(self, token: str, body) -> dict:
        job_id = field(body, "job_id", int)
        job = self.store.job(job_id)
        if job is None or job["token"] != token:
            raise wire.RequestError("not_found", f"you have no job {job_id}")
        return job

    def _telemetry(self) -> dict[tuple[str, int], dict]:
        return {(n["name"], g.get("index")): g for n in self.store.nodes() for g in n["telemetry"]
                if isinstance(g, dict)}

    def _device_view(self, device: dict, current_id, telemetry) -> dict:
        flavor = self._flavor_of(device)
        jobs = [j for j in self.store.jobs(("running",), token=device["token"]) if j["device_id"] == device["id"]]
        utils = [telemetry.get((w["node"], w["gpu"]), {}).get("util", 0) for j in jobs for w in j["workers"]]
        return {"id": device["id"], "flavor": flavor.name, "memory_mib": flavor.memory_mib,
                "used_mib": sum(j["memory_used"] for j in jobs) // MIB if jobs else None,
                "utilization": round(sum(utils) / len(utils)) if utils else None,
                "current": device["id"] == current_id}

    def _allocation_reply(self, job: dict) -> dict:
        message = self.jobs.queue_message(job) if job["state"] == "queued" else job["message"]
        return {"job_id": job["id"], "state": job["state"], "message": message}

    # --- client handlers: devices ---------------------------------------------------------------
    def list_flavors(self, token, body, msg):
        return {"flavors": [{"number": f.number, "name": f.name, "gpus": f.gpus, "memory_mib": f.memory_mib}
                            for f in flavor_catalog.catalog(self.settings.gpu_unit_gb)]}

    def list_devices(self, token, body, msg):
        current = self.store.token(token)["current_device"]
        telemetry = self._telemetry()
        return {"devices": [self._device_view(d, current, telemetry) for d in self.store.devices(token)],
                "current_id": current, "limit": self.settings.max_devices_per_token}

    def add_device(self, token, body, msg):
        flavor = self._flavor(field(body, "flavor", (int, str)))
        self._check_gpu_limit(token, flavor, "a new device")
        owned = len(self.store.devices(token))
        limit = self.settings.max_devices_per_token
        if owned >= limit:
            raise wire.RequestError("device_limit", f"this token already owns {owned} devices, the limit is "
                                                    f"{limit}; remove one with `moreh-smi device --rm ID`")
        with self.store.tx():
            device_id = self.store.add_device(token, flavor.number, self.clock())
            self.store.set_current_device(token, device_id)
        return {"device": self._device_view(self.store.device(token, device_id), device_id, {})}

    def remove_device(self, token, body, msg):
        if field(body, "all", bool, False):
            doomed = self.store.devices(token)
        else:
            doomed = [self._device(token, field(body, "device_id", int))]
        busy = {j["device_id"] for j in self.store.jobs(ACTIVE_STATES, token=token)}
        for d in doomed:
            if d["id"] in busy:
                raise wire.RequestError("device_busy", f"device {d['id']} has a running process; "
                                                       "let it finish first (see `moreh-smi`)")
        with self.store.tx():
            for d in doomed:
                self.store.remove_device(d["id"])
            current = self.store.token(token)["current_device"]
            if current is None or current in {d["id"] for d in doomed}:
                left = sorted(self.store.devices(token), key=lambda d: (d["last_used"], d["id"]))
                current = left[-1]["id"] if left else None
                self.store.set_current_device(token, current)
        return {"removed": [d["id"] for d in doomed], "current_id": current}

    def switch_device(self, token, body, msg):
        device = self._device(token, field(body, "device_id", int))
        with self.store.tx():
            self.store.set_current_device(token, device["id"])
            self.store.touch_device(device["id"], self.clock())
        return {"current_id": device["id"]}

    def set_device_flavor(self, token, body, msg):
        flavor = self._flavor(field(body, "flavor", (int, str)))
        device_id = field(body, "device_id", int, None)
        device = self._device(token, device_id) if device_id is not None else self._current_device(token)
        if device is None:
            raise wire.RequestError("no_device", "you have no device; add one with `moreh-smi device --add`")
        self._check_gpu_limit(token, flavor, f"device {device['id']}")
        with self.store.tx():
            self.store.set_device_flavor(device["id"], flavor.number)
        current = self.store.token(token)["current_device"]
        return {"device": self._device_view(self.store.device(token, device["id"]), current, self._telemetry())}

    # --- client handlers: jobs --------------------------------------------------------------------
    def allocate_job(self, token, body, msg):
        pid = field(body, "pid", int)
        process_name = field(body, "process_name", str)
        hostname = field(body, "hostname", str)
        device = self._current_device(token)
        if device is None:
            raise wire.RequestError("no_device", "you have no device; add one with `moreh-smi device --add`")
        self._check_gpu_limit(token, self._flavor_of(device), f"device {device['id']}")
        job = self.jobs.allocate(token, device, pid, process_name, hostname, self.clock())
        if job["state"] == "starting":
            # Answered from the tick once the agents have started the workers, so that the
            # front gets its job already running; the loop meanwhile serves everyone else.
            self.allocation_waiters[job["id"]] = (self.server.current_peer, msg.id)
            return wire.NO_REPLY
        return self._allocation_reply(job)

    def job_status(self, token, body, msg):
        job = self._job(token, body)
        if job["state"] == "queued":  # a front polling for its turn is alive; a running one heartbeats
            self._front_alive(job)
        return {**self._allocation_reply(job), "world_size": job["gpus"], "workers": job["workers"],
                "job_secret": job["job_secret"], "rendezvous": job["rendezvous"]}

    def _front_alive(self, job: dict):
        with self.store.tx():
            self.store.update_job(job["id"], last_heartbeat=self.clock())

    def heartbeat_job(self, token, body, msg):
        job = self._job(token, body)
        memory_used = field(body, "memory_used", int, 0)
        memory_peak = field(body, "memory_peak", int, 0)
        if job["state"] in ACTIVE_STATES:
            with self.store.tx():
                self.store.update_job(job["id"], last_heartbeat=self.clock(), memory_used=memory_used,
                                      memory_peak=max(memory_peak, job["memory_peak"]))
        return {"state": job["state"], "message": job["message"]}

    def release_job(self, token, body, msg):
        job = self._job(token, body)
        exit_code = field(body, "exit_code", int, None)
        if job["state"] in ACTIVE_STATES:
            how = "the process ended" if exit_code is None else f"the process exited with code {exit_code}"
            gpu_seconds = self.jobs.end(job, "finished", how, self.clock(), exit_code)
        else:
            record = self.store.usage_job(job["id"])
            gpu_seconds = record["gpu_seconds"] if record else 0.0
        return {"usage_gpu_seconds": gpu_seconds}

    def _devices_in_view(self, token, body) -> list[int]:
        device_id = field(body, "device_id", int, None)
        if device_id is not None:
            return [self._device(token, device_id)["id"]]
        return [d["id"] for d in self.store.devices(token)]

    def list_processes(self, token, body, msg):
        devices = self._devices_in_view(token, body)
        return {"processes": [{"device_id": j["device_id"], "job_id": j["id"], "pid": j["pid"],
                               "process": j["process_name"], "memory_mib": j["memory_used"] // MIB}
                              for j in self.store.jobs(HOLDING_STATES, token=token) if j["device_id"] in devices]}

    def list_physical_gpus(self, token, body, msg):
        device_id = field(body, "device_id", int, None)
        device = self._device(token, device_id) if device_id is not None else self._current_device(token)
        if device is None:
            return {"gpus": []}
        telemetry = self._telemetry()
        workers = [w for j in self.store.jobs(HOLDING_STATES, token=token) if j["device_id"] == device["id"]
                   for w in j["workers"]]
        gpus = []
        for dev, w in enumerate(workers):
            t = telemetry.get((w["node"], w["gpu"]), {})
            total = t.get("mem_total") or 0
            gpus.append({"dev": dev, "location": f"{w['node']}:{w['gpu']}", "temp_c": t.get("temp_c"),
                         "mem_temp_c": t.get("mem_temp_c"), "util": t.get("util"), "mem_util": t.get("mem_util"),
                         "mem_usage_pct": round(100 * (t.get("mem_used") or 0) / total) if total else None})
        return {"gpus": gpus}

    def usage(self, token, body, msg):
        return accounting.token_usage(self.store, token)

    # --- agent handlers ---------------------------------------------------------------------------
    def register_node(self, body):
        name = field(body, "node", str)
        gpus = field(body, "gpus", list)
        for g in gpus:
            field(g, "index", int)
            field(g, "memory", int, 0)
        if len({g["index"] for g in gpus}) != len(gpus):
            raise wire.RequestError("bad_request", "GPU indexes of a node must be unique")
        known = self.store.node(name)
        now = self.clock()
        with self.store.tx():
            self.store.upsert_node(name, field(body, "agent_addr", str), field(body, "worker_host", str),
                                   field(body, "worker_port_base", int, self.settings.worker_port_base),
                                   gpus, now)
            if known is None or not known["alive"]:
                self.store.add_event(now, "node_up", name, f"registered with {scheduler.gpus(len(gpus))}"
                                     + ("" if known is None else " again after it was lost"))
        log.info("node %s registered with %d GPUs", name, len(gpus))
        return {}

    def heartbeat_node(self, body):
        name = field(body, "node", str)
        telemetry = field(body, "gpus", list, [])
        workers = field(body, "workers", list, [])
        node = self.store.node(name)
        if node is None:
            raise wire.RequestError("not_found", f"node {name} is not registered; send register_node first")
        now = self.clock()
        # An entry that names no GPU is dropped: GPUs are looked up by their index.
        telemetry = [g for g in telemetry if isinstance(g, dict) and type(g.get("index")) is int]
        self.jobs.note_gpu_health(node, telemetry, now)
        with self.store.tx():
            self.store.node_seen(name, telemetry, now)
            if not node["alive"]:
                self.store.add_event(now, "node_up", name, "heartbeats again after it was lost")
        self.jobs.stop_strays(node, workers, now)
        return {}

    def report_worker_exit(self, body):
        job = self.store.job(field(body, "job_id", int))
        if job is not None:
            self.jobs.worker_exited(job, field(body, "node", str), field(body, "gpu", int),
                                    field(body, "reason", str, "unknown"), self.clock())
        return {}

    # --- admin handlers ---------------------------------------------------------------------------
    def create_token(self, body):
        user = field(body, "user", str)
        if not user.strip():
            raise wire.RequestError("bad_request", "the user name is empty")
        token = new_token()
        default = self._flavor(self.settings.default_flavor)
        now = self.clock()
        with self.store.tx():
            self.store.add_token(token, user, now)
            device_id = self.store.add_device(token, default.number, now)
            self.store.set_current_device(token, device_id)
        return {"token": token}

    def list_tokens(self, body):
        active: dict[str, int] = {}
        for j in self.store.jobs(ACTIVE_STATES):
            active[j["token"]] = active.get(j["token"], 0) + 1
        return {"tokens": [{"user": t["user"], "token": t["token"], "created": t["created"],
                            "revoked": t["revoked"], "max_gpus": t["max_gpus"],
                            "devices": len(self.store.devices(t["token"])),
                            "active_jobs": active.get(t["token"], 0)} for t in self.store.tokens()]}

    def revoke_token(self, body):
        """Take a user's rights away: the token is refused from now on and its jobs end at once
        (GPUs freed, usage billed up to now). The row stays: its usage is still the user's."""
        token = field(body, "token", str)
        row = self.store.token(token)
        if row is None:
            raise wire.RequestError("not_found", "no such token (list them with `moai-admin token list`)")
        if row["revoked"] is not None:  # revoked before: its jobs ended then
            return {"user": row["user"], "revoked": row["revoked"], "ended_jobs": []}
        now = self.clock()
        jobs = self.store.jobs(ACTIVE_STATES, token=token)
        ended = [job["id"] for job in jobs]
        with self.store.tx():
            self.store.revoke_token(token, now)
            self.store.add_event(now, "token_revoked", row["user"],
                                 f"jobs ended: {', '.join(map(str, ended)) or 'none'}")
        for job in jobs:
            self.jobs.end(job, "failed", "its token was revoked by the cluster's administrator", now)
        log.info("token of %s revoked; jobs ended: %s", row["user"], ended or "none")
        return {"user": row["user"], "revoked": now, "ended_jobs": ended}

    def end_job(self, body):
        """The operator ends a job (a runaway, a GPU needed elsewhere): its front stops with this
        as the reason, its GPUs return to the pool, its usage is billed up to now."""
        job_id = field(body, "job_id", int)
        job = self.store.job(job_id)
        if job is None:
            raise wire.RequestError("not_found", f"no job {job_id} (see `moai-admin jobs`)")
        if job["state"] not in ACTIVE_STATES:
            raise wire.RequestError("not_active", f"job {job_id} already {job['state']}: {job['message']}")
        now = self.clock()
        user = self._user(job["token"])
        with self.store.tx():
            self.store.add_event(now, "job_ended", f"job {job_id}", f"of {user}, by the administrator")
        gpu_seconds = self.jobs.end(job, "failed", "ended by the cluster's administrator", now)
        return {"job_id": job_id, "user": user, "gpu_seconds": gpu_seconds}

    def limit_token(self, body):
        """The most GPUs the token's jobs may use (its devices' sizes); none: no limit but the
        cluster's. A device already larger keeps its size, but runs no job until made smaller."""
        token = field(body, "token", str)
        max_gpus = field(body, "max_gpus", int, None)
        if max_gpus is not None and max_gpus < 1:
            raise wire.RequestError("bad_request", "max_gpus must be at least 1 (revoke a token to stop it)")
        if self.store.token(token) is None:
            raise wire.RequestError("not_found", "no such token (list them with `moai-admin token list`)")
        user = self._user(token)
        with self.store.tx():
            self.store.set_token_max_gpus(token, max_gpus)
            self.store.add_event(self.clock(), "token_limited", user,
                                 "no limit" if max_gpus is None else f"at most {scheduler.gpus(max_gpus)}")
        return {"user": user, "max_gpus": max_gpus}

    def drain_node(self, body):
        """``drained: true`` places no new job on the node's GPUs, or on its GPU ``gpu`` only (its
        running jobs go on), for maintenance or a suspect GPU; ``false`` gives them back."""
        name = field(body, "node", str)
        gpu = field(body, "gpu", int, None)
        drained = field(body, "drained", bool, True)
        node = self.store.node(name)
        if node is None:
            raise wire.RequestError("not_found", f"no node {name} is registered (see `moai-admin nodes`)")
        if gpu is not None and gpu not in {g["index"] for g in node["gpus"]}:
            raise wire.RequestError("not_found", f"node {name} has no GPU {gpu}")
        subject = name if gpu is None else f"{name}:{gpu}"
        with self.store.tx():
            if gpu is None:
                self.store.set_node_drained(name, drained)
            else:
                gpus = set(node["drained_gpus"])
                self.store.set_drained_gpus(name, sorted(gpus | {gpu} if drained else gpus - {gpu}))
            self.store.add_event(self.clock(), "drained" if drained else "undrained", subject,
                                 "no new job is placed on it" if drained else "takes new jobs again")
        log.info("%s %s", subject, "drained" if drained else "takes jobs again")
        if not drained:
            self.jobs.serve_queue(self.clock())
        running = [j["id"] for j in self.store.jobs(HOLDING_STATES)
                   if any(w["node"] == name and gpu in (None, w["gpu"]) for w in j["workers"])]
        return {"node": name, "gpu": gpu, "drained": drained, "running_jobs": running}

    def list_events(self, body):
        limit = field(body, "limit", int, 100)
        if limit < 1:
            raise wire.RequestError("bad_request", "limit must be at least 1")
        return {"events": [{k: e[k] for k in ("time", "kind", "subject", "message")}
                           for e in self.store.events(limit, field(body, "subject", str, None))]}

    def backup_db(self, body):
        """Write a consistent copy of the database to ``path`` on the master's own filesystem
        (in the containers: a path in the master-db volume); a new file only, never over one."""
        path = Path(field(body, "path", str))
        if not path.is_absolute():
            raise wire.RequestError("bad_request", f"the backup path must be absolute (on the master): {path}")
        if not path.parent.is_dir():
            raise wire.RequestError("bad_request", f"no directory {path.parent} on the master")
        if path.exists():
            raise wire.RequestError("exists", f"{path} already exists on the master; name a new file")
        try:
            self.store.backup(path)
        except sqlite3.Error as e:
            raise wire.RequestError("backup_failed", f"cannot write {path}: {e}") from None
        log.info("database backed up to %s", path)
        return {"path": str(path), "bytes": path.stat().st_size}

    def list_nodes(self, body):
        free, _ = self.jobs.free_gpus()
        now = self.clock()
        return {"nodes": [{"node": n["name"], "agent_addr": n["agent_addr"], "worker_host": n["worker_host"],
                           "alive": bool(n["alive"]), "drained": bool(n["drained"]),
                           "drained_gpus": n["drained_gpus"], "gpus": len(n["gpus"]),
                           "free": len(free.get(n["name"], [])),
                           "last_seen_s": round(now - n["last_seen"], 1), "telemetry": n["telemetry"]}
                          for n in self.store.nodes()]}

    def list_all_jobs(self, body):
        users = {t["token"]: t["user"] for t in self.store.tokens()}
        return {"jobs": [{"job_id": j["id"], "user": users.get(j["token"], "?"), "device_id": j["device_id"],
                          "gpus": j["gpus"], "state": j["state"], "message": j["message"], "pid": j["pid"],
                          "process": j["process_name"], "hostname": j["hostname"], "created": j["created"],
                          "started": j["started"], "ended": j["ended"],
                          "workers": [f"{w['node']}:{w['gpu']}" for w in j["workers"]]}
                         for j in self.store.all_jobs()]}

    def list_usage(self, body):
        return {"tokens": accounting.usage_by_token(self.store)}

    # --- timers -----------------------------------------------------------------------------------
    def tick(self):
        now = self.clock()
        self.jobs.expire(now)
        self.jobs.serve_queue(now)
        for job in self.jobs.poll_launches(now):
            waiter = self.allocation_waiters.pop(job["id"], None)
            if waiter and self.server is not None:
                self.server.reply(waiter[0], "ok", self._allocation_reply(job), waiter[1])
