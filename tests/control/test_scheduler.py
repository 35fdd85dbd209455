"""The placement and queue decisions, as pure functions (no sockets, no database)."""
import pytest

from daemons.master.scheduler import Slot, place, queue_message, serve_queue


def nodes_of(slots):
    return {s.node for s in slots}


def test_job_fits_on_one_node_goes_to_the_fullest_node_that_fits():
    free = {"a": [0, 1, 2, 3, 4, 5, 6, 7], "b": [2, 3], "c": [0, 1, 2]}
    slots = place(free, 2)
    assert slots == [Slot(0, "b", 2), Slot(1, "b", 3)]


def test_job_larger_than_any_node_spans_the_fewest_nodes():
    free = {"a": [0, 1], "b": [0, 1, 2, 3, 4, 5], "c": [0, 1, 2, 3]}
    slots = place(free, 9)
    assert nodes_of(slots) == {"b", "c"}
    assert [s.rank for s in slots] == list(range(9))
    # ranks are grouped node by node so neighbours share a node
    assert [s.node for s in slots] == ["b"] * 6 + ["c"] * 3


def test_placement_never_reuses_a_gpu_and_returns_none_when_short():
    free = {"a": [1, 3], "b": [0]}
    assert place(free, 4) is None
    slots = place(free, 3)
    assert sorted((s.node, s.gpu) for s in slots) == [("a", 1), ("a", 3), ("b", 0)]


def test_place_refuses_nonpositive_requests():
    with pytest.raises(ValueError):
        place({"a": [0]}, 0)


def test_queue_is_first_come_first_served_without_overtaking():
    free = {"a": [0, 1, 2]}
    # job 1 needs 4 (does not fit): job 2, though small, must wait behind it
    assert serve_queue(free, [(1, 4), (2, 1)]) == []
    served = serve_queue(free, [(1, 2), (2, 1), (3, 1)])
    assert [job for job, _ in served] == [1, 2]
    used = [(s.node, s.gpu) for _, slots in served for s in slots]
    assert len(used) == len(set(used)) == 3
    assert free == {"a": [0, 1, 2]}, "serve_queue must not modify its input"


def test_queue_message_names_need_free_total_and_position():
    assert queue_message(4, 2, 8, 1) == "waiting for 4 GPUs (2 free of 8); position 1 in queue"
    assert queue_message(1, 0, 2, 3) == "waiting for 1 GPU (0 free of 2); position 3 in queue"
