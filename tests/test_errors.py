"""Errors keep their fields across Ray (they are pickled between replicas), a server fault's
500 names a reference an operator can find in the log (the request id), and an error after a
stream started is sent in-band."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import time
from types import SimpleNamespace

import grpc
import pytest
from fastapi import FastAPI
from ray.exceptions import ActorDiedError, NodeDiedError, WorkerCrashedError
from ray.serve._private.common import DeploymentID
from ray.serve.context import _RequestContext, _serve_request_context
from ray.serve.exceptions import DeploymentUnavailableError

from serve_app.errors import (
    AuthenticationFailed,
    ClientClosedRequest,
    GatewayTimeout,
    InvalidRequest,
    ModelFailed,
    Overloaded,
    ServerError,
    model_not_found,
)
from serve_app.http_errors import as_api_error, install_error_handlers
from serve_app.jobs import ChatStreamChunk, ChoiceDelta
from serve_app.protocol import ChatCompletionRequest, error_body
from serve_app.streaming import ChatChunkEncoder, chat_events


def test_an_error_crosses_pickling_whole_and_prints_its_message() -> None:
    error = Overloaded("busy", param="model", code="model_starting", headers={"Retry-After": "10"})
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is Overloaded and str(copy) == "busy"
    assert (copy.message, copy.param, copy.code, copy.headers) == ("busy", "model", "model_starting",
                                                                    {"Retry-After": "10"})
    assert str(InvalidRequest("bad n", param="n")) == "bad n"  # not the tuple of every argument


def test_error_types_and_retry_hints_are_openais() -> None:
    """OpenAI answers every 4xx as `invalid_request_error` (an unknown model, a wrong key;
    `code` says which) and every 5xx as `server_error`. Its clients retry any 5xx unless
    `x-should-retry: false`: a failed model and a request that timed out are not retried."""
    types = {type(e).__name__: (error_body(e).error.type, error_body(e).error.code)
             for e in (model_not_found("x"), AuthenticationFailed("no"), InvalidRequest("n"),
                       Overloaded("busy"), ModelFailed("gone"), GatewayTimeout("slow"))}
    assert types == {"NotFound": ("invalid_request_error", "model_not_found"),
                     "AuthenticationFailed": ("invalid_request_error", "invalid_api_key"),
                     "InvalidRequest": ("invalid_request_error", "invalid_value"),
                     "Overloaded": ("server_error", "overloaded"),
                     "ModelFailed": ("server_error", "model_failed"),
                     "GatewayTimeout": ("server_error", "timeout")}
    assert ModelFailed("gone").headers == GatewayTimeout("slow").headers == {"x-should-retry": "false"}
    assert "x-should-retry" not in Overloaded("busy", headers={"Retry-After": "1"}).headers  # worth retrying
    assert pickle.loads(pickle.dumps(ModelFailed("gone"))).headers == {"x-should-retry": "false"}


def test_what_ray_raises_for_a_failed_or_lost_model_is_told_apart() -> None:
    """Serve raises DeploymentUnavailableError only for a deployment that failed for good: no
    retry can help, whatever the ingress's catalog knows yet. A replica, worker or node lost
    while it had the request (gRPC errors between replicas included) is worth a retry."""
    failed = as_api_error(DeploymentUnavailableError(DeploymentID(name="model_x", app_name="default")))
    assert (failed.status_code, failed.code, failed.headers) == (503, "model_failed", {"x-should-retry": "false"})
    def rpc(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "details")

    for lost in (ActorDiedError(), WorkerCrashedError(), NodeDiedError("n1"), rpc(grpc.StatusCode.CANCELLED)):
        error = as_api_error(lost)
        assert (error.status_code, error.code, error.headers) == (503, "model_unavailable", {"Retry-After": "5"}), lost
    # gRPC's other codes are faults: a logged 500, never an endless "retry in 5 s".
    assert as_api_error(rpc(grpc.StatusCode.INTERNAL)).code == "internal_error"


def test_an_error_a_replica_raised_is_answered_as_its_cause(serve_caplog) -> None:
    """A model replica's exception reaches the ingress wrapped in Ray's RayTaskError (plain, or
    as an instance of the cause's class): the client gets the cause's own status and fields."""
    from ray.exceptions import RayTaskError

    from serve_app.errors import NotANumber

    def raised_by_replica(cause: BaseException, instance_of_cause: bool) -> RayTaskError:
        wrapped = RayTaskError("generate", "Traceback (most recent call last):\n  ...", cause)
        return wrapped.as_instanceof_cause() if instance_of_cause else wrapped

    for instance_of_cause in (False, True):
        bad = InvalidRequest("logit_bias names a token id this model does not have", param="logit_bias")
        assert as_api_error(raised_by_replica(bad, instance_of_cause)) is bad
        nan = as_api_error(raised_by_replica(NotANumber("float16 overflowed; set dtype"), instance_of_cause))
        assert (nan.status_code, nan.code, nan.message) == (500, "model_output_not_a_number",
                                                            "float16 overflowed; set dtype")
        serve_caplog.clear()
        oom = as_api_error(raised_by_replica(RuntimeError("OutOfMemoryError: CUDA out of memory"), instance_of_cause))
        assert (oom.status_code, oom.code) == (500, "internal_error") and "CUDA" not in oom.message  # no internals
        assert "OutOfMemoryError: CUDA out of memory" in serve_caplog.text  # but the operator's log has them
        lost = as_api_error(raised_by_replica(ActorDiedError(), instance_of_cause))
        assert (lost.status_code, lost.code) == (503, "model_unavailable")


def test_a_models_own_timeout_error_is_its_failure_not_the_request_timeout(serve_caplog) -> None:
    """A replica's TimeoutError reaches the ingress as one (Ray's error is an instance of its
    cause): only the ingress's own deadline is a 504; the model's is its failure, logged."""
    from serve_app.ingress import Ingress

    async def catalog_running(name: str) -> bool:
        return True

    ingress = SimpleNamespace(config=SimpleNamespace(limits=SimpleNamespace(request_timeout_s=0.2)),
                              catalog=SimpleNamespace(unavailable=lambda name: None, known_running=lambda name: True,
                                                      is_running=catalog_running))
    target = SimpleNamespace(config=SimpleNamespace(name="m"))
    within = Ingress.func_or_class._within_timeout

    async def times_out_inside() -> None:
        raise TimeoutError("the replica's own call timed out")

    with pytest.raises(ServerError):
        asyncio.run(within(ingress, target, times_out_inside(), lambda: None))
    assert "the replica's own call timed out" in serve_caplog.text
    cancelled = []
    with pytest.raises(GatewayTimeout):
        asyncio.run(within(ingress, target, asyncio.sleep(5), lambda: cancelled.append(True)))
    assert cancelled == [True]


def test_registration_status_answers_in_time_in_the_envelope(monkeypatch) -> None:
    """A registrar that is restarting or failed: /v1/registration answers a 504 or the
    mapped error in the envelope, never a hung connection or Serve's plain-text 503."""
    from serve_app import ingress as ingress_module

    registration = ingress_module.Ingress.func_or_class.registration
    monkeypatch.setitem(registration.__globals__, "STATUS_WAIT_S", 0.1)  # serve.ingress copied the module's

    def registrar(answer) -> SimpleNamespace:
        return SimpleNamespace(registrar=SimpleNamespace(status=SimpleNamespace(remote=answer)))

    with pytest.raises(GatewayTimeout):
        asyncio.run(registration(registrar(lambda: asyncio.sleep(5))))

    async def failed() -> None:
        raise DeploymentUnavailableError(DeploymentID(name="registrar", app_name="default"))

    with pytest.raises(ModelFailed):
        asyncio.run(registration(registrar(failed)))

    async def times_out_inside() -> None:  # the registrar's own, not this route's deadline
        raise TimeoutError("a node did not answer")

    with pytest.raises(ServerError):
        asyncio.run(registration(registrar(times_out_inside)))


def test_a_chat_client_hanging_up_while_its_body_arrives_is_a_499() -> None:
    """FastAPI answers a body it could not read with a 400 ("There was an error parsing the
    body"), a client that left included: that one is a 499 in the log and the metrics, as on
    the image routes, not a client's invalid JSON."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        return {}

    sent: list[dict] = []

    async def hang_up() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 1088), "client": ("127.0.0.1", 5000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]}
    asyncio.run(app(scope, hang_up, send))
    assert sent[0]["status"] == 499
    assert json.loads(sent[1]["body"])["error"]["code"] == "client_disconnected"


def test_a_server_fault_is_a_generic_500_whose_reference_is_the_request_id(serve_caplog: pytest.LogCaptureFixture) -> None:
    token = _serve_request_context.set(_RequestContext(request_id="req-1234"))
    try:
        with serve_caplog.at_level(logging.ERROR, logger="ray.serve"):
            error = as_api_error(KeyError("internal detail"))
    finally:
        _serve_request_context.reset(token)
    assert isinstance(error, ServerError) and error.status_code == 500
    assert error.message == "Internal server error (reference req-1234)." and "internal detail" not in error.message
    [record] = [r for r in serve_caplog.records if "req-1234" in r.getMessage()]
    assert record.exc_info and isinstance(record.exc_info[1], KeyError)  # the traceback is in the log


def test_an_error_after_the_stream_started_is_one_error_event_then_done() -> None:
    """The 200 and the first tokens are already sent: the failure goes in-band, in the error
    envelope, the stream still ends with [DONE], and the model is told to stop."""
    class FailingStream:
        cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self) -> ChatStreamChunk:
            raise Overloaded("The model is restarting or unavailable; retry shortly.", code="model_unavailable")

        def cancel(self) -> None:
            self.cancelled = True

    async def events() -> list[str]:
        request = ChatCompletionRequest.model_validate(
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        first = ChatStreamChunk(deltas=[ChoiceDelta(0, "Hel")], prompt_tokens=3, completion_tokens=1)
        return [event async for event in chat_events(ChatChunkEncoder(request), first, rest)]

    rest = FailingStream()
    sent = asyncio.run(events())
    assert len(sent) == 3 and sent[-1] == "data: [DONE]\n\n"
    assert json.loads(sent[0].removeprefix("data: "))["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    error = json.loads(sent[1].removeprefix("data: "))
    assert error["code"] == 503 and error["error"]["code"] == "model_unavailable" and error["message"]
    assert rest.cancelled


def test_a_stream_whose_model_goes_silent_ends_with_a_timeout_event() -> None:
    """A model that stops sending without failing (a hung GPU) must not hold the connection
    open for ever: past the silence limit the stream ends with a 504 event, [DONE], and the
    model is told to stop; chunks that keep coming within the limit go through."""
    class StallingStream:
        cancelled, sent = False, 0

        def __aiter__(self):
            return self

        async def __anext__(self) -> ChatStreamChunk:
            if self.sent == 3:
                await asyncio.Event().wait()  # hangs
            self.sent += 1
            await asyncio.sleep(0.05)
            return ChatStreamChunk(deltas=[ChoiceDelta(0, "x")], prompt_tokens=3, completion_tokens=self.sent)

        def cancel(self) -> None:
            self.cancelled = True

    async def events() -> list[str]:
        request = ChatCompletionRequest.model_validate(
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        return [event async for event in chat_events(ChatChunkEncoder(request), None, rest, silence_s=0.3)]

    rest = StallingStream()
    sent = asyncio.run(events())
    assert len(sent) == 5 and sent[-1] == "data: [DONE]\n\n", sent
    error = json.loads(sent[3].removeprefix("data: "))
    assert error["code"] == 504 and error["error"]["code"] == "timeout" and "0.3 s" in error["message"]
    assert rest.cancelled

    class TimingOutStream(StallingStream):  # a timeout of the model's own is not the silence limit
        async def __anext__(self) -> ChatStreamChunk:
            raise TimeoutError("the model's own")

    rest = TimingOutStream()
    error = json.loads(asyncio.run(events())[0].removeprefix("data: "))
    assert error["code"] == 500 and "sent nothing" not in error["message"]


def test_a_body_that_stops_arriving_is_a_408_and_a_whole_one_is_waited_on_as_before() -> None:
    """A client that sends its headers and part of its body, then nothing, is answered 408
    after `limits.body_timeout_s` of silence (it held an ingress slot meanwhile), and so is one
    that trickles in under `limits.body_min_bytes_per_s` without ever pausing that long; once the
    body is whole, receive() waits for the client's hang-up with no limit, as Starlette's
    disconnect watch needs. The body limit holds as before."""
    from starlette.exceptions import HTTPException

    from serve_app.request_guards import _guarded_body

    def client(*bodies: tuple[bytes, bool]):
        parts = [{"type": "http.request", "body": body, "more_body": more} for body, more in bodies]

        async def receive() -> dict:
            if parts:
                return parts.pop(0)
            await asyncio.sleep(3600)  # a client that sends no more and does not hang up
            return {"type": "http.disconnect"}
        return receive

    async def stalled() -> tuple[bytes, HTTPException, float]:
        receive = _guarded_body(client((b'{"model":', True)), 1000, 0.2)
        first = (await receive())["body"]
        started = time.monotonic()
        with pytest.raises(HTTPException) as caught:
            await receive()
        return first, caught.value, time.monotonic() - started

    first, exc, waited = asyncio.run(stalled())
    assert first == b'{"model":' and 0.2 <= waited < 2
    error = as_api_error(exc)
    assert (error.status_code, error.code, error.message) == (
        408, "request_timeout", "The request body stopped arriving: nothing came for 0.2 s.")

    async def whole() -> None:
        receive = _guarded_body(client((b"{", True), (b"}", False)), 1000, 0.2)
        assert [(await receive())["body"] for _ in range(2)] == [b"{", b"}"]
        with pytest.raises(TimeoutError):  # ours: the guard raised no 408 in 0.6 s
            await asyncio.wait_for(receive(), 0.6)

    asyncio.run(whole())

    async def too_large() -> None:
        receive = _guarded_body(client((b"x" * 600, True), (b"x" * 600, False)), 1000, 0.2)
        await receive()
        with pytest.raises(HTTPException) as caught:
            await receive()
        assert caught.value.status_code == 413

    asyncio.run(too_large())

    async def trickled(chunk: bytes, every_s: float) -> tuple[HTTPException | None, float]:
        """A body sent `chunk` by `chunk`, never pausing for `pause_s` (0.2 s), against a floor of
        1,000 bytes/s after that first 0.2 s."""
        async def receive() -> dict:
            await asyncio.sleep(every_s)
            return {"type": "http.request", "body": chunk, "more_body": True}
        guarded, started = _guarded_body(receive, 10_000, 0.2, 1000), time.monotonic()
        try:
            while time.monotonic() - started < 1.5:
                await guarded()
        except HTTPException as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    exc, waited = asyncio.run(trickled(b"x", 0.05))  # 20 bytes/s: each pause well under 0.2 s
    assert exc is not None and 0.2 <= waited < 0.6, waited  # due at 0.2 s + 20 bytes/s * t / 1,000 bytes/s
    error = as_api_error(exc)
    assert (error.status_code, error.code, error.message) == (
        408, "request_timeout", "The request body arrived too slowly: slower than 1000 bytes/s on average.")
    assert asyncio.run(trickled(b"x" * 100, 0.05))[0] is None  # 2,000 bytes/s: never cut

    async def read_late() -> list[bytes]:
        """A body the client sent at once, read by a server too busy to read it for a while:
        the server's delay is no slowness of the client's."""
        sent = client((b"x" * 100, True), (b"x" * 100, True), (b"}", False))

        async def relayed() -> dict:  # as Serve's relay hands each message over: after a yield
            await asyncio.sleep(0)
            return await sent()
        receive = _guarded_body(relayed, 10_000, 0.2, 1000)
        first = (await receive())["body"]
        await asyncio.sleep(0.5)  # past 0.2 s + 100 bytes / 1,000 bytes/s
        return [first, (await receive())["body"], (await receive())["body"]]

    assert asyncio.run(read_late()) == [b"x" * 100, b"x" * 100, b"}"]

    async def silent() -> HTTPException:
        """Headers, then nothing: that says so, with the floor on too."""
        with pytest.raises(HTTPException) as caught:
            await _guarded_body(client(), 10_000, 0.2, 1000)()
        return caught.value

    assert as_api_error(asyncio.run(silent())).message == "The request body stopped arriving: nothing came for 0.2 s."

    async def relay_killed() -> list[dict]:
        """Serve's Python proxy relays the client's messages; killed by a shutdown, its client is gone."""
        async def receive() -> dict:
            raise ActorDiedError()
        guarded = _guarded_body(receive, 1000, 0.2)
        return [await guarded(), await _guarded_body(receive, None, None)()]

    assert asyncio.run(relay_killed()) == [{"type": "http.disconnect"}] * 2


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=b0undary"])
def test_a_client_hanging_up_during_its_upload_is_a_499_not_a_server_fault(content_type: str) -> None:
    """An edit whose client goes away while its body arrives is a 499 in the log and the
    metrics, as a request Serve cancels because its client left, not a 500 with a traceback."""
    from starlette.requests import Request

    from serve_app.ingress import _json_body, _read_form

    async def hang_up() -> dict:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": [
        (b"content-type", content_type.encode()), (b"content-length", b"1000")]}
    read = _json_body(Request(scope, hang_up)) if content_type == "application/json" \
        else _read_form(Request(scope, hang_up), 1000)
    with pytest.raises(ClientClosedRequest) as caught:
        asyncio.run(read)
    assert caught.value.status_code == 499 and caught.value.code == "client_disconnected"


def test_the_access_log_and_metrics_tell_a_client_leaving_and_a_failed_stream_from_success(serve_caplog) -> None:
    """Serve cancels a request whose client hung up: logged and counted as 499, not a 500 (a
    false alarm) and not lost. A stream that failed after its 200 counts as the error it was,
    with its code in the line. A client's X-Request-Id cannot add fields to the line."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from serve_app.metrics import RequestMetrics
    from serve_app.request_guards import RequestGuard, RequestRecord

    started = asyncio.Event()

    async def hang(request):
        started.set()
        await asyncio.sleep(3600)

    async def failing(request):
        async def events():
            raise GatewayTimeout("The model sent nothing for 300 s; the stream was ended.")
            yield  # an async generator, whose first item after the peeked one fails
        first = ChatStreamChunk([ChoiceDelta(index=0, text="hi")], 3, 1)
        encoder = ChatChunkEncoder(ChatCompletionRequest.model_validate(
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}))
        return StreamingResponse(chat_events(encoder, first, events()), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", hang, methods=["POST"]),
                            Route("/v1/stream", failing, methods=["POST"])])
    app.add_middleware(RequestGuard)
    app.add_middleware(RequestRecord)
    app.state.metrics, app.state.access_log = RequestMetrics(), True

    async def call(path: str, cancel: bool) -> list[dict]:
        sent: list[dict] = []
        body = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict:
            if body:
                return body.pop()
            await asyncio.sleep(3600)  # the client stays connected
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
                 "headers": [(b"x-request-id", b"abc status=200 model=evil")]}
        task = asyncio.create_task(app(scope, receive, send))
        if cancel:
            await started.wait()
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return sent

    serve_caplog.set_level(logging.INFO, logger="ray.serve")
    assert asyncio.run(call("/v1/chat/completions", cancel=True)) == []
    streamed = asyncio.run(call("/v1/stream", cancel=False))
    assert streamed[0]["status"] == 200 and b'"code":504' in b"".join(m.get("body", b"") for m in streamed)
    sums = app.state.metrics.sums
    assert sums["requests", ("-", "/v1/chat/completions", "499")] == 1
    assert sums["errors", ("-", "/v1/chat/completions", "499")] == 1
    assert sums["requests", ("-", "/v1/stream", "200")] == 1 and sums["errors", ("-", "/v1/stream", "504")] == 1
    lines = [r.getMessage() for r in serve_caplog.records if r.getMessage().startswith("access ")]
    assert "status=499" in lines[0] and "error=request_cancelled" in lines[0]
    assert "error_status" not in lines[0]  # the status says it already (error_status is for a stream after its 200)
    assert "status=200" in lines[1] and "error=timeout error_status=504" in lines[1]
    assert all(line.startswith("access request_id=abc%20status%3D200%20model%3Devil method=") for line in lines)


def test_a_readiness_probe_saying_not_ready_is_no_error() -> None:
    """`/ready`'s 503 is the probe working (a model is not live yet, or restarting): counted as
    a request, not as an error, or every probe of a redeploy would raise the error rate."""
    from serve_app.metrics import RequestMetrics

    metrics = RequestMetrics()
    metrics.request(None, "/ready", 503, {}, 0.001)
    metrics.request("m", "/v1/chat/completions", 503, {}, 0.001)
    metrics.request(None, "/ready", 401, {}, 0.001)  # behind the API keys without one: an error
    assert metrics.sums["requests", ("-", "/ready", "503")] == 1
    assert ("errors", ("-", "/ready", "503")) not in metrics.sums
    assert metrics.sums["errors", ("m", "/v1/chat/completions", "503")] == 1
    assert metrics.sums["errors", ("-", "/ready", "401")] == 1


@pytest.mark.parametrize("path,label", [
    ("/v1/chat/completions", "/v1/chat/completions"), ("/v1/models/org/llama", "/v1/models/{model}"),
    ("/v1/files/images/a.png", "/v1/files/images/{name}"), ("/v1/junk-123", "other")])
def test_a_request_answered_before_routing_is_counted_under_its_routes_template(path, label) -> None:
    """A 401 or a 413 by Content-Length is answered before the router runs: its metrics label is
    the template its path fits (as a routed request's), never the raw path."""
    from serve_app.ingress import api
    from serve_app.request_guards import _route_label

    scope = {"type": "http", "method": "POST", "path": "/prefix" + path, "root_path": "/prefix", "app": api,
             "headers": [], "query_string": b""}
    assert _route_label(scope) == label


@pytest.mark.parametrize("field,value", [("temperature", "NaN"), ("top_p", "Infinity"), ("presence_penalty", "-Infinity"),
                                         ("logit_bias", '{"5": NaN}')])
def test_nan_and_infinity_are_said_to_be_no_numbers(field: str, value: str) -> None:
    """Python's JSON parser (FastAPI's) reads NaN and Infinity; the 400 says what is wrong with
    them, not that NaN is above a bound."""
    from pydantic import ValidationError

    body = json.loads('{"model": "m", "messages": [{"role": "user", "content": "x"}], "%s": %s}' % (field, value))
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(body)
    error = as_api_error(raised.value)
    assert error.status_code == 400 and "finite number" in error.message and error.param.startswith(field), error


@pytest.mark.parametrize("stream", [False, None, "absent"])
def test_stream_options_without_a_stream_are_refused_as_openai_refuses_them(stream) -> None:
    """OpenAI and vLLM answer `stream_options` on a request that does not stream with a 400."""
    from pydantic import ValidationError

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}
    if stream != "absent":
        body["stream"] = stream
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(body)
    error = as_api_error(raised.value)
    assert error.status_code == 400 and error.param == "stream_options" and "stream is true" in error.message, error
    body.update(stream=True)
    assert ChatCompletionRequest.model_validate(body).stream_options.include_usage
    body.update(stream=False, stream_options=None)
    assert ChatCompletionRequest.model_validate(body).stream_options is None
    body.update(stream="maybe", stream_options={"include_usage": True})  # one error: stream's own
    with pytest.raises(ValidationError) as raised:
        ChatCompletionRequest.model_validate(body)
    assert [error["loc"] for error in raised.value.errors()] == [("stream",)]
