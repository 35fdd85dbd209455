"""The back-node agent (``moai-agent``): registers this node's GPUs with the master, heartbeats
their telemetry and starts/stops the workers of its GPUs (see daemons/agent/daemon.py), until
SIGTERM.
"""
from __future__ import annotations

import argparse

from daemons import config, wire
from daemons.agent.daemon import Agent


def main(argv=None):
    parser = argparse.ArgumentParser(prog="moai-agent", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    settings = config.load()
    wire.setup_logging(f"agent[{settings.node_name}]")
    agent = Agent(settings)
    agent.server.install_signal_handlers()
    agent.run()


if __name__ == "__main__":
    main()
