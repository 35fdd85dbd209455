"""Container health check: exit 0 when this container's daemon answers a request, 1 otherwise.

``moai-healthcheck master`` asks the master for its node list; ``moai-healthcheck agent`` asks
the local agent for its node status. A live TCP port is not enough (ZeroMQ accepts connections
before the daemon serves), so the check goes through the real protocol with the cluster secret.
"""
from __future__ import annotations

import sys

from daemons import config, wire

TIMEOUT_S = 3.0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["master"], ["agent"]):
        print("usage: moai-healthcheck master|agent", file=sys.stderr)
        return 2
    settings = config.load()
    address, request = ((settings.master_addr, "list_nodes") if argv == ["master"]
                        else (settings.agent_addr, "node_status"))
    client = wire.Client(address, token=settings.cluster_secret, timeout_s=TIMEOUT_S)
    try:
        client.call(request)
    except wire.WireError as e:
        print(f"{argv[0]} at {address} is not answering: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
