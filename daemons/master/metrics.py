"""The cluster's figures for Prometheus: ``GET /metrics`` at ``metrics_bind`` (off when empty).

The master's loop renders the text from its database every ``RENDER_INTERVAL_S`` and a small HTTP
server thread serves the latest text: the thread never touches the database (an SQLite connection
belongs to the thread that opened it) nor waits on the loop. A scrape is at most that old.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from daemons.master.store import ACTIVE_STATES, Store

log = logging.getLogger(__name__)

RENDER_INTERVAL_S = 2.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels) -> str:
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


class _Family:
    """One metric: its HELP and TYPE lines, then a line per sample."""

    def __init__(self, lines: list[str], name: str, kind: str, help_text: str):
        self.lines, self.name = lines, name
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def add(self, value, **labels):
        self.lines.append(f"{self.name}{_labels(**labels)} {float(value):g}")


def render(store: Store, free: dict[str, list[int]]) -> str:
    """The exposition text of the master's books; ``free``: each node's free GPUs (JobManager)."""
    lines: list[str] = []
    nodes = store.nodes()
    up = _Family(lines, "moai_node_up", "gauge", "1 while the node's agent heartbeats, 0 once it is lost")
    drained = _Family(lines, "moai_node_drained", "gauge", "1 while no new job is placed on the node")
    gpus = _Family(lines, "moai_node_gpus", "gauge", "GPUs the node registered")
    free_gpus = _Family(lines, "moai_node_gpus_free", "gauge", "GPUs of the node a new job could get now")
    for n in nodes:
        up.add(n["alive"], node=n["name"])
        drained.add(n["drained"], node=n["name"])
        gpus.add(len(n["gpus"]), node=n["name"])
        free_gpus.add(len(free.get(n["name"], [])), node=n["name"])
    sensors = [("moai_gpu_utilization_percent", "util", "utilization reported by the agent"),
               ("moai_gpu_memory_used_bytes", "mem_used", "device memory in use"),
               ("moai_gpu_temperature_celsius", "temp_c", "GPU temperature")]
    for name, key, help_text in sensors:
        family = _Family(lines, name, "gauge", help_text)
        for n in nodes:
            for g in n["telemetry"]:
                if isinstance(g.get(key), (int, float)):
                    family.add(g[key], node=n["name"], gpu=g.get("index"))
    fault = _Family(lines, "moai_gpu_fault", "gauge", "1 while the GPU's agent reports a fault (hot, lost)")
    for n in nodes:
        for g in n["telemetry"]:
            fault.add(1 if g.get("fault") else 0, node=n["name"], gpu=g.get("index"))
    gpu_drained = _Family(lines, "moai_gpu_drained", "gauge", "1 while no new job is placed on the GPU alone")
    for n in nodes:
        for g in n["gpus"]:
            gpu_drained.add(1 if g["index"] in n["drained_gpus"] else 0, node=n["name"], gpu=g["index"])
    jobs = _Family(lines, "moai_jobs", "gauge", "jobs queued, starting and running now")
    for state, count in store.job_counts(ACTIVE_STATES).items():
        jobs.add(count, state=state)
    ended = _Family(lines, "moai_jobs_ended_total", "counter", "jobs ended, by how")
    for state, count in store.job_counts(("finished", "failed")).items():
        ended.add(count, state=state)
    usage = _Family(lines, "moai_usage_gpu_seconds_total", "counter", "GPU-seconds billed, per user")
    by_user: dict[str, float] = {}
    for t in store.usage_by_token():
        by_user[t["user"]] = by_user.get(t["user"], 0.0) + t["gpu_seconds"]
    for user, seconds in sorted(by_user.items()):
        usage.add(seconds, user=user)
    return "\n".join(lines) + "\n"


class Exporter:
    """The HTTP server thread and the latest rendered text."""

    def __init__(self, bind: str):
        host, _, port = bind.rpartition(":")
        self.text = ""
        self._rendered_at = float("-inf")
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = exporter.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # a scrape every few seconds is no news
                log.debug("metrics: " + fmt, *args)

        self.server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s:%s/metrics", host or "0.0.0.0", self.server.server_address[1])

    def refresh(self, now: float, render_text):
        """Render again (``render_text()``) if the last text is RENDER_INTERVAL_S old. A render
        that raises is tried again after the same interval, not at every tick of the loop."""
        if now - self._rendered_at >= RENDER_INTERVAL_S:
            self._rendered_at = now
            self.text = render_text()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
