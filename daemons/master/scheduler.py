"""GPU placement and the FIFO queue: pure decisions, no sockets and no database.

The master hands in the free GPUs of each live node and the jobs waiting in arrival order; the
functions answer which GPUs each job gets. Packing a job onto as few nodes as possible keeps its
collectives on the fast intra-node links and leaves whole nodes free for the next large job.
"""
from __future__ import annotations

from dataclasses import dataclass

FreeGpus = dict[str, list[int]]       # node name -> indexes of its free GPUs


@dataclass(frozen=True)
class Slot:
    """One GPU given to one rank of a job."""

    rank: int
    node: str
    gpu: int


def place(free: FreeGpus, count: int) -> list[Slot] | None:
    """The GPUs for a job needing ``count`` of them, or None when too few are free.

    One node if any can hold the whole job (the fullest such node, so that emptier nodes stay
    whole); otherwise the nodes with the most free GPUs first, which needs the fewest nodes.
    Ranks are numbered node by node so that neighbouring ranks share a node.
    """
    if count <= 0:
        raise ValueError(f"a job needs at least one GPU, not {count}")
    if sum(len(g) for g in free.values()) < count:
        return None
    fitting = [n for n, gpus in free.items() if len(gpus) >= count]
    if fitting:
        node = min(fitting, key=lambda n: (len(free[n]), n))
        chosen = [(node, g) for g in sorted(free[node])[:count]]
    else:
        chosen = []
        for node in sorted(free, key=lambda n: (-len(free[n]), n)):
            take = sorted(free[node])[:count - len(chosen)]
            chosen.extend((node, g) for g in take)
            if len(chosen) == count:
                break
    return [Slot(rank, node, gpu) for rank, (node, gpu) in enumerate(chosen)]


def serve_queue(free: FreeGpus, waiting: list[tuple[int, int]]) -> list[tuple[int, list[Slot]]]:
    """Placements for the jobs at the head of the queue, strictly first come first served.

    ``waiting`` is ``[(job_id, gpus_needed)]`` oldest first. Serving stops at the first job that
    does not fit: letting smaller later jobs overtake would starve a large job forever.
    """
    free = {n: list(g) for n, g in free.items()}
    served = []
    for job_id, count in waiting:
        slots = place(free, count)
        if slots is None:
            break
        for s in slots:
            free[s.node].remove(s.gpu)
        served.append((job_id, slots))
    return served


def gpus(count: int) -> str:
    """``"1 GPU"``, ``"4 GPUs"``: for messages users read."""
    return f"{count} GPU" if count == 1 else f"{count} GPUs"


def queue_message(needed: int, free_total: int, cluster_total: int, position: int) -> str:
    return f"waiting for {gpus(needed)} ({free_total} free of {cluster_total}); position {position} in queue"
