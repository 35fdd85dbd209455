"""The back-node agent (``moai-agent``): registers this node's GPUs with the master, heartbeats
their telemetry and starts/stops the workers of its GPUs (see daemons/agent/daemon.py), until
SIGTERM.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="moai-agent", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    from daemons.agent import inventory

    # daemons.wire imports torch when it can, and the agent needs it only to read real GPUs that
    # NVML cannot: elsewhere keeping it out makes a restarted agent serve (and re-register) in
    # under a second instead of several, well inside the master's dead-node timeout.
    if not inventory.gpu_device_present():
        sys.modules.setdefault("torch", None)
    from daemons import config, wire
    from daemons.agent.daemon import Agent

    settings = config.load()
    wire.setup_logging(f"agent[{settings.node_name}]")
    agent = Agent(settings)
    agent.server.install_signal_handlers()
    agent.run()


if __name__ == "__main__":
    main()
