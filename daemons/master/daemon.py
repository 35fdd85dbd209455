"""Assembles the master: database, agent link, handlers and the wire server, then serves."""
from __future__ import annotations

import logging

from daemons import config, wire
from daemons.master.agents import AgentLink
from daemons.master.handlers import Master
from daemons.master.store import Store

log = logging.getLogger("moai.master")

# Short enough that launches and the queue react quickly; the tick only reads a small database.
TICK_INTERVAL_S = 0.1


def build(settings: config.Settings) -> tuple[Master, wire.Server]:
    store = Store(settings.path("db_path"))
    agents = AgentLink(settings.cluster_secret, settings.agent_call_timeout_s,
                       settings.worker_start_timeout_s + settings.agent_call_timeout_s)
    master = Master(settings, store, agents)
    now = master.clock()
    with store.tx():
        store.refresh_liveness(now)
    master.jobs.recover(now)
    server = wire.Server(settings.master_bind, master.handlers(), name="master",
                         tick=master.tick, tick_interval_s=TICK_INTERVAL_S)
    master.server = server
    return master, server


def serve(settings: config.Settings):
    """Serve until SIGTERM/SIGINT, then close the database."""
    master, server = build(settings)
    server.install_signal_handlers()
    log.info("master serving at %s, database %s", server.address, settings.path("db_path"))
    try:
        server.serve_forever()
    finally:
        master.jobs.agents.close()
        master.store.close()
        log.info("master stopped")
