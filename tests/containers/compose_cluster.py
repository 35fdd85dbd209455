"""The compose cluster (compose/docker-compose.yml) for tests: up under a project name of its own,
wait until every back node has registered, look at the master through the real protocol, down.

Each test cluster gets a fresh project name and cluster secret, so it never meets a cluster a
developer runs on the same engine; ``leftovers()`` lists whatever of it outlived ``down()``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import docker
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "compose" / "docker-compose.yml"
IMAGE_PREFIX = os.environ.get("IMAGE_PREFIX", "moai")
PROJECT_LABEL = "com.docker.compose.project"
BACK_NODES = ("backnode1", "backnode2")
UP_TIMEOUT_S = 180.0       # `up` waits for the master's health check before starting back nodes
DOWN_TIMEOUT_S = 120.0
REGISTER_TIMEOUT_S = 120.0
POLL_S = 1.0
RESTART_TIMEOUT_S = 60.0
# Asks the master from inside its own container: its port is not published on the host, and the
# in-container settings (MOAI_MASTER_ADDR, MOAI_CLUSTER_SECRET) are the ones the cluster runs with.
# Without a user token the request goes with the cluster secret (the operator's requests).
MASTER_CALL = """
import json, sys
from daemons import config, wire
s = config.load()
c = wire.Client(s.master_addr, token=sys.argv[2] or s.cluster_secret, timeout_s=5.0)
try:
    print(json.dumps(c.call(sys.argv[1]), default=str))
finally:
    c.close()
"""


def unavailable(reason: str):
    """No engine or no compose here: a skip on a developer's machine, a failure in CI."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the container tests must run)", pytrace=False)
    pytest.skip(reason)


def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as e:
        unavailable(f"no Docker engine: {e}")


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) where installed, else the standalone `docker-compose`."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                  timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    unavailable("neither `docker compose` nor `docker-compose` is installed")


class ComposeCluster:
    def __init__(self, client: docker.DockerClient):
        self.client = client
        self.project = f"moai-test-{secrets.token_hex(4)}"
        self.network = f"{self.project}_moai"
        self.env = {**os.environ, "MOAI_CLUSTER_SECRET": secrets.token_hex(16), "IMAGE_PREFIX": IMAGE_PREFIX}
        self._compose = [*compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE)]

    def compose(self, *args: str, timeout_s: float) -> str:
        done = subprocess.run([*self._compose, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}")
        return done.stdout

    def up(self):
        self.compose("up", "-d", timeout_s=UP_TIMEOUT_S)

    def down(self):
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout_s=DOWN_TIMEOUT_S)

    def container(self, service: str):
        found = self.client.containers.list(filters={"label": [f"{PROJECT_LABEL}={self.project}",
                                                               f"com.docker.compose.service={service}"]})
        assert found, f"no running {service} container in project {self.project}"
        return found[0]

    def restart(self, service: str):
        self.compose("restart", "--timeout", "10", service, timeout_s=RESTART_TIMEOUT_S)

    def ask_master(self, op: str, token: str = "") -> dict:
        code, out = self.container("master").exec_run(["python", "-c", MASTER_CALL, op, token], demux=True)
        stdout, stderr = (part.decode(errors="replace") if part else "" for part in out)
        assert code == 0, f"{op} at the master failed ({code}): {stderr}"
        return json.loads(stdout)

    def wait_registered(self, nodes=BACK_NODES, timeout_s: float = REGISTER_TIMEOUT_S) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        seen: list[dict] = []
        while time.monotonic() < deadline:
            try:
                seen = self.ask_master("list_nodes")["nodes"]
            except (AssertionError, docker.errors.APIError):
                seen = []  # the master is still starting
            if {n["node"] for n in seen if n["alive"]} >= set(nodes):
                return seen
            time.sleep(POLL_S)
        raise AssertionError(f"back nodes {nodes} not all registered within {timeout_s:.0f} s; "
                             f"the master knows {seen}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.logs(tail=30).decode(errors='replace')}"
                         for c in self.client.containers.list(
                             all=True, filters={"label": f"{PROJECT_LABEL}={self.project}"}))

    def leftovers(self) -> list[str]:
        label = {"label": f"{PROJECT_LABEL}={self.project}"}
        return ([f"container {c.name}" for c in self.client.containers.list(all=True, filters=label)]
                + [f"network {n.name}" for n in self.client.networks.list(filters=label)]
                + [f"volume {v.name}" for v in self.client.volumes.list(filters=label)])
