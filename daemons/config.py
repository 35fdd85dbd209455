"""Settings for every daemon and tool: one TOML file, then ``MOAI_<KEY>`` environment overrides.

The file is ``$MOAI_CONFIG`` if set, else ``~/.moai/moai.toml`` if it exists; keys are the field
names below (flat, no sections). Each environment variable ``MOAI_<FIELD NAME IN CAPITALS>``
overrides the file, converted to the field's type. Unknown keys in the file are an error, so a
typo never passes silently.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "MOAI_"
DEFAULT_CONFIG_PATH = Path("~/.moai/moai.toml")


@dataclass
class Settings:
    # --- where things are -----------------------------------------------------------------------
    master_addr: str = "tcp://127.0.0.1:5670"       # address clients/agents connect to
    master_bind: str = "tcp://127.0.0.1:5670"       # address the master binds
    state_dir: str = "~/.moai"                      # token file, embedded stack's DB and logs
    db_path: str = "~/.moai/master.db"              # the master's SQLite database
    metrics_bind: str = ""                          # host:port of the master's Prometheus /metrics; "": off

    # --- who may talk -----------------------------------------------------------------------------
    token: str = ""                                 # the user's token (else read from token_file)
    token_file: str = "~/.moai/token"
    cluster_secret: str = "moai-dev-secret"         # agents and admin tools present this to the master
    max_devices_per_token: int = 4

    # --- front ------------------------------------------------------------------------------------
    remote_backward: bool = True                    # loss.backward() runs on the workers

    # --- flavors ----------------------------------------------------------------------------------
    gpu_unit_gb: int = 64                           # memory of one flavor unit (one physical GPU)
    default_flavor: str = "Small"                   # size of the device a new token starts with

    # --- back node --------------------------------------------------------------------------------
    node_name: str = field(default_factory=socket.gethostname)
    agent_bind: str = "tcp://127.0.0.1:5671"
    agent_addr: str = "tcp://127.0.0.1:5671"        # how the master reaches this agent
    worker_host: str = "127.0.0.1"                  # how fronts reach this node's workers
    worker_bind_host: str = "127.0.0.1"
    worker_port_base: int = 5700                    # worker for GPU i listens on base + i
    virtual_gpus: int = 4                           # used when the node has no real GPU
    virtual_gpu_memory_mb: int = 2048               # memory cap of each virtual GPU
    worker_threads: int = 1                         # torch intra-op threads per CPU worker
    supervisor_url: str = "http://127.0.0.1:9001/RPC2"
    supervisor_worker_group: str = "workers"

    # --- timing -----------------------------------------------------------------------------------
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 6.0                # a node/job silent this long is declared dead
    worker_start_timeout_s: float = 60.0
    agent_call_timeout_s: float = 10.0              # master -> agent requests (launch/stop worker)

    def path(self, name: str) -> Path:
        """A path-valued setting with ``~`` expanded."""
        return Path(getattr(self, name)).expanduser()

    def user_token(self) -> str:
        if self.token:
            return self.token
        p = self.path("token_file")
        return p.read_text().strip() if p.exists() else ""


def _convert(value: str, typ):
    if typ in (int, "int"):
        return int(value)
    if typ in (float, "float"):
        return float(value)
    if typ in (bool, "bool"):
        return value.lower() in ("1", "true", "yes", "on")
    return value


def load(path: str | os.PathLike | None = None, env: dict | None = None) -> Settings:
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    values: dict = {}
    p = Path(path).expanduser() if path else DEFAULT_CONFIG_PATH.expanduser()
    if path and not p.exists():
        raise FileNotFoundError(f"config file {p} (from {ENV_PREFIX}CONFIG) does not exist")
    if p.exists():
        with open(p, "rb") as f:
            values = tomllib.load(f)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown settings in {p}: {', '.join(sorted(unknown))}")
    for name, f in fields.items():
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _convert(env[key], f.type)
    return Settings(**values)
