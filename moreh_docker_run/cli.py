"""moreh-docker-run [options] [--] COMMAND...: run COMMAND in a front container on the cluster.

The current directory is mounted as the container's working directory; the token and the
master's address go in as MOAI_TOKEN / MOAI_MASTER_ADDR. The program runs as the calling user, so
the files it writes there are the user's. Output streams live; stdin is not attached; the exit
status is the program's. The container is removed at the end, on Ctrl-C and on SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import docker
from docker.models.containers import Container

from daemons import config
from moreh_docker_run.cluster import LaunchError, check_master_reachable, place

DEFAULT_IMAGE = "moai/base:latest"
WORKDIR = "/workspace"
# docker run's own convention: 125 means the container could not be run at all.
EXIT_LAUNCH_FAILED = 125
EXIT_INTERRUPTED = 130
STOP_TIMEOUT_S = 5


def parse_args(argv):
    p = argparse.ArgumentParser(prog="moreh-docker-run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=os.environ.get("MOAI_FRONT_IMAGE", DEFAULT_IMAGE),
                   help=f"the platform's base image or one built FROM it (default {DEFAULT_IMAGE})")
    p.add_argument("--master-addr", default=os.environ.get("MOAI_MASTER_ADDR"),
                   help="tcp://HOST:PORT of the master as the container sees it (default: "
                        "$MOAI_MASTER_ADDR, else the running compose cluster's master)")
    p.add_argument("--network", help="docker network to join (default: the compose master's)")
    p.add_argument("--token", help="the user's token (default: $MOAI_TOKEN or the token file)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the program (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="program to run, e.g. python train.py")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        # Without stdin an interactive default (python, bash) would exit at once and look like success.
        p.error("a command is required, e.g. moreh-docker-run python train.py")
    return args


def connect_engine() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as e:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise LaunchError(f"the Docker engine at {where} is not running or not reachable ({e}). "
                          "Start it (systemctl start docker, or dockerd &) and try again.") from None


def check_image(client: docker.DockerClient, image: str):
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise LaunchError(f"image {image} not found: build the platform images with `make images` "
                          "(a training image must be built FROM moai/base)") from None


def program_environment(args) -> dict:
    token = args.token or config.load().user_token()
    if not token:
        raise LaunchError("no token: set MOAI_TOKEN or pass --token "
                          "(an administrator creates one with `moai-admin token create USER`)")
    env = {"MOAI_TOKEN": token}
    if os.getuid() != 0:
        env["HOME"] = "/tmp"  # the calling user has no home directory in the image
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise LaunchError(f"-e {item!r} is not of the form KEY=VALUE")
        env[key] = value
    return env


def stream_output(container: Container):
    """Copy the container's stdout/stderr to ours as it comes, keeping the two streams apart."""
    for out, err in container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True):
        if out:
            sys.stdout.buffer.write(out)
            sys.stdout.buffer.flush()
        if err:
            sys.stderr.buffer.write(err)
            sys.stderr.buffer.flush()


def run(args) -> int:
    client = connect_engine()
    check_image(client, args.image)
    env = program_environment(args)
    placement = place(client, args.master_addr, args.network)
    check_master_reachable(client, args.image, placement, env["MOAI_TOKEN"])
    env["MOAI_MASTER_ADDR"] = placement.master_addr
    container = client.containers.create(
        args.image, args.command, environment=env, working_dir=WORKDIR,
        volumes={os.getcwd(): {"bind": WORKDIR, "mode": "rw"}},
        network=placement.network, network_mode=placement.network_mode,
        user=f"{os.getuid()}:{os.getgid()}", labels={"org.moai.role": "front"})
    try:
        container.start()
        stream_output(container)
        return container.wait()["StatusCode"]
    except KeyboardInterrupt:
        print("\nmoreh-docker-run: interrupted, stopping the container", file=sys.stderr)
        container.stop(timeout=STOP_TIMEOUT_S)
        return EXIT_INTERRUPTED
    finally:
        container.remove(force=True, v=True)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM (e.g. a CI timeout) cleans up like Ctrl-C instead of leaving the container behind.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        return run(args)
    except LaunchError as e:
        print(f"moreh-docker-run: {e}", file=sys.stderr)
        return EXIT_LAUNCH_FAILED
    except docker.errors.APIError as e:  # e.g. the command does not exist in the image
        print(f"moreh-docker-run: the engine refused: {e.explanation or e}", file=sys.stderr)
        return EXIT_LAUNCH_FAILED


if __name__ == "__main__":
    sys.exit(main())
