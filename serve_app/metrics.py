"""serve_app's own Prometheus metrics, beside Ray Serve's (exported the same way, `ray_` prefix).

Recording a Ray metric costs tens of microseconds, several times per request, on an
event loop that also moves every other request's bytes, while Ray exports metrics
only every few seconds anyway. So requests only add to in-memory sums and lists, and
`flush` hands them to Ray every `FLUSH_INTERVAL_S` (from `flush_forever`): a counter
as one increment per label set, histogram values in one burst, off the request path.
Every metric is labelled with the `model` it concerns; Ray adds the application,
deployment and replica.

- `RequestMetrics` (the ingress): requests, errors, tokens and images by model; a served
  request's whole time and its prompt and completion lengths.
- `ChatEngineMetrics` (each chat replica): how long a request waits for a batch slot,
  its time to first token and its time per output token, measured inside the replica
  (so beside the client's figures they tell the model's share from the serving
  path's), each decode step's time (a newcomers' prefill shows there as the stall of
  every stream in the batch), the choices finished by reason, and gauges of the
  requests decoding and waiting.
- `ReplicaMetrics` (both kinds of replica): failures of the model's work, by kind.
- `ImageMetrics` (each image replica): how long a request waited for its pipeline call,
  how many requests shared each call and how long it took: what `max_batch_size` and
  `batch_wait_timeout_s` tune.

Image replicas record from their worker thread, so recording and flushing share a lock.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Callable

from serve_app.periodic import every

# Seconds. Time to first token and per output token: vLLM's buckets for the same figures (up to 80 s),
# waits on to 320 s: `request_timeout_s` (300) lets a request wait that long, and an overload's quantiles
# must not all fall in +Inf.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 320.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0]
QUEUE_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]
# A request's whole time at the ingress, streams to their last byte: up to `request_timeout_s` (300) and past it.
REQUEST_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0]
# Tokens in one request (vLLM's 1-2-5 steps), up to the longest context a checkpoint has.
TOKEN_COUNT_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
                       200_000, 500_000, 1_000_000]
CALL_REQUESTS_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
CALL_SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0]

Tags = tuple[str, ...]


class BufferedMetrics:
    """Counters summed and histogram values kept in memory until `flush`; gauges read at
    `flush` from `read_gauges()`. Declared as name -> (description, tag keys[, buckets])."""

    FLUSH_INTERVAL_S = 1.0

    def __init__(self, counters: dict[str, tuple[str, Tags]] | None = None,
                 histograms: dict[str, tuple[str, Tags, list[float]]] | None = None,
                 gauges: dict[str, tuple[str, Tags]] | None = None,
                 read_gauges: Callable[[], dict[str, dict[Tags, float]]] | None = None) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.counters = {name: (Counter(f"serve_app_{name}", text, tag_keys=keys), keys)
                         for name, (text, keys) in (counters or {}).items()}
        self.histograms = {name: (Histogram(f"serve_app_{name}", text, boundaries=buckets, tag_keys=keys), keys)
                           for name, (text, keys, buckets) in (histograms or {}).items()}
        self.gauges = {name: (Gauge(f"serve_app_{name}", text, tag_keys=keys), keys)
                       for name, (text, keys) in (gauges or {}).items()}
        self.read_gauges = read_gauges
        self._lock = threading.Lock()
        self.sums: collections.Counter[tuple[str, Tags]] = collections.Counter()
        self.values: collections.defaultdict[tuple[str, Tags], list[float]] = collections.defaultdict(list)

    def count(self, name: str, tags: Tags, value: float = 1) -> None:
        with self._lock:
            self.sums[name, tags] += value

    def observe(self, name: str, tags: Tags, value: float) -> None:
        with self._lock:
            self.values[name, tags].append(value)

    def flush(self) -> None:
        """Hand what was recorded to Ray: one `inc` per counter and tag set, one `observe`
        per histogram value, the gauges' current readings."""
        with self._lock:
            sums, self.sums = self.sums, collections.Counter()
            values, self.values = self.values, collections.defaultdict(list)
        for (name, tag_values), value in sums.items():
            counter, keys = self.counters[name]
            counter.inc(value, tags=dict(zip(keys, tag_values)))
        for (name, tag_values), observed in values.items():
            histogram, keys = self.histograms[name]
            tags = dict(zip(keys, tag_values))
            for value in observed:
                histogram.observe(value, tags=tags)
        if self.read_gauges is not None:
            for name, readings in self.read_gauges().items():
                gauge, keys = self.gauges[name]
                for tag_values, value in readings.items():
                    gauge.set(value, tags=dict(zip(keys, tag_values)))

    async def flush_forever(self) -> None:
        await every(self.FLUSH_INTERVAL_S, self.flush, "recording serve_app metrics")


NOT_READY = ("/ready", 503)
"""The readiness probe's answer while a model is not live: the probe worked, nothing failed
(counted as an error, every probe of a starting or redeploying server would raise error rates)."""


class RequestMetrics(BufferedMetrics):
    """The ingress's counters, and the histograms of a served request: its whole time, as the
    client sees it less the network (a model's own latency, which Serve's per-route figures
    mix across models), and its prompt and completion lengths (what `max_batch_size`, the
    context and a GPU's memory are sized by). `model` is `-` for a name that is not served
    and `route` the matched route's template or `other`, so clients cannot mint label values."""

    def __init__(self) -> None:
        super().__init__(counters={
            "requests": ("Requests by model, route and status.", ("model", "route", "status")),
            "errors": ("Failed requests (status >= 400).", ("model", "route", "status")),
            "tokens": ("Prompt and completion tokens.", ("model", "kind")),
            "images": ("Images generated.", ("model",)),
        }, histograms={
            "request_seconds": ("A successful model request's time in the ingress, to its last byte (a stream's "
                                "too).", ("model", "route"), REQUEST_BUCKETS),
            "request_prompt_tokens": ("Prompt tokens of one successful chat request.", ("model",),
                                      TOKEN_COUNT_BUCKETS),
            "request_completion_tokens": ("Completion tokens of one successful chat request, all its choices.",
                                          ("model",), TOKEN_COUNT_BUCKETS),
        })

    def request(self, model: str | None, route: str, status: int, fields: dict, seconds: float) -> None:
        """One finished request. A stream that failed after its 200, or whose client left, counts as
        an error of the status it would have had (`error_status`, noted by the route or guard)."""
        failed = fields.get("error_status", status)
        self.count("requests", (model or "-", route, str(status)))
        if failed >= 400 and (route, failed) != NOT_READY:
            self.count("errors", (model or "-", route, str(failed)))
        for kind in ("prompt_tokens", "completion_tokens"):
            if fields.get(kind):
                self.count("tokens", (model or "-", kind), fields[kind])
        if fields.get("images"):
            self.count("images", (model or "-",), fields["images"])
        if model and failed < 400:  # a failure's time says little (a 400 is instant, a 504 the timeout)
            self.observe("request_seconds", (model, route), seconds)
            for kind in ("prompt_tokens", "completion_tokens"):
                if kind in fields:
                    self.observe(f"request_{kind}", (model,), fields[kind])


class ReplicaMetrics(BufferedMetrics):
    """A model replica's metrics: its kind's own (a subclass's), and its failures, which the
    ingress can only count as 500s of every cause alike."""

    FAILURE = ("model_failures", "Model work that failed (a batch's prefill or step, a pipeline call, an "
               "image's encoding), by kind: out_of_memory, accelerator (the GPU context failed: the replica "
               "asks to be replaced), other. A client's mistake is not one.", ("model", "kind"))

    def __init__(self, model: str, counters: dict[str, tuple[str, Tags]] | None = None, **kwargs) -> None:
        self.tags: Tags = (model,)
        name, text, keys = self.FAILURE
        super().__init__(counters={name: (text, keys), **(counters or {})}, **kwargs)

    def failed(self, kind: str) -> None:
        self.count("model_failures", (*self.tags, kind))


class ChatEngineMetrics(ReplicaMetrics):
    """One chat replica's latencies, as its decode loop sees them (from the request's
    arrival at the replica, so without the HTTP hop and the ingress), and its load."""

    def __init__(self, model: str, load: Callable[[], tuple[int, int]]) -> None:
        # () -> (requests decoding, requests waiting): the replica's method, held weakly so
        # that the flush task, which holds these metrics, does not keep the replica alive.
        self.load = weakref.WeakMethod(load)  # type: ignore[arg-type]
        keys = ("model",)
        super().__init__(
            model,
            counters={
                "finished_choices": ("Choices finished, by finish_reason (stop, length): how often answers "
                                     "are cut at max_tokens.", ("model", "finish_reason")),
            },
            histograms={
                "decode_step_seconds": (
                    "One step of the replica's batch: a token for every row, newcomers' prefill included.",
                    keys, TPOT_BUCKETS),
                "queue_time_seconds": (
                    "From a request's arrival at the replica to its joining the decode batch.", keys, QUEUE_BUCKETS),
                "time_to_first_token_seconds": (
                    "From a request's arrival at the replica to its first token.", keys, TTFT_BUCKETS),
                "time_per_output_token_seconds": (
                    "A request's mean time between tokens after its first.", keys, TPOT_BUCKETS),
            },
            gauges={
                "running_requests": ("Requests decoding in the replica's batch.", keys),
                "waiting_requests": ("Requests waiting for room in the batch.", keys),
            },
            read_gauges=self._gauges)

    def admitted(self, waited_s: float) -> None:
        self.observe("queue_time_seconds", self.tags, waited_s)

    def first_token(self, after_s: float) -> None:
        self.observe("time_to_first_token_seconds", self.tags, after_s)

    def finished(self, per_token_s: float) -> None:
        self.observe("time_per_output_token_seconds", self.tags, per_token_s)

    def step(self, seconds: float) -> None:
        self.observe("decode_step_seconds", self.tags, seconds)

    def choice_finished(self, finish_reason: str) -> None:
        self.count("finished_choices", (*self.tags, finish_reason))

    def _gauges(self) -> dict[str, dict[Tags, float]]:
        load = self.load()
        if load is None:  # the replica is gone
            return {}
        running, waiting = load()
        return {"running_requests": {self.tags: running}, "waiting_requests": {self.tags: waiting}}


class ImageMetrics(ReplicaMetrics):
    """One image replica's pipeline calls."""

    def __init__(self, model: str) -> None:
        keys = ("model",)
        super().__init__(model, histograms={
            "image_queue_time_seconds": (
                "From a request's arrival at the replica to the worker taking up its batch.", keys,
                QUEUE_BUCKETS),
            "image_batch_requests": ("Requests that shared one pipeline call.", keys, CALL_REQUESTS_BUCKETS),
            "image_batch_seconds": ("How long one pipeline call took (all its images), failed calls too.", keys,
                                    CALL_SECONDS_BUCKETS),
        })

    def queued(self, waited_s: float) -> None:
        self.observe("image_queue_time_seconds", self.tags, waited_s)

    def pipeline_call(self, requests: int, seconds: float) -> None:
        self.observe("image_batch_requests", self.tags, requests)
        self.observe("image_batch_seconds", self.tags, seconds)
