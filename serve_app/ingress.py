"""The HTTP ingress: FastAPI routes under `@serve.ingress`, thin by design.

Each route parses its body (pydantic), resolves `model` through the
`ModelRouter`, hands a job to the model's deployment handle and encodes the
answer. Errors of any kind leave through `http_errors`. Nothing here imports
torch: the ingress can run on a CPU-only node with a fraction of a core.
"""


import asyncio
import base64
import contextlib
import json
import urllib.parse
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from serve_app.access_log import note, note_named_model
from serve_app.catalog import STATUS_WAIT_S, LiveCatalog, LiveModel, ModelRouter, Target, served_routes
from serve_app.config import AppConfig
from serve_app.deadline import DeadlinePassed, within
from serve_app import routes
from serve_app.errors import (
    BODY_NEVER_ARRIVED,
    APIError,
    ClientClosedRequest,
    GatewayTimeout,
    InvalidRequest,
    NotFound,
    Overloaded,
    json_not_parsed,
    json_too_deep,
    model_not_found,
)
from serve_app.http_errors import JSON, as_api_error, error_schema, install_error_handlers, json_response
from serve_app.image_check import InputImage
from serve_app.image_input import ImageFetcher
from serve_app.image_files import StoredImageResponse
from serve_app.image_store import ImageStore
from serve_app.jobs import ImageJob, ImageResult
from serve_app.metrics import RequestMetrics
from serve_app.protocol import (
    MAX_JSON_VALUES,
    ONE_IMAGE,
    TOO_MANY_FILES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Health,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelDetail,
    ModelList,
    Readiness,
)
from serve_app.registration import RegistrationStatus, unregister_stale
from serve_app.request_guards import ApiKeys, ConfiguredCors, RequestGuard, RequestRecord
from serve_app.serve_logs import flush_serve_log, start_flushing, summarize_rejections
from serve_app.streaming import ChatChunkEncoder, chat_events
from serve_app.translate import AnswerFormat, chat_job, chat_response, check_image_request, image_job

api = FastAPI(
    title="serve_app",
    description="AI Model Interface Standard and OpenAI-compatible inference server on Ray Serve.",
    version="0.1.0",
    # FastAPI's own OpenTelemetry hooks cost a provider lookup per request even when nothing is
    # configured; Ray Serve traces the request path itself (RAY_SERVE_TRACING_* settings).
    telemetry={"tracing": False, "metrics": False, "logs": False},
)
api.add_middleware(RequestGuard)
api.add_middleware(ConfiguredCors)
api.add_middleware(RequestRecord)  # added last: outermost
install_error_handlers(api)

T = TypeVar("T")
Parsed = TypeVar("Parsed", bound=BaseModel)
PROMPT_LOG_CHARS = 500
UNAVAILABLE_POLL_S = 1.0
"""How often a request waiting for its model checks whether the model failed to start or a
redeploy removed it (`unless_unavailable`)."""


def reached_a_replica(response: Any) -> bool:
    """Whether Serve's router has handed a model call to a replica, which finishes it even while
    a redeploy removes its deployment (within `graceful_shutdown_timeout_s`). Serve has no public
    way to ask: its response's replica future (a private attribute, pinned by a test) is done
    once it has."""
    future = getattr(response, "_replica_result_future", None)
    return future is not None and future.done() and not future.cancelled()


async def unless_unavailable(catalog: LiveCatalog, name: str, answer: Awaitable[T],
                             reached: Callable[[], bool] = lambda: False) -> T:
    """`answer`, awaited until the catalog learns that no request to the model can be answered
    (`LiveCatalog.unavailable`): it failed to start, or a redeploy removed it while this replica,
    of the config before, still takes requests. Then that error instead of a wait for a replica
    that never comes, until `request_timeout_s`; except that a call which `reached` a replica of
    a removed model is left to finish there. Checked every `UNAVAILABLE_POLL_S` by one timer,
    which cancels the wait (the model call with it) to end it: no task per request."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    cancels_before = task.cancelling()
    gone: list[APIError] = []

    def check() -> None:
        nonlocal timer
        unavailable = catalog.unavailable(name)
        if unavailable is None or (catalog.was_removed(name) and reached()):
            timer = loop.call_later(UNAVAILABLE_POLL_S, check)
        else:
            gone.append(unavailable)
            task.cancel()

    timer = loop.call_later(UNAVAILABLE_POLL_S, check)
    try:
        return await answer
    except BaseException:  # the model call may turn the cancellation into an error of its own
        if gone and task.uncancel() <= cancels_before:  # this cancel alone: not a client that left meanwhile
            raise gone[0] from None
        raise
    finally:
        timer.cancel()


ERRORS = error_schema()
HEALTHY = Health()


def _edit_body_schema() -> dict[str, Any]:
    """The edit route's OpenAPI body: JSON as `ImageEditRequest`, or a multipart form with the
    same fields whose `image` and `mask` are uploaded files (the route parses it itself)."""
    schema = ImageEditRequest.model_json_schema()
    form = {**schema, "required": [*schema.get("required", []), "image"], "properties": {
        **schema["properties"],
        "image": {"type": "string", "format": "binary", "description": "The image to edit."},
        "mask": {"type": "string", "format": "binary", "description": ImageEditRequest.model_fields["mask"].description}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}}}


EDIT_BODY = _edit_body_schema()
_EDIT_FORM = EDIT_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]
GENERATION_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ImageGenerationRequest.model_json_schema()},
    "multipart/form-data": {"schema": {**_EDIT_FORM, "required": [
        name for name in _EDIT_FORM["required"] if name != "image"]}}}}}
"""A generation as JSON or as a form; a form with an image is an edit (and run as that edit)."""


# Defined before the class: `@serve.ingress` snapshots the module's globals when it runs.
async def _read_form(request: Request, max_field_bytes: int) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """Split a multipart form into plain fields (the first of each name) and uploaded files
    (every one, by name: OpenAI's client sends a list of images as several `image[]` parts).
    A file field left empty (a browser form sends one when no file was chosen) is no upload.
    A text field may be as large as the body may (Starlette's default is 1 MiB): it may
    carry the image as a data: URL."""
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    # `async with` closes the uploads' spooled temporary files at once.
    with _client_gone():
        async with request.form(max_part_size=max_field_bytes) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read()
                    if key in FORM_TEXT_FIELDS:  # a long prompt from a file (curl -F prompt=@prompt.txt)
                        fields.setdefault(key, _text_of_file(key, data))
                    elif data or value.filename:
                        files.setdefault(key, []).append(data)
                else:
                    fields.setdefault(key, value)
    return fields, files


FORM_TEXT_FIELDS = frozenset((ImageEditRequest.model_fields.keys() | ImageGenerationRequest.model_fields.keys())
                             - {"image", "images", "mask"})
"""The image requests' fields that are text, whichever way a form part carries them."""


def _text_of_file(name: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name}: the file sent for this text field is not UTF-8 text.", param=name) from None
    return text.removesuffix("\n").removesuffix("\r")  # the line break that ends a text file


@contextlib.contextmanager
def _client_gone() -> Iterator[None]:
    """A client that hangs up while its body is read (an aborted upload) is logged and counted
    as a 499, as when Serve cancels a request whose client left: not a server fault, traceback
    and all."""
    try:
        yield
    except ClientDisconnect:
        raise ClientClosedRequest(BODY_NEVER_ARRIVED) from None


def _one_upload(files: dict[str, list[bytes]], *names: str) -> bytes | None:
    """The one file uploaded under any of `names` (taken out of `files`); more is a 400,
    never a silent choice of one."""
    uploads = [data for name in names for data in files.pop(name, [])]
    if len(uploads) > 1:
        one = "one mask per request" if names[0] == "mask" else ONE_IMAGE
        raise InvalidRequest(f"{names[0]}: {len(uploads)} files came; {one}.", param=names[0], code=TOO_MANY_FILES)
    return uploads[0] if uploads else None


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")  # any case, as HTTP allows


IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF", b"BM")


def _file_sent_as_text(value: Any) -> bytes | None:
    """An image's bytes sent as a form part without a filename (RFC 7578 only says a client
    SHOULD name the file), which Starlette reads as a text field: back to its bytes (Starlette
    decodes a part as UTF-8, else as Latin-1, which keeps every byte). Else None: a URL."""
    if not isinstance(value, str) or not value[:8].encode("latin-1", "replace").startswith(IMAGE_SIGNATURES):
        return None  # a URL (a data: URL may be megabytes: only its start is encoded)
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _names_an_image(body: Any) -> bool:
    """Whether a body sent to the generations route gives an image (as an edit does)."""
    return isinstance(body, dict) and bool(body.get("image") or body.get("images"))


async def _json_body(request: Request) -> Any:
    """An image route's JSON body, parsed here (an edit's may be 25 MiB). A body of more values than
    any request needs is refused before it is parsed: parsing holds the event loop (and the GIL,
    so a thread would not help) for about a second per 24 MiB of `[0,0,...]`, stalling every
    stream of this replica; its commas and brackets, counted in C, bound its values."""
    with _client_gone():
        raw = await request.body()
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > MAX_JSON_VALUES:
        raise InvalidRequest(f"the request holds more than {MAX_JSON_VALUES} JSON values")
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:  # JSONDecodeError, undecodable bytes, an integer past Python's digits
        if request.headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded"):
            raise InvalidRequest("The request body is a URL-encoded form (curl -d): send JSON with Content-Type: "
                                 "application/json, or a multipart form (curl -F).", code="invalid_body") from None
        raise json_not_parsed(exc) from None
    except RecursionError:
        raise json_too_deep() from None


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Routes requests to model deployments by their `model` field."""

    def __init__(self, config: AppConfig, handles: dict[str, DeploymentHandle],
                 registrar: DeploymentHandle | None = None) -> None:
        self.config = config
        self.registrar = registrar
        api.state.max_body_bytes = config.max_body_bytes
        api.state.max_text_body_bytes = min(config.max_text_body_bytes, config.max_body_bytes)
        api.state.body_timeout_s = config.limits.body_timeout_s
        api.state.body_min_bytes_per_s = config.limits.body_min_bytes_per_s
        api.state.api_keys = ApiKeys(config)
        api.state.cors = config.cors
        api.state.access_log = config.access_log
        api.state.model_names = frozenset(model.name for model in config.models)
        api.state.metrics = self.metrics = RequestMetrics()
        self.router = ModelRouter(config, handles)
        self.catalog = LiveCatalog(config, serve.get_replica_context().app_name)
        self.store = ImageStore(config.image_dir, config.public_base_url, config.image_retention)
        self.fetcher = ImageFetcher(config.image_input)
        # Retention: a sweep now, then every sweep_interval_s, off the event loop; never fatal.
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self.store.sweep_forever(), name="image retention")
        self._metrics_flusher = loop.create_task(self.metrics.flush_forever(), name="metrics flush")
        self._log_flusher = start_flushing()
        summarize_rejections()
        if registrar is None:  # registration off now: withdraw what an earlier config of this app announced
            self._registration_cleanup = loop.create_task(unregister_stale(
                serve.get_replica_context().app_name, set(), config.registration.timeout_s), name="registration cleanup")

    async def __del__(self) -> None:
        """Serve awaits this on graceful shutdown: stop the background tasks, record the last
        counts and log lines, close the fetch client."""
        for name in ("_sweeper", "_metrics_flusher", "_log_flusher"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
        if getattr(self, "metrics", None) is not None:
            self.metrics.flush()
        flush_serve_log()
        if getattr(self, "fetcher", None) is not None:
            await self.fetcher.aclose()

    @api.post(routes.CHAT, response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        target = self._target(body, routes.CHAT, body.messages[-1].text)
        note(stream=body.stream, n=body.n)
        job = chat_job(body, target.config, self.config.limits)
        answer_format = AnswerFormat.of(body, target.config)
        if not body.stream:
            call = target.generate.remote(job)
            result = await self._within_timeout(target, call, call.cancel, reached=lambda: reached_a_replica(call))
            note(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
            if body.logprobs:  # up to n x max_tokens x 21 objects (seconds at 8 x 4096): off the event loop
                return Response(await asyncio.to_thread(lambda: chat_response(body, result, answer_format).model_dump_json()),
                                media_type=JSON)
            return json_response(chat_response(body, result, answer_format))
        chunks = target.stream.remote(job)
        # Peek at the first chunk: an early error still gets its HTTP status.
        first = await self._within_timeout(target, anext(chunks, None), chunks.cancel,
                                           reached=lambda: reached_a_replica(chunks))
        return StreamingResponse(chat_events(ChatChunkEncoder(body, answer_format), first, chunks,
                                             silence_s=self.config.limits.request_timeout_s),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.post(routes.GENERATIONS, response_model=ImagesResponse, responses=ERRORS,
              openapi_extra=GENERATION_BODY)
    async def image_generations(self, request: Request) -> Response:
        """A generation; an edit sent here (a multipart form with an image, or JSON with an
        `image`) is run as an edit, not answered with a picture that ignores its image: the
        network's node looks an image model up by its name alone and forwards edits to its
        generations URL too. A form without an image is the generation its fields ask for."""
        if _is_form(request):
            fields, files = await _read_form(request, self.config.max_body_bytes)
            if files or _names_an_image(fields):
                return await self._edit(*await self._form_edit(fields, files))
            raw: Any = fields  # a form without an image (curl -F): the generation it asks for
        else:
            raw = await _json_body(request)
            if _names_an_image(raw):
                return await self._edit(*await self._read_json_edit(raw))
        body = self._parsed(ImageGenerationRequest, raw)
        target = self._target(body, routes.GENERATIONS, lambda: body.prompt)
        return await self._images(target, body, image_job(body, target.config, self.config.limits))

    @api.post(routes.EDITS, response_model=ImagesResponse, responses=ERRORS, openapi_extra=EDIT_BODY)
    async def image_edits(self, request: Request) -> Response:
        if _is_form(request):
            return await self._edit(*await self._form_edit(*await _read_form(request, self.config.max_body_bytes)))
        return await self._edit(*await self._read_json_edit(await _json_body(request)))

    @api.get("/health", response_model=Health)
    @api.head("/health", include_in_schema=False)  # HEAD: the probe of many uptime checkers
    async def health(self) -> Response:
        """Liveness: the ingress answers."""
        return json_response(HEALTHY)

    @api.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
    @api.head("/ready", include_in_schema=False)
    async def ready(self) -> Response:
        """Readiness: every configured model has a live replica (or is scaled to zero on purpose)."""
        live = {model.config.name for model in await self.catalog.live_models()}
        missing = [model.name for model in self.config.models if model.name not in live]
        return json_response(Readiness(ready=not missing, missing=missing), status_code=503 if missing else 200)

    @api.get(routes.MODELS, response_model=ModelList)
    @api.head(routes.MODELS, include_in_schema=False)  # a gateway's or monitor's check that the API is up
    async def list_models(self) -> Response:
        cards = [self._card(live) for live in await self.catalog.live_models()]
        return json_response(ModelList(project=self.config.project, data=cards))

    @api.get(routes.MODELS + "/{model:path}", response_model=ModelDetail, responses={404: ERRORS[404]})
    async def retrieve_model(self, model: str) -> Response:
        """One live model (OpenAI's `models.retrieve`); names may hold slashes, as hub ids do.
        Trailing slashes never reach here (`request_guards`): `/v1/models/` is the list."""
        for live in await self.catalog.live_models():
            if live.config.name == model:
                return json_response(ModelDetail(**self._card(live).model_dump()))
        raise model_not_found(model)

    @api.get("/v1/registration", response_model=RegistrationStatus, responses={status: ERRORS[status] for status in (500, 503, 504)})
    async def registration(self) -> Response:
        """Registration with the network node(s): per node state, last error, models registered."""
        if self.registrar is None:
            return json_response(RegistrationStatus(
                enabled=False, project=self.config.registration.project or self.config.project))
        try:  # a registrar restarting or failed: an answer in time, in the error envelope
            status = await within(STATUS_WAIT_S, self.registrar.status.remote())
        except DeadlinePassed:
            raise GatewayTimeout("The registrar did not answer in time.") from None
        except Exception as exc:  # noqa: BLE001 - Serve would answer its own exceptions in plain text
            raise as_api_error(exc) from exc
        return json_response(status)

    @api.get(routes.FILES + "/{name}", response_class=FileResponse, responses={404: ERRORS[404], 416: ERRORS[416]})
    @api.head(routes.FILES + "/{name}", response_class=FileResponse, include_in_schema=False)
    async def image_file(self, name: str) -> FileResponse:
        # An open and a stat, off the event loop: on a shared file system (NFS, EFS) one can stall
        # every stream here.
        image = await asyncio.to_thread(self.store.open, name)
        return StoredImageResponse(image, media_type=self.store.media_type(name))

    def _parsed(self, kind: type[Parsed], raw: Any) -> Parsed:
        """`raw` validated as `kind`, its model noted first (a refused body is still logged
        and counted under the model it names, as FastAPI's refusals of chat bodies are)."""
        note_named_model(raw, api.state.model_names)
        return kind.model_validate(raw)

    def _target(self, body: ChatCompletionRequest | ImageGenerationRequest, route: str,
                prompt: Callable[[], str]) -> Target:
        """The deployment serving the body's `model` on `route` (404 for an unknown model, 400 for
        one of another kind or that does not serve the route; an omitted one filled in, so the
        answer names it), noted for the
        access log; with `log_prompts`, the line quotes the prompt (a chat's last message),
        JSON-escaped so it stays one line, cut at `PROMPT_LOG_CHARS`."""
        try:
            target = self.router.resolve(body.model, route)
        except NotFound:
            if body.model and self.catalog.being_added(body.model):  # clients retry a 503, not a 404
                raise Overloaded(f"The model {body.model!r} is being added by a redeploy; retry shortly.",
                                 code="model_starting", headers={"Retry-After": "10"}) from None
            raise
        body.model = target.config.name
        note(model=body.model)
        if self.config.log_prompts:
            text = prompt()
            note(prompt=json.dumps(text[:PROMPT_LOG_CHARS] + ("..." if len(text) > PROMPT_LOG_CHARS else "")))
        return target

    def _card(self, live: LiveModel) -> ModelCard:
        return ModelCard(id=live.config.name, model=live.config.name, created=live.created,
                         owned_by=live.config.owned_by, url=self.catalog.url_for(live.config),
                         kind=live.config.kind, endpoints=served_routes(live.config),
                         scaled_to_zero=live.scaled_to_zero)

    async def _within_timeout(self, target: Target, answer: Awaitable[T], cancel: Callable[[], None],
                              reached: Callable[[], bool] = lambda: False) -> T:
        """Await a model's answer for at most `limits.request_timeout_s`; never hang.

        Every failure leaves as an `APIError`: Ray Serve installs its own FastAPI
        handlers for its back-pressure and unavailability exceptions, which would
        answer in plain text without the envelope.
        """
        unavailable = self.catalog.unavailable(target.config.name)
        if unavailable is not None:
            cancel()
            raise unavailable
        try:
            answered = await within(self.config.limits.request_timeout_s,
                                    unless_unavailable(self.catalog, target.config.name, answer, reached))
        except APIError:
            cancel()
            raise
        except asyncio.CancelledError:  # the client left: Serve 2.60 cancels the model call too, this makes sure
            cancel()
            raise
        except DeadlinePassed:
            cancel()
            if not await self.catalog.is_running(target.config.name):
                raise Overloaded(f"The model {target.config.name!r} is starting; retry shortly.",
                                 code="model_starting", headers={"Retry-After": "10"}) from None
            raise GatewayTimeout(f"The model {target.config.name!r} did not answer in time.") from None
        except Exception as exc:  # noqa: BLE001 - Serve would answer its own exceptions in plain text
            raise as_api_error(exc) from exc
        if isinstance(answered, APIError):  # a model's answer to a client mistake (see ChatModel.generate)
            raise answered
        return answered

    async def _images(self, target: Target, body: ImageGenerationRequest, job: ImageJob) -> Response:
        call = target.generate.remote(job)
        result = await self._within_timeout(target, call, call.cancel, reached=lambda: reached_a_replica(call))
        note(images=len(result.images))
        # Megabytes of base64 and JSON, or file writes: off the event loop, which serves every stream.
        return Response(await asyncio.to_thread(self._images_body, body, job, result), media_type=JSON)

    def _images_body(self, body: ImageGenerationRequest, job: ImageJob, result: ImageResult) -> str:
        """The response's JSON: each image in base64, or saved to the store and given by URL. Blocking."""
        if body.response_format == "b64_json":
            data = [ImageData(b64_json=base64.b64encode(image).decode()) for image in result.images]
        else:
            data = [ImageData(url=self.store.url(self.store.save(image, job.output_format)))
                    for image in result.images]
        return ImagesResponse(model=body.model, data=data, output_format=job.output_format,
                              size=f"{job.width}x{job.height}").model_dump_json()

    async def _edit(self, target: Target, body: ImageEditRequest, image: InputImage,
                    mask: InputImage | None) -> Response:
        job = image_job(body, target.config, self.config.limits, source=image, mask=mask)
        return await self._images(target, body, job)

    async def _form_edit(self, fields: dict[str, Any], files: dict[str, list[bytes]],
                         ) -> tuple[Target, ImageEditRequest, InputImage, InputImage | None]:
        """An edit as a multipart form (uploaded files): its model resolved before any image is
        fetched, its images checked before any model work."""
        for name in ("image", "mask"):
            sent = _file_sent_as_text(fields.get(name))
            if sent is not None:
                del fields[name]
                files.setdefault(name, []).append(sent)
        body, target = self._checked_edit(fields)
        upload = _one_upload(files, "image", "image[]")
        mask_upload = _one_upload(files, "mask")
        if upload is None and len(files) == 1:  # a node may name the field e.g. `face_image`
            upload = _one_upload(files, *files)
        if upload is None and not body.image:
            raise InvalidRequest("image is required: upload it as a file field named 'image'.", param="image")
        # A form may also give an image (or mask) as a URL in a text field.
        image = (await asyncio.to_thread(self.fetcher.check_upload, upload, param="image") if upload is not None
                 else await self._load_image(body.image, param="image"))  # type: ignore[arg-type]
        mask = None
        if mask_upload is not None:
            mask = await asyncio.to_thread(self.fetcher.check_upload, mask_upload, param="mask")
        elif body.mask:
            mask = await self._load_image(body.mask, param="mask")
        return target, body, image, mask

    async def _read_json_edit(self, raw: Any) -> tuple[Target, ImageEditRequest, InputImage, InputImage | None]:
        """An edit as JSON (image URLs), parsed by the json module first, as FastAPI parses the
        other routes: pydantic's own parser calls a lone surrogate invalid JSON, where the
        field's check names the field."""
        body, target = self._checked_edit(raw)
        if not body.image:
            raise InvalidRequest("image is required: an http(s) URL or a data: URL.", param="image")
        image = await self._load_image(body.image, param="image")
        mask = await self._load_image(body.mask, param="mask") if body.mask else None
        return target, body, image, mask

    def _checked_edit(self, raw: Any) -> tuple[ImageEditRequest, Target]:
        """An edit's fields parsed, its model resolved and its limits checked: before any of its
        images is fetched or read, so that a request refused anyway costs no download."""
        body = self._parsed(ImageEditRequest, raw)
        target = self._target(body, routes.EDITS, lambda: body.prompt)
        check_image_request(body, target.config, self.config.limits)
        return body, target

    async def _load_image(self, source: str, *, param: str) -> InputImage:
        """An edit's image by URL. One this server generated (its `url`, as a client passes it
        on to edit it) is read from the image store: fetched, its loopback or private address
        would be refused as any other, and a fetch without the client's API key may be too."""
        name = self.store.named_in(source)
        data = await asyncio.to_thread(self.store.read, name) if name is not None else None
        if data is not None:
            return await asyncio.to_thread(self.fetcher.check_upload, data, param=param)
        if name is not None and not urllib.parse.urlsplit(source.strip()).netloc:  # a bare path: ours
            raise self._image_gone(name, param)
        try:
            return await self.fetcher.load(source, param=param)
        except InvalidRequest as refused:
            # Another server's image URL of the same shape is fetched (and its failures told as
            # they are); at an address this server may not fetch from, it could only be ours.
            if name is not None and refused.code == "image_url_forbidden":
                raise self._image_gone(name, param) from None
            raise

    @staticmethod
    def _image_gone(name: str, param: str) -> InvalidRequest:
        return InvalidRequest(
            f"{param} names an image this server does not hold ({name}): it was not made here, or "
            "image_retention has removed it since. Send the image itself.", param=param, code="image_not_found")
