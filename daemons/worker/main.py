"""The worker daemon: one per GPU, bound to one job, serving that job's op stream until told to stop.

Started on demand by its agent through supervisor (``workers:worker-<gpu>``), it reads its launch
spec (``--spec PATH``, default ``<state_dir>/workers/gpu-<gpu>.json``), serves the data-plane
requests of docs/PROTOCOL.md and exits on ``shutdown`` or SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import os

from daemons import config, wire
from daemons.worker.spec import WorkerSpec

log = logging.getLogger("moai.worker")


def build_server(spec: WorkerSpec) -> wire.Server:
    # Imported here: the executor pulls in torch, which the agent (which imports this package) avoids.
    if spec.world_size > 1:
        from daemons.worker.spmd import SpmdExecutor as Executor
    else:
        from daemons.worker.executor import Executor

    executor = Executor(spec)
    server: wire.Server

    def authorized(handler):
        def check(msg: wire.Message):
            if msg.token != spec.job_secret:
                raise wire.RequestError("unauthorized", "this worker belongs to another job")
            return handler(msg)
        return check

    def hello(msg):
        return {"job_id": spec.job_id, "rank": spec.rank, "world_size": spec.world_size,
                "device": executor.device_name, "memory_cap": spec.memory_cap}

    def shutdown(msg):
        server.stop()
        return {}

    handlers = {"hello": hello, "shutdown": shutdown, **executor.handlers()}
    server = wire.Server(spec.bind, {k: authorized(v) for k, v in handlers.items()},
                         name=f"worker-{spec.gpu}", max_message_bytes=wire.DATA_MAX_MESSAGE_BYTES)
    server.executor = executor
    return server


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", type=int, default=int(os.environ.get("MOAI_WORKER_GPU", "0")))
    parser.add_argument("--spec", help="launch spec written by the agent")
    args = parser.parse_args(argv)
    settings = config.load()
    wire.setup_logging(f"worker-{args.gpu}")
    spec_path = args.spec or settings.path("state_dir") / "workers" / f"gpu-{args.gpu}.json"
    spec = WorkerSpec.load(spec_path)
    server = build_server(spec)
    server.install_signal_handlers()
    log.info("worker for job %s rank %d/%d serving %s on %s", spec.job_id, spec.rank,
             spec.world_size, server.address, server.executor.device_name)
    try:
        server.serve_forever()
    finally:
        server.executor.close()
        log.info("worker for job %s stopped", spec.job_id)
    # The job's state is gone and the sockets are closed; interpreter teardown would still
    # finalize torch.distributed's gloo objects, which can block forever after a peer has left.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
