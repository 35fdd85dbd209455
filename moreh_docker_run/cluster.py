"""Where the master is, as seen from a front container, and whether it answers there.

A compose cluster's master container carries the label ``org.moai.role=master`` (set in
images/master/Dockerfile); a front joins that container's network and addresses the master by
container name. A master on the host's loopback (the embedded cluster) is reached by running the
front in the host's network namespace.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

import docker
from docker.models.containers import Container

MASTER_ROLE_LABEL = "org.moai.role=master"
DEFAULT_MASTER_PORT = 5670
PROBE_TOKEN_REJECTED = 2  # exit status of moreh_docker_run.probe
PROBE_WAIT_S = 60          # the probe itself gives up after 5 s; the rest is container start-up


class LaunchError(Exception):
    """A reason the program cannot be started; the message tells the user what to do."""


@dataclass(frozen=True)
class Placement:
    master_addr: str            # tcp://host:port as the container resolves it
    network: str | None         # a docker network to join, or None
    network_mode: str | None    # "host" when the master listens on the host's loopback


def host_and_port(addr: str) -> tuple[str, int]:
    parts = urlsplit(addr)
    if parts.scheme != "tcp" or not parts.hostname:
        raise LaunchError(f"master address {addr!r} is not of the form tcp://HOST:PORT")
    return parts.hostname, parts.port or DEFAULT_MASTER_PORT


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _master_port(container: Container) -> int:
    for item in container.attrs["Config"].get("Env") or []:
        if item.startswith("MOAI_MASTER_BIND="):
            return host_and_port(item.split("=", 1)[1])[1]
    return DEFAULT_MASTER_PORT


def find_compose_master(client: docker.DockerClient, network: str | None) -> Placement:
    """The running master container (on ``network`` if given) and the network to reach it by."""
    masters = client.containers.list(filters={"label": MASTER_ROLE_LABEL, "status": "running"})
    if network:
        masters = [c for c in masters if network in c.attrs["NetworkSettings"]["Networks"]]
    if not masters:
        where = f" on network {network}" if network else ""
        raise LaunchError(
            f"no running master container{where} and no master address given: start the cluster "
            "(docker compose -f compose/docker-compose.yml up -d), or pass --master-addr / set "
            "MOAI_MASTER_ADDR")
    if len(masters) > 1:
        names = ", ".join(c.name for c in masters)
        raise LaunchError(f"several master containers are running ({names}): choose one with --network")
    master = masters[0]
    net = network or next(iter(master.attrs["NetworkSettings"]["Networks"]))
    return Placement(f"tcp://{master.name}:{_master_port(master)}", net, None)


def place(client: docker.DockerClient, master_addr: str | None, network: str | None) -> Placement:
    if not master_addr:
        return find_compose_master(client, network)
    host, _ = host_and_port(master_addr)
    if is_loopback(host) and not network:
        return Placement(master_addr, None, "host")
    return Placement(master_addr, network, None)


def check_master_reachable(client: docker.DockerClient, image: str, placement: Placement, token: str):
    """Say ``hello`` to the master from a throwaway container placed like the front will be.

    Probing from the host would be wrong: names like ``master`` resolve only inside the docker
    network, and on some engines the host cannot route to container addresses at all.
    """
    try:
        probe = client.containers.create(
            image, ["python", "-m", "moreh_docker_run.probe", placement.master_addr],
            environment={"MOAI_PROBE_TOKEN": token}, network=placement.network,
            network_mode=placement.network_mode)
    except docker.errors.NotFound as e:
        raise LaunchError(f"docker network {placement.network!r} not found: {e.explanation}") from None
    try:
        probe.start()
        status = probe.wait(timeout=PROBE_WAIT_S)["StatusCode"]
        reason = probe.logs(stdout=False, stderr=True).decode(errors="replace").strip()
    finally:
        probe.remove(force=True, v=True)  # v: a training image may declare volumes
    if status == PROBE_TOKEN_REJECTED:
        raise LaunchError(f"{reason} (ask the administrator for a valid token)")
    if status != 0:
        where = f" from docker network {placement.network}" if placement.network else ""
        raise LaunchError(f"the master at {placement.master_addr} cannot be reached{where}: "
                          f"{reason or f'probe exit status {status}'}. Is the cluster up (docker compose ps)?")
