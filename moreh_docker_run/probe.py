"""Runs inside a throwaway front container: does the master answer there, and take the token?

A TCP connect is not proof (ZeroMQ and some network middleboxes accept connections nobody
serves), so the probe sends the protocol's ``hello`` and waits for the reply; ``hello`` is open to
anyone, so a read-only user request (``list_devices``) then checks the token.
Usage: python -m moreh_docker_run.probe tcp://HOST:PORT, token in $MOAI_PROBE_TOKEN (not
MOAI_TOKEN, which would switch the image's offloading layer on).
Exit 0: answers and accepts the token; 1: no answer or a refusal; 2: token rejected.
"""
from __future__ import annotations

import os
import sys

from daemons import wire

PROBE_TIMEOUT_S = 5.0


def main() -> int:
    address = sys.argv[1]
    client = wire.Client(address, token=os.environ.get("MOAI_PROBE_TOKEN", ""), timeout_s=PROBE_TIMEOUT_S)
    try:
        client.call("hello")
        client.call("list_devices")
    except wire.RemoteError as e:
        if e.code == "unauthorized":
            print(f"the master rejected the token: {e}", file=sys.stderr)
            return 2
        print(f"the master refused the probe: {e}", file=sys.stderr)
        return 1
    except wire.WireError as e:
        print(f"no answer: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
