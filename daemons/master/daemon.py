"""Assembles the master: database, agent link, handlers and the wire server, then serves."""
from __future__ import annotations

import logging

from daemons import config, wire
from daemons.master import metrics
from daemons.master.agents import AgentLink
from daemons.master.handlers import Master
from daemons.master.store import Store

log = logging.getLogger("moai.master")

# Short enough that launches and the queue react quickly; the tick only reads a small database.
TICK_INTERVAL_S = 0.1


def start_exporter(settings: config.Settings) -> metrics.Exporter | None:
    """The /metrics server, or None when it is off or its address cannot be bound: monitoring is
    not worth failing the control plane for."""
    if not settings.metrics_bind:
        return None
    try:
        return metrics.Exporter(settings.metrics_bind)
    except (OSError, ValueError) as e:
        log.error("metrics are off: cannot serve at %r: %s", settings.metrics_bind, e)
        return None


def build(settings: config.Settings) -> tuple[Master, wire.Server, metrics.Exporter | None]:
    store = Store(settings.path("db_path"))
    agents = AgentLink(settings.cluster_secret, settings.agent_call_timeout_s,
                       settings.worker_start_timeout_s + settings.agent_call_timeout_s)
    master = Master(settings, store, agents)
    now = master.clock()
    with store.tx():
        store.refresh_liveness(now)
    master.jobs.recover(now)
    exporter = start_exporter(settings)

    def tick():
        master.tick()
        if exporter is not None:
            exporter.refresh(master.clock(), lambda: metrics.render(store, master.jobs.free_gpus()[0]))

    server = wire.Server(settings.master_bind, master.handlers(), name="master",
                         tick=tick, tick_interval_s=TICK_INTERVAL_S)
    master.server = server
    return master, server, exporter


def serve(settings: config.Settings):
    """Serve until SIGTERM/SIGINT, then close the database."""
    master, server, exporter = build(settings)
    server.install_signal_handlers()
    log.info("master serving at %s, database %s", server.address, settings.path("db_path"))
    try:
        server.serve_forever()
    finally:
        if exporter is not None:
            exporter.close()
        master.jobs.agents.close()
        master.store.close()
        log.info("master stopped")
