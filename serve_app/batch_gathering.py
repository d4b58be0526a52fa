"""How many requests a new image batch waits for: as many as were lately waiting together.

Serve's `@serve.batch` starts a batch once `max_batch_size` requests have gathered, or once
`batch_wait_timeout_s` has passed since the first. A fixed size serves two kinds of traffic
badly:

- A lone caller waits the whole timeout for batch-mates that are not coming.
- A group of callers that come back together (a client with 8 workers, each sending its next
  request when its last is answered) do not reach the replica at once. Their answers leave
  one after another, and the ingress takes their next requests one after another: measured
  here, 8 requests of 128x128 images arrived over about 20 ms. With a short timeout the first
  few start a call of their own, and the rest wait for the next one: calls of about 4 instead
  of 8, a third fewer images/s on the 2-core benchmark machine. With a long timeout a lone
  caller waits longer still.

So the size a batch waits for follows the traffic: the most requests this replica had waiting
at once (arrived and not yet answered: gathering, queued for the worker, or in its call) since
the batch before last was handed over, within `max_batch_size`. Callers in a running call
count: they are the ones coming back. A lone caller's batch starts at once; a group's starts as
soon as the whole group is back; a group that shrinks costs at most two waits, after which the
size follows it down. Requests arriving while the worker is busy share its next call whatever
this says: the worker merges the batches queued meanwhile.

How long a batch waits, within the timeout: until the worker is likely free (the running
call's expected end; waiting meanwhile costs nothing, and callers of that call come back just
after it), then at most half as long as a call takes. Under independent arrivals near the
replica's capacity, every wait for a batch-mate leaves the worker idle, and a wait long against
a call costs more than the bigger batch saves; a group split over two calls, though, needs its
callers in the running call waited for, or the split lasts (calls of 3 and 5 for good, where
the 8 could share one). On a GPU model, whose calls take seconds, the timeout (50 ms by
default) is what bounds the wait.
"""

from __future__ import annotations

import time


WAIT_SHARE_OF_CALL = 0.5


class BatchGathering:
    """Counts the requests waiting at one replica, and the batch size to wait for.

    Used from the replica's event loop only: `arrived` and `answered` around each request
    (`answered` also when its caller left), `handed_over` as a batch leaves Serve's batcher.
    """

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self.wait_limit = wait_s
        self.last_call_s: float | None = None  # these two set by the worker thread: one value each, read whole
        self.call_started_at: float | None = None
        self.waiting = 0
        self.seen_together = 0  # the most `waiting` at once since the last batch was handed over
        self.expected = 1  # no history yet: a first request starts at once

    def arrived(self) -> int:
        """A request has arrived; returns the size the batch it joins waits for."""
        self.waiting += 1
        self.seen_together = max(self.seen_together, self.waiting)
        return min(self.limit, self.expected)

    def handed_over(self) -> None:
        """A batch leaves Serve's batcher for the worker. Its own requests still count as waiting
        (their callers come back once answered): a burst whose requests Serve hands over one by
        one keeps its size, where counting only those left would make it shrink at every batch."""
        self.expected, self.seen_together = max(1, self.seen_together), self.waiting

    def call_started(self) -> None:
        """The worker starts a pipeline call (called on the worker thread)."""
        self.call_started_at = time.monotonic()

    def call_ended(self, seconds: float, complete: bool) -> None:
        """The worker's call ended after `seconds`; `complete`: it made its images (one that failed,
        or stopped because its callers left, says nothing of how long a call takes)."""
        self.call_started_at = None
        if complete:
            self.last_call_s = seconds

    def wait_s(self) -> float:
        """The longest a new batch waits: until the worker is likely free (a running call's
        expected end: waiting meanwhile costs nothing) and then half a call, within the timeout."""
        if self.last_call_s is None:
            return self.wait_limit
        wait = self.last_call_s * WAIT_SHARE_OF_CALL
        started = self.call_started_at
        if started is not None:
            wait += max(0.0, started + self.last_call_s - time.monotonic())
        return min(self.wait_limit, round(wait, 3))

    def answered(self) -> None:
        """A request has its answer, or its caller has gone."""
        self.waiting -= 1
