"""What the tools share: the master connection, one-line errors and the device-size menu.

A tool never shows a traceback for a user's mistake or an unreachable master: it prints one line
naming the problem and what to do, and exits with status 1.
"""
from __future__ import annotations

import importlib.metadata
import sys
from typing import Callable

from daemons import config, wire

MASTER_TIMEOUT_S = 5.0


class ToolError(Exception):
    """A problem the user can fix; printed as one line."""


class MasterConnection:
    def __init__(self, settings: config.Settings, token: str):
        self.address = settings.master_addr
        self.client = wire.Client(settings.master_addr, token, timeout_s=MASTER_TIMEOUT_S)

    def call(self, msg_type: str, body: dict | None = None):
        try:
            return self.client.call(msg_type, body or {})
        except wire.TransportTimeout:
            raise ToolError(f"cannot reach the master at {self.address} (no answer within "
                            f"{MASTER_TIMEOUT_S:g} s); check MOAI_MASTER_ADDR or that the cluster is up") from None
        except wire.RemoteError as e:
            raise ToolError(e.message) from None
        except wire.WireError as e:
            raise ToolError(f"talking to the master at {self.address} failed: {e}") from None

    def close(self):
        self.client.close()


def load_settings() -> config.Settings:
    try:
        return config.load()
    except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ToolError(f"bad settings: {e}") from None


def connect_user() -> MasterConnection:
    settings = load_settings()
    token = settings.user_token()
    if not token:
        raise ToolError(f"no token: set MOAI_TOKEN or write your token to {settings.token_file}")
    return MasterConnection(settings, token)


def connect_admin() -> MasterConnection:
    settings = load_settings()
    return MasterConnection(settings, settings.cluster_secret)


def client_version() -> str:
    try:
        return importlib.metadata.version("moai-platform")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_tool(prog: str, body: Callable[[], None]) -> int:
    """Run a tool's body, turning expected failures into one line on stderr and status 1."""
    try:
        body()
    except ToolError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def choose_flavor(flavor_list: list[dict], current: str | None,
                  read: Callable[[str], str] = input) -> dict | None:
    """The interactive size menu of moreh-switch-model and ``moreh-smi device --add``, over the
    master's ``list_flavors``. Returns the chosen flavor, or None when the user quits."""
    print(f"Current MoAI Accelerator: {current or '-'}\n")
    for f in flavor_list:
        print(f"{f['number']}. {f['name']}{'*' if f['name'] == current else ''}")
    print()
    numbers = {str(f["number"]): f for f in flavor_list}
    while True:
        try:
            answer = read(f"Selection (1-{len(flavor_list)}, q, Q): ").strip()
        except EOFError:
            return None
        if answer in ("q", "Q"):
            return None
        if answer in numbers:
            return numbers[answer]
        print(f"Please enter a number from 1 to {len(flavor_list)}, or q to quit.")
