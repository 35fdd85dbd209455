"""Calls from the master to node agents: launch a job's workers, stop them.

Each call uses its own short-lived ``wire.Client`` on a pool thread: the launches of one job run
in parallel, and the master's loop never waits on an agent (it polls the futures in its tick).
The clients share a zmq context of the link's own, so that closing the link ends calls still in
flight at once: a launch may wait a minute for its worker, longer than supervisord waits for the
master to stop.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import zmq

from daemons import wire

log = logging.getLogger(__name__)

MAX_PARALLEL_CALLS = 16


class LaunchError(Exception):
    """A worker could not be started; the message names the node and GPU."""


class AgentLink:
    def __init__(self, cluster_secret: str, call_timeout_s: float, launch_timeout_s: float):
        self.cluster_secret = cluster_secret
        self.call_timeout_s = call_timeout_s
        self.launch_timeout_s = launch_timeout_s  # an agent may answer only once its worker is up
        self.pool = ThreadPoolExecutor(MAX_PARALLEL_CALLS, thread_name_prefix="agent-call")
        self.ctx = zmq.Context()
        self.closed = False

    def _call(self, agent_addr: str, msg_type: str, body: dict, timeout_s: float):
        try:
            client = wire.Client(agent_addr, self.cluster_secret, timeout_s=timeout_s, context=self.ctx)
        except zmq.ZMQError as e:  # the link closed before this call began
            raise wire.WireError(f"the master is stopping ({e})") from None
        try:
            return client.call(msg_type, body)
        except zmq.ContextTerminated:
            raise wire.WireError("the master is stopping") from None
        finally:
            client.close()

    def start_launch(self, launches: list[tuple[str, str, dict]]) -> list[Future]:
        """Send ``launch_worker`` for every ``(node, agent_addr, body)`` in parallel."""
        return [self.pool.submit(self._call, addr, "launch_worker", body, self.launch_timeout_s) for _, addr, body in launches]

    @staticmethod
    def collect(launches: list[tuple[str, str, dict]], futures: list[Future]) -> list[str]:
        """The worker addresses of finished launches, in order; LaunchError if any failed."""
        addresses, errors = [], []
        for (node, _, body), fut in zip(launches, futures):
            try:
                addresses.append(str(fut.result()["address"]))
            except (wire.WireError, KeyError, TypeError) as e:
                errors.append(f"worker for {node}:{body['gpu']} did not start ({e})")
        if errors:
            raise LaunchError("; ".join(errors))
        return addresses

    def stop(self, node: str, agent_addr: str, job_id: int, gpu: int):
        """Ask an agent to stop one worker, without waiting: the GPU is already free in the books,
        and a lost node cannot answer anyway."""
        def stop_one():
            try:
                self._call(agent_addr, "stop_worker", {"job_id": job_id, "gpu": gpu}, self.call_timeout_s)
            except wire.WireError as e:
                if not self.closed:  # else the next master stops the stray when its agent reports it
                    log.warning("stop_worker job %s on %s:%s failed: %s", job_id, node, gpu, e)
        self.pool.submit(stop_one)

    def close(self):
        """Drop the calls not yet begun and end those in flight; returns once every pool thread
        is idle, so nothing is logged after the master says it stopped."""
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.ctx.term()  # blocking calls fail with ETERM, and term waits for their sockets to close
        self.pool.shutdown(wait=True)
