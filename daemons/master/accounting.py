"""GPU usage metering: a job is billed GPUs x seconds from the moment its GPUs were reserved to
the moment they were freed. Queued time is free."""
from __future__ import annotations

from daemons.master.store import Store


def record_job_end(store: Store, job: dict, ended: float) -> float:
    """Write the usage record of a job that just ended (inside the caller's transaction)."""
    started = job["started"]
    held_s = max(0.0, ended - started) if started is not None else 0.0
    gpus = job["gpus"] if started is not None else 0
    gpu_seconds = gpus * held_s
    store.add_usage(job["id"], job["token"], job["device_id"], gpus, gpu_seconds,
                    started if started is not None else ended, ended)
    return gpu_seconds


def token_usage(store: Store, token: str) -> dict:
    records = [{"job_id": r["job_id"], "device_id": r["device_id"], "gpus": r["gpus"],
                "gpu_seconds": r["gpu_seconds"], "started": r["started"], "ended": r["ended"]}
               for r in store.usage(token)]
    return {"records": records, "total_gpu_seconds": sum(r["gpu_seconds"] for r in records)}


def usage_by_token(store: Store) -> list[dict]:
    return [{"user": r["user"], "token": r["token"], "jobs": r["jobs"], "gpu_seconds": r["gpu_seconds"]}
            for r in store.usage_by_token()]
