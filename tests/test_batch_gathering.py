"""The size an image batch waits for (`BatchGathering`), on made-up traffic: no Ray, no model.
The live replica's use of it is tested in test_image_batching (a real server, real calls)."""

from __future__ import annotations

from types import SimpleNamespace

from serve_app.batch_gathering import BatchGathering


def repeat(step, count: int) -> list:
    return [step() for _ in range(count)]


def round_of(gathering: BatchGathering, size: int) -> list[int]:
    """`size` callers arrive together, are handed over as one batch and answered; the sizes
    their batch was told to wait for."""
    told = repeat(gathering.arrived, size)
    gathering.handed_over()
    repeat(gathering.answered, size)
    return told


def test_a_lone_caller_never_waits_for_batch_mates():
    gathering = BatchGathering(limit=8, wait_s=0.05)
    assert [round_of(gathering, 1) for _ in range(3)] == [[1], [1], [1]]


def test_a_group_that_comes_back_is_waited_for_whole_within_the_limit():
    gathering = BatchGathering(limit=8, wait_s=0.05)
    assert round_of(gathering, 4) == [1] * 4  # no history yet: the first start at once
    assert round_of(gathering, 4) == [4] * 4
    assert round_of(gathering, 4) == [4] * 4
    big = BatchGathering(limit=8, wait_s=0.05)
    round_of(big, 16)
    assert round_of(big, 16) == [8] * 16


def test_a_burst_handed_over_one_by_one_keeps_its_size():
    """Serve hands a burst's requests over one batch at a time (each told to wait for 1): the
    burst's size is still what its callers coming back are waited for."""
    gathering = BatchGathering(limit=8, wait_s=0.05)
    repeat(gathering.arrived, 5)
    repeat(gathering.handed_over, 5)
    repeat(gathering.answered, 5)
    assert round_of(gathering, 5) == [5] * 5


def test_a_caller_coming_back_during_its_mates_call_waits_for_them():
    """Seven are in a pipeline call when the eighth comes back: all eight are waited for next."""
    gathering = BatchGathering(limit=8, wait_s=0.05)
    round_of(gathering, 8)
    repeat(gathering.arrived, 7)
    gathering.handed_over()  # the seven's call
    assert gathering.arrived() == 8  # the eighth, back from an earlier call
    gathering.handed_over()  # it waited its timeout: alone
    repeat(gathering.answered, 8)
    assert round_of(gathering, 8) == [8] * 8


def test_a_group_that_shrinks_is_followed_down_after_at_most_two_batches():
    gathering = BatchGathering(limit=8, wait_s=0.05)
    round_of(gathering, 6)
    round_of(gathering, 6)
    assert [round_of(gathering, 1)[0] for _ in range(4)] == [6, 6, 1, 1]


def test_callers_that_leave_before_their_batch_stop_counting():
    gathering = BatchGathering(limit=8, wait_s=0.05)
    round_of(gathering, 1)
    repeat(gathering.arrived, 3)
    repeat(gathering.answered, 3)  # their clients hung up before any batch left
    assert gathering.waiting == 0
    assert round_of(gathering, 1) == [1]
    assert round_of(gathering, 1) == [3]  # they were seen together: one wait for them
    assert round_of(gathering, 1) == [1]


def test_a_batch_waits_until_the_worker_is_free_and_then_half_a_call_within_the_timeout(monkeypatch):
    """Waiting while the worker is busy costs nothing (and lets callers of the running call, who
    come back as it ends, join their mates); once it is free, a wait of more than half a call
    would cost more than the bigger batch saves. A call that failed or stopped says nothing of
    how long one takes."""
    from serve_app import batch_gathering

    clock = [100.0]
    monkeypatch.setattr(batch_gathering, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    gathering = BatchGathering(limit=8, wait_s=0.05)
    assert gathering.wait_s() == 0.05  # no call yet
    gathering.call_started()
    clock[0] += 0.03
    gathering.call_ended(0.03, complete=True)
    assert gathering.wait_s() == 0.015  # idle: half the last call
    gathering.call_started()
    clock[0] += 0.01
    assert gathering.wait_s() == 0.035  # 20 ms more of the call expected, then half a call
    clock[0] += 0.05
    assert gathering.wait_s() == 0.015  # running past its expected end: half a call
    gathering.call_ended(0.001, complete=False)  # it failed (or its callers left)
    assert gathering.wait_s() == 0.015
    gathering.call_started()
    gathering.call_ended(4.0, complete=True)  # a GPU model's call: the timeout bounds the wait
    assert gathering.wait_s() == 0.05
