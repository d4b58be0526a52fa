"""Application configuration: the `args` of the Serve application, validated.

`serve_config.yaml` is a plain Ray Serve config file; everything this project
adds lives in the application's `args`, which Ray hands to
`serve_app.app:build_app`. That builder validates them as `AppConfig` before
anything is deployed, so a typo in the YAML fails the deploy with an error
naming the field instead of being ignored.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from serve_app.reasoning import ReasoningFormat
from serve_app.tool_calls import ToolCallFormat

SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$", re.ASCII)  # bounded: int() refuses 4,300+
# digits; ASCII digits only, as a size is written (int() would read "١٢٨" too)


def _http_base_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{shown_url(url)!r} must start with http:// or https://")
    if "?" in url or "#" in url:  # paths are appended to it: they would land in the query or fragment
        raise ValueError(f"{shown_url(url)!r} is a base URL that paths are appended to: it may not have a query "
                         "or a fragment")
    if "@" in url.partition("://")[2] and "@" not in urlsplit(url).netloc:
        return url.rstrip("/")  # a password with an unencoded "/": node_urls says how to write it
    try:
        port = urlsplit(url).port  # raises for a port that is not one (99999, abc)
    except ValueError:
        port = -1
    if port == -1 or not urlsplit(url).hostname:
        raise ValueError(f"{shown_url(url)!r} needs a host and, if it gives one, a port from 1 to 65535")
    return url.rstrip("/")


def shown_url(url: str) -> str:
    """A URL as logs, errors, `GET /v1/registration` and the withdraw command show it: a user
    and password in it (sent to a node as Basic auth) replaced by `***`."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    # Up to the last "@", not urlsplit's netloc: a password with a "/" in it (unencoded) would
    # be read as the start of the path, and shown.
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


CREDENTIAL_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""`${NAME}` in a node URL's user or password, as written (a literal `${` is written `%24{`): that
environment variable of the process that calls the node (the registrar replica; the ingress
replica as it withdraws an older config's registrations), so the password need not be in the
config, which Ray Serve logs and shows whole."""


def _userinfo_parts(url: str) -> tuple[str, str, str]:
    """(scheme and "://", the user and password as written, the rest from the "@" on); the middle
    part is empty for a URL without them. Up to the last "@", as `shown_url`."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return scheme + separator, userinfo if separator else "", at + host if separator else url


def credential_variables(url: str) -> list[str]:
    """The environment variables a node URL's user and password name (`CREDENTIAL_VARIABLE`)."""
    return CREDENTIAL_VARIABLE.findall(_userinfo_parts(url)[1])


def with_credentials(url: str, environ: Mapping[str, str]) -> str:
    """`url` with each `${NAME}` in its user and password replaced by that variable of `environ`,
    percent-encoded, so the node gets the value exactly as set; raises `LookupError` naming the
    first variable that is unset or empty (never a value)."""
    head, userinfo, rest = _userinfo_parts(url)

    def value(match: re.Match[str]) -> str:
        found = environ.get(match.group(1), "")
        if not found:
            raise LookupError(match.group(1))
        return quote(found, safe="")

    return head + CREDENTIAL_VARIABLE.sub(value, userinfo) + rest if userinfo else url


def model_deployment_name(name: str) -> str:
    """The Ray deployment of the model called `name`: the name with unsafe characters replaced."""
    return "model_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


BaseUrl = Annotated[str, AfterValidator(_http_base_url)]
"""An http(s) URL that paths are appended to: without its trailing slash."""

ORIGIN_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9a-fA-F:.]+\]|[^/:\[\]\s]+)(:\d{1,5})?")
"""A web origin as a browser sends it: scheme://host[:port], nothing after."""


def _origin_problem(origin: str) -> str | None:
    """Why a browser's Origin header would never equal `origin` (compared as text), or None."""
    if origin in ("*", "null"):  # any; the opaque origin of file:// pages and sandboxed frames
        return None
    match = ORIGIN_PATTERN.fullmatch(origin)
    if not match:
        return ("write scheme://host[:port] with no path or trailing slash, e.g. https://chat.example.com, "
                'or "*" for any')
    if "*" in origin:
        return 'a wildcard inside a host is not matched: list each origin, or give "*" for any'
    if origin != origin.lower():
        return "browsers send it in lower case"
    if match.group(2) in {"http": (":80",), "https": (":443",)}.get(origin.split(":", 1)[0], ()):
        return "browsers leave the scheme's default port out"
    return None


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_bare_host(entry: str) -> bool:
    """A host name, an IP address ([bracketed] IPv6 too) or an IP network; no scheme, port or path."""
    try:
        ipaddress.ip_network(entry.strip().strip("[]"), strict=False)
        return True
    except ValueError:
        return bool(entry.strip()) and not any(char in entry for char in ":/@?#[]* ")


class StrictModel(BaseModel):
    """Config models forbid unknown keys: a misspelt option must fail loudly."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingOptions(StrictModel):
    """Ray Serve autoscaling bounds for one deployment (passed through as is)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 allows scale to zero.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Ongoing requests per replica the autoscaler aims for. Default: the model's "
        "max_batch_size (a replica asks for another when its batches are full on average, not at Ray's 2, "
        "which would add a GPU replica for every third request in flight).")
    upscale_delay_s: float = Field(30.0, ge=0, description="Seconds of high load before adding.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Seconds of low load before removing.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Seconds before going from 1 to 0 replicas; default downscale_delay_s.")
    look_back_period_s: float | None = Field(
        None, gt=0, description="Seconds over which ongoing requests are averaged (Ray's default 30).")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


CHAT_MAX_ONGOING_REQUESTS = 512
"""A chat model's default `max_ongoing_requests`, the ingress's default: so that a burst queues in the
model's own engine, first come first served for room in its batch (as Ray Serve LLM leaves
queueing to vLLM), not in Ray's router, which hands requests to a full replica at about 4 a
second (300 chat requests at once took 19-28 s with 64, 3 s with 512)."""
IMAGE_MIN_ONGOING_REQUESTS = 16


class DeploymentOptions(StrictModel):
    """How Ray Serve runs the replicas of one deployment."""

    num_replicas: int | Literal["auto"] | None = Field(
        None, description="Fixed replica count, or 'auto'. Default 1 unless autoscaling_config is set "
        "(for scale to zero: autoscaling_config with min_replicas 0; a fixed 0 would leave the model "
        "configured yet never live)."
    )
    autoscaling_config: AutoscalingOptions | None = Field(
        None, description="Autoscaling bounds; num_replicas is then left unset (a number and 'auto' are refused)."
    )
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU).")
    memory: int | None = Field(None, ge=0, description="Bytes of memory reserved per replica.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100'.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources.")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests a replica takes at once, running or queued for its batch (Ray's "
        "default of 5 is too low): those over it wait in Ray's router, which hands them out at a few per "
        "second once the replica is full, whatever room its batch has. Default: 512 for a chat model (as "
        "many as one ingress replica passes on by default), 2 x max_batch_size (at least 16) for an image model, whose "
        "queued edits hold their images.")
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests waiting per caller before 503; -1 is unbounded (0 is not allowed, as Ray's)."
    )
    max_replicas_per_node: int | None = Field(None, ge=1, description="Spread replicas over nodes.")
    graceful_shutdown_timeout_s: float = Field(
        120.0, gt=0, description="How long a replica being replaced or removed (a redeploy, a scale-down) "
        "may finish its requests in flight before Serve stops it (Ray's default, 20 s, cuts a long stream).")
    max_surge_percent: int = Field(
        0, ge=0, le=100, description="Replicas a restarting redeploy may start beside the old ones, in percent "
        "of the count: 100 keeps every old replica serving until its replacement runs (no gap), where the "
        "cluster has room (GPUs) for both; 0 (Ray's default) stops old replicas first.")
    health_check_period_s: float | None = Field(None, gt=0, description="Replica health check period.")
    stall_timeout_s: float | None = Field(
        600.0, gt=0, description="A replica whose model work makes no progress for this long (one decode step, "
        "one denoising step, or a whole call of a pipeline that reports no steps: a hung GPU) fails its health "
        "check, so Serve replaces it, and answers 503 replica_failed meanwhile; null never checks.")
    max_constructor_retry_count: int | None = Field(
        None, ge=1, description="Failed replica starts before Serve marks the model failed (503 model_failed). "
        "Default Serve's: 3 per replica, at most 20; Serve never allows more than 3 per replica. Lower it "
        "where each start loads gigabytes of weights.")

    @field_validator("num_replicas")
    @classmethod
    def _at_least_one(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a fixed num_replicas is at least 1 (got {value}); to scale to zero, leave it unset "
                             "and give autoscaling_config with min_replicas: 0")
        return value

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> "DeploymentOptions":
        if self.autoscaling_config is not None and self.num_replicas is not None:
            # `auto` too: Ray would lay this config over its own `auto` bounds (up to 100
            # replicas), which this config's defaults would silently replace.
            raise ValueError("set either num_replicas or autoscaling_config, not both "
                             "(with autoscaling_config, leave num_replicas unset and give the bounds there)")
        if self.num_gpus > 1 and not self.num_gpus.is_integer():  # Ray's rule, said at load time
            raise ValueError(f"num_gpus above 1 must be a whole number of GPUs (got {self.num_gpus})")
        if self.max_queued_requests == 0:  # Ray refuses it at deploy time, with its own message
            raise ValueError("max_queued_requests must be -1 (unbounded) or at least 1")
        return self

    def serve_options(self, target_ongoing_requests: float = 2.0,
                      max_ongoing_requests: int = CHAT_MAX_ONGOING_REQUESTS) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`; `target_ongoing_requests` is the
        autoscaling target and `max_ongoing_requests` the limit where the config gives none
        (the model's: see `BaseModelConfig.serve_options`)."""
        actor_options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            actor_options["memory"] = self.memory
        if self.accelerator_type is not None:
            actor_options["accelerator_type"] = self.accelerator_type
        if self.resources:
            actor_options["resources"] = dict(self.resources)
        options: dict[str, Any] = {
            "ray_actor_options": actor_options,
            "max_ongoing_requests": self.max_ongoing_requests or max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "max_surge_percent": self.max_surge_percent,
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = {"target_ongoing_requests": target_ongoing_requests,
                                             **self.autoscaling_config.model_dump(exclude_none=True)}
        else:
            options["num_replicas"] = self.num_replicas if self.num_replicas is not None else 1
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        for name in ("health_check_period_s", "max_constructor_retry_count"):  # Serve's default where unset
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return options


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"


class BaseModelConfig(StrictModel):
    """What every served model has: a public name, weights and placement."""

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Public name clients put in `model`.")
    path: str = Field(min_length=1, description="Local folder or hub id, loaded with from_pretrained.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="'auto' (cuda when the replica has a GPU, else cpu), 'cpu', 'cuda' or 'cuda:N'.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="'auto' picks bfloat16/float16 on GPU and float32 on CPU."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads torch computes with in each replica. Default: Ray's OMP_NUM_THREADS, "
        "which is the deployment's num_cpus rounded down, and 1 below 2.")
    owned_by: str = Field("serve_app", description="Shown as `owned_by` in /v1/models.")
    cid: str | None = Field(None, min_length=1, description="The id network nodes record for this model (the node calls it the docker container id).")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @field_validator("path")
    @classmethod
    def _expand_local_path(cls, value: str) -> str:
        """Make local paths absolute where the config is read.

        Replicas may start in another working directory (another node, even),
        so a relative path like `./models/tiny-llama` is resolved here, once.
        Hub ids (`org/name`) are left alone.
        """
        candidate = Path(value).expanduser()
        if value.startswith((".", "/", "~")) or candidate.exists():
            return str(candidate.resolve())
        return value

    @model_validator(mode="after")
    def _device_within_the_replicas_gpus(self) -> "BaseModelConfig":
        """Ray shows a replica only the GPUs it reserved (as cuda:0, cuda:1, ...); a cuda
        device outside them would take a GPU no one reserved, or fail to load."""
        gpus = self.deployment.num_gpus
        if self.device == "cpu" and gpus > 0:
            raise ValueError(f"device 'cpu' with deployment.num_gpus {gpus:g}: each replica would reserve a GPU and "
                             "never use it; set device: auto (the GPU), or num_gpus: 0 to run on the CPU")
        if self.device.startswith("cuda"):
            if gpus <= 0:
                raise ValueError(f"device {self.device!r} needs deployment.num_gpus > 0 (Ray reserves the GPU)")
            index = int(self.device.partition(":")[2] or 0)
            if index >= max(1, math.ceil(gpus)):
                raise ValueError(f"device {self.device!r}: a replica with num_gpus {gpus} sees "
                                 f"cuda:0{'' if math.ceil(gpus) <= 1 else f' to cuda:{math.ceil(gpus) - 1}'} only")
        return self

    @property
    def max_ongoing_requests(self) -> int:
        """The replica's `max_ongoing_requests`: the config's, else the model kind's default."""
        return self.deployment.max_ongoing_requests or self.default_max_ongoing_requests  # type: ignore[attr-defined]

    def serve_options(self) -> dict[str, Any]:
        """The model deployment's `Deployment.options(...)`: autoscaling aims at full batches."""
        return self.deployment.serve_options(target_ongoing_requests=self.max_batch_size,  # type: ignore[attr-defined]
                                             max_ongoing_requests=self.max_ongoing_requests)

    @property
    def deployment_name(self) -> str:
        """Ray deployment name: the public name with unsafe characters replaced."""
        return model_deployment_name(self.name)


class ChatModelConfig(BaseModelConfig):
    """A chat LLM served with transformers."""

    default_max_ongoing_requests: ClassVar[int] = CHAT_MAX_ONGOING_REQUESTS
    kind: Literal["chat"] = "chat"
    engine: Literal["transformers", "echo"] = Field(
        "transformers", description="'echo' is test-only: a fixed answer at once, no weights (serving-path benchmarks).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request).")
    max_batch_size: int = Field(
        32, ge=1, description="Rows decoding together on one replica (continuous batching; a request's n "
        "choices are n rows); 1 = no batching.")
    max_prefill_tokens: int = Field(
        16384, ge=1, description="Most prompt tokens prefilled together in one pass (each newcomer's prompt "
        "padded to the longest): the prefill's memory peak. Newcomers beyond it join at the next step; one "
        "longer prompt is prefilled alone. Not applied to models whose cache cannot take newcomers while "
        "decoding (sliding-window, recurrent layers): they prefill every waiting request at once.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long an idle replica waits before prefilling, to take a burst together.")
    stream_interval_s: float = Field(
        0.01, ge=0, le=1, description="After a stream's first tokens (sent at once), how often at most it gets "
        "a message; each carries every token made meanwhile. 0 sends every step's tokens.")
    tool_call_parser: ToolCallFormat | None = Field(
        None, description="How this model writes a tool call, read out into OpenAI's `tool_calls` for a request "
        "with tools: 'hermes' (<tool_call>{...}</tool_call>: Qwen 2.5/3, QwQ, Hermes), 'llama3_json' (Llama "
        "3.1-3.3's JSON), 'mistral' ([TOOL_CALLS]: Mistral 7B v0.3, Mixtral, Mistral Small 3.x, Devstral) or "
        "'qwen3_coder' (<tool_call><function=...><parameter=...>: Qwen3-Coder, values typed by the tools' schemas), "
        "or 'openai' (gpt-oss's harmony messages to functions.*; implies reasoning_parser openai_gptoss), vLLM's "
        "names. Unset: the model's answer is text, calls included.")
    reasoning_parser: ReasoningFormat | None = Field(
        None, description="How this model thinks before it answers, read out into the message's `reasoning` (and "
        "`reasoning_content`): 'deepseek_r1' (everything before </think>: DeepSeek-R1 and its distills, Qwen3 "
        "thinking-only 2507 models), 'qwen3' (a <think>...</think> the answer starts with: Qwen3, QwQ) or "
        "'openai_gptoss' (gpt-oss's harmony channels: analysis is thinking, final the content; with tool_call_parser "
        "openai or none), vLLM's names. Unset: the thinking is part of the content.")
    json_any_whitespace: bool = Field(
        False, description="Let a JSON answer (response_format json_object / json_schema) put whitespace between "
        "its tokens, as vLLM does unless told otherwise. Off: no whitespace outside strings, so that a model "
        "cannot write newlines until max_tokens runs out.")

    @model_validator(mode="after")
    def _default_within_limit(self) -> "ChatModelConfig":
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        return self

    @model_validator(mode="before")
    @classmethod
    def _harmony_is_one_format(cls, data: Any) -> Any:
        """gpt-oss's harmony format carries both the thinking and the calls: `tool_call_parser:
        openai` (all vLLM's docs set for gpt-oss) reads its thinking too, and neither goes with
        another format."""
        if not isinstance(data, dict):
            return data
        calls, reasoning = data.get("tool_call_parser"), data.get("reasoning_parser")
        if calls == "openai" and reasoning is None:
            return {**data, "reasoning_parser": "openai_gptoss"}
        if calls == "openai" and reasoning != "openai_gptoss" or \
                reasoning == "openai_gptoss" and calls not in (None, "openai"):
            raise ValueError("tool_call_parser 'openai' and reasoning_parser 'openai_gptoss' are gpt-oss's harmony "
                             "format, which holds both thinking and calls: use them together (or the reasoning "
                             f"parser alone), not with another format (got tool_call_parser {calls!r}, "
                             f"reasoning_parser {reasoning!r})")
        return data


class ImageModelConfig(BaseModelConfig):
    """A text-to-image / image-to-image pipeline served with diffusers."""

    kind: Literal["image"] = "image"
    routes: list[Literal["generations", "edits"]] | None = Field(
        None, min_length=1, description="The image routes this model serves, as /v1/models and the nodes are "
        "told: ['edits'] for an edit-only checkpoint (inpainting, Qwen-Image-Edit), ['generations'] for a family without image-to-image "
        "or inpainting pipelines. Default: both (a checkpoint that lacks one says so in a warning at start).")
    max_batch_size: int = Field(
        8, ge=1, description="Requests that share one pipeline call (each still gets its own `n` images); "
        "1 = no batching.")
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="The longest a new batch waits for more requests before it starts (and at most until "
        "a running pipeline call's expected end plus half a call). It waits only for as many as this replica lately had waiting at "
        "once (within max_batch_size): a lone caller's starts at once, a group of callers' as soon as the group is "
        "back (serve_app/batch_gathering.py).")
    default_size: str = Field("512x512", description="Size when a request gives none, 'WxH'.")
    default_steps: int = Field(25, ge=1, description="Denoising steps when a request gives none.")
    max_steps: int = Field(100, ge=1, description="Largest `steps` a request may ask for.")
    max_n: int = Field(4, ge=1, description="Largest `n` (images per request).")
    min_side: int = Field(64, ge=8, description="Smallest width or height in pixels.")
    max_side: int = Field(2048, ge=8, description="Largest width or height in pixels.")
    size_multiple: int = Field(8, ge=1, description="Width and height must be multiples of this.")
    allowed_sizes: list[str] | None = Field(
        None, description="If set, only these sizes ('WxH') are accepted; else any size within the bounds.")
    default_strength: float = Field(
        0.75, gt=0, le=1, description="How far an image-to-image edit (no mask) moves from the input image, "
        "when the request gives no strength."
    )
    default_inpaint_strength: float = Field(
        1.0, gt=0, le=1, description="The same for a masked edit (a mask, or transparent pixels in the image): "
        "1 repaints the masked area from scratch, as OpenAI's edits do; below 1 keeps some of what was there.")
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of the PNGs the model returns: 1 encodes several times "
        "faster than PIL's default 6 for files a little larger; the pixels are the same at every level.")
    true_cfg_scale: float | None = Field(
        None, ge=1, description="For pipelines with true classifier-free guidance (FLUX.1, Qwen-Image): its "
        "scale when a request gives a negative_prompt (each step then runs twice). Default: the pipeline's "
        "own where it is above 1, else 4 (FLUX.1's default of 1 would ignore the negative prompt). A pipeline "
        "guided by default (Qwen-Image) is guided on every request, with a blank negative prompt where none is "
        "given; 1 turns guidance off (distilled checkpoints such as Qwen-Image-Lightning), and a negative "
        "prompt is then a 400.")
    guidance_scale: float | None = Field(
        None, ge=0, description="Classifier-free guidance scale for every call, where the pipeline takes one. "
        "Default: the pipeline's own (7.5 for Stable Diffusion), edits taking the text-to-image pipeline's; "
        "distilled checkpoints want theirs: 0 for "
        "sd-turbo and sdxl-turbo, which at 7.5 burn their images and run each step twice.")
    channels_last: bool = Field(
        True, description="Put the UNet and VAE in channels-last memory format, which convolution "
        "kernels run faster on (diffusers' own speed advice, on CPU and GPU).")

    @field_validator("default_size")
    @classmethod
    def _size_format(cls, value: str) -> str:
        if not SIZE_PATTERN.match(value):
            raise ValueError("default_size must look like '512x512'")
        return value

    @field_validator("allowed_sizes")
    @classmethod
    def _sizes_format(cls, value: list[str] | None) -> list[str] | None:
        for size in value or []:
            if not SIZE_PATTERN.match(size):
                raise ValueError(f"allowed size {size!r} must look like '512x512'")
        return value

    @property
    def default_max_ongoing_requests(self) -> int:
        """Two batches' worth (at least IMAGE_MIN_ONGOING_REQUESTS): one running, one filling.
        More would queue in the replica, each edit holding its images (up to max_body_bytes)."""
        return max(IMAGE_MIN_ONGOING_REQUESTS, 2 * self.max_batch_size)

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "ImageModelConfig":
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps must not exceed max_steps")
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        if self.min_side % self.size_multiple:  # an edit of a small picture is scaled up to min_side
            raise ValueError(f"min_side {self.min_side} must be a multiple of size_multiple {self.size_multiple}")
        for name, sizes in (("default_size", [self.default_size]), ("allowed_sizes", self.allowed_sizes or [])):
            for size in sizes:  # the same rule requests are held to
                if not self.within_bounds(*parse_size(size)):  # type: ignore[misc]
                    raise ValueError(f"{name} {size!r}: width and height must be between min_side "
                                     f"{self.min_side} and max_side {self.max_side} and multiples of "
                                     f"size_multiple {self.size_multiple}")
        if self.allowed_sizes and parse_size(self.default_size) not in self.allowed_size_pairs:
            raise ValueError(f"default_size {self.default_size!r} must be one of allowed_sizes")
        for name in ("default_strength", "default_inpaint_strength"):  # the rule for a request's strength
            if getattr(self, name) < 1 / self.max_steps:
                raise ValueError(f"{name} must be at least 1/max_steps ({1 / self.max_steps:.4g}): an edit runs "
                                 "int(steps x strength) steps, and max_steps bounds them")
        return self

    def within_bounds(self, width: int, height: int) -> bool:
        """The size rule for requests and this config alike: each side between `min_side` and
        `max_side`, on the `size_multiple` grid."""
        return all(self.min_side <= side <= self.max_side and side % self.size_multiple == 0
                   for side in (width, height))

    @property
    def allowed_size_pairs(self) -> list[tuple[int, int]]:
        """`allowed_sizes` as (width, height); empty when any size within the bounds is allowed."""
        return [parse_size(size) for size in self.allowed_sizes or []]  # type: ignore[misc]


ModelConfig = Annotated[Union[ChatModelConfig, ImageModelConfig], Field(discriminator="kind")]


class IngressOptions(StrictModel):
    """The HTTP-facing deployment: light on CPU, many requests at once."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.1, ge=0, description="Logical CPUs per ingress replica.")
    max_ongoing_requests: int = Field(512, ge=1, description="Concurrent requests per ingress replica.")
    graceful_shutdown_timeout_s: float = Field(
        120.0, gt=0, description="How long a replaced ingress replica may finish its requests and streams "
        "in flight (under HAProxy, Serve first keeps it reachable RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S of "
        "that while HAProxy moves off it: 5 s under scripts/serve.sh and the shipped cluster configs, Ray's 30 s "
        "otherwise).")
    max_surge_percent: int = Field(
        100, ge=0, le=100, description="Ingress replicas a restarting redeploy starts before stopping the old "
        "ones: 100 (a tenth of a CPU each) leaves no moment without a route to the models.")


class RegistrationOptions(StrictModel):
    """Announcing the live models to the AI network's communication node(s)."""

    enabled: bool = Field(False, description="Register with the node(s) at all.")
    node_urls: list[BaseUrl] = Field(["http://127.0.0.1:7002"], min_length=1,
                                     description="Base URLs of the communication nodes.")
    project: str | None = Field(None, description="Project name on the node; default: the app's `project`.")
    public_base_url: BaseUrl | None = Field(
        None, description="Base URL the node calls the models at; default: the app's `public_base_url`.")
    interval_s: float = Field(60.0, gt=0, description="Re-register this often, even with no change.")
    timeout_s: float = Field(5.0, gt=0, description="Timeout of one call to a node.")
    retry_max_s: float = Field(60.0, gt=0, description="Longest back-off between retries of a failing node.")

    @field_validator("node_urls")
    @classmethod
    def _each_node_once(cls, urls: list[str]) -> list[str]:
        """A node listed twice (`http://n:7002` and `http://n:7002/`) would get two registration
        loops, and the two calls of every change and refresh."""
        seen: set[tuple[str, str, str]] = set()
        for url in urls:
            parts = urlsplit(url)
            if "@" in url.partition("://")[2] and "@" not in parts.netloc:  # said without the URL: a password
                raise ValueError("a user or password in a node URL must be percent-encoded ('/' as %2F, "
                                 "'?' as %3F, '#' as %23): as written, part of it is read as the URL's path")
            key = (parts.scheme.lower(), parts.netloc.lower(), parts.path)  # a path's case counts
            if key in seen:
                raise ValueError(f"{shown_url(url)} is listed twice")
            seen.add(key)
        return urls


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""The formats an edit's images may be in (Pillow's names), the default of `accepted_formats`."""
IMAGE_FORMAT_ALIASES = {"JPG": "JPEG"}


class ImageInputOptions(StrictModel):
    """Limits on the images an edit brings: fetched from a URL or uploaded."""

    max_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest image file accepted (413 above).")
    max_pixels: int = Field(4096 * 4096, ge=64 * 64, description="Largest width x height accepted (decompression bombs).")
    timeout_s: float = Field(15.0, gt=0, description="Timeout for fetching an image URL.")
    max_redirects: int = Field(3, ge=0, description="Redirects followed when fetching; each target is re-checked.")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts or IPs that may be fetched even though they are private/loopback (refused by default).")
    accepted_formats: list[str] = Field(list(IMAGE_FORMATS), min_length=1,
                                        description="Image formats accepted (recognised from the bytes).")

    @field_validator("allowed_hosts")
    @classmethod
    def _bare_hosts(cls, hosts: list[str]) -> list[str]:
        """A URL's host is matched against these as it is: an entry with a scheme, a port or a
        path (`http://minio:9000`) would never match, and its fetches would be refused unexplained."""
        for host in hosts:
            if not _is_bare_host(host):
                raise ValueError(f"{host!r} is not a host: give a name, an IP address or a network (CIDR), "
                                 "without a scheme, port, path or wildcard (every port of a listed host is allowed)")
        return hosts

    @field_validator("accepted_formats")
    @classmethod
    def _checked_formats(cls, formats: list[str]) -> list[str]:
        """As Pillow names them (upper case, JPG is JPEG), and only formats this server vetted:
        the costly shapes of PNG, JPEG, GIF and BMP are refused before decoding
        (serve_app/image_structure.py), WebP goes to libwebp; a TIFF or PSD would reach Pillow's
        rarer decoders. Wrong here, the config check names it, not a failing replica."""
        named = list(dict.fromkeys(IMAGE_FORMAT_ALIASES.get(f.upper(), f.upper()) for f in formats))
        unknown = [f for f in formats if IMAGE_FORMAT_ALIASES.get(f.upper(), f.upper()) not in IMAGE_FORMATS]
        if unknown:
            raise ValueError(f"{unknown}: not a format this server accepts; choose from {list(IMAGE_FORMATS)}")
        return named


class ImageRetentionOptions(StrictModel):
    """How long generated images are kept: the oldest go first."""

    max_age_s: float | None = Field(7 * 24 * 3600.0, gt=0, description="Delete images older than this; null keeps them.")
    max_total_bytes: int | None = Field(
        10 * 1024**3, gt=0, description="Delete the oldest images while the folder is larger; null is unbounded.")
    sweep_interval_s: float = Field(300.0, gt=0, description="How often retention is enforced.")


class AuthOptions(StrictModel):
    """Optional API keys. Off while no key is configured."""

    api_keys: list[str] = Field(default_factory=list, description="Accepted keys (`Authorization: Bearer <key>`).")
    api_keys_env: str = Field("SERVE_APP_API_KEYS",
                              description="Environment variable with more keys, comma-separated.")
    protect_health: bool = Field(False, description="Require a key for /health and /ready too.")

    @field_validator("api_keys")
    @classmethod
    def _no_empty_key(cls, value: list[str]) -> list[str]:
        """An empty key (a template's variable left unset) would be dropped, and with no other
        key the server would run without auth, saying nobody configured any."""
        if any(not key.strip() for key in value):
            raise ValueError("holds an empty key (a template's variable left unset?): with no other key, the "
                             "server would run without auth; give the key, or leave api_keys empty to turn keys off")
        return value
    protect_files: bool = Field(False, description="Require a key for generated image files.")


class CorsOptions(StrictModel):
    """Cross-origin access for browser clients (a web UI on another origin). Off while no origin is listed."""

    allow_origins: list[str] = Field(default_factory=list,
                                     description='Origins allowed to call the API from a browser; ["*"] for any.')
    allow_headers: list[str] = Field(default_factory=lambda: ["*"], description="Request headers they may send.")
    allow_credentials: bool = Field(False, description="Allow cookies and HTTP auth (not with allow_origins [\"*\"]).")
    max_age_s: int = Field(600, ge=0, description="How long a browser may cache a preflight answer.")

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        """A browser sends its origin as `scheme://host[:port]` and it is compared as text: one
        written with a path or a trailing slash (`https://chat.example.com/`) never matches."""
        for origin in origins:
            problem = _origin_problem(origin)
            if problem:
                raise ValueError(f"{origin!r} is not an origin as a browser sends it: {problem}")
        return origins

    @model_validator(mode="after")
    def _no_credentials_for_everyone(self) -> "CorsOptions":
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError('allow_credentials with allow_origins ["*"] would let every web site call the API '
                             "with its visitors' credentials; list the origins")
        return self


class RequestLimits(StrictModel):
    """Limits checked in the ingress before any model work."""

    max_messages: int = Field(256, ge=1, description="Most messages in one chat request.")
    max_prompt_chars: int = Field(200_000, ge=1, description="Most characters across a chat request's messages.")
    max_prompt_chars_image: int = Field(4_000, ge=1, description="Most characters in an image prompt (and in its negative prompt).")
    max_regex_chars: int = Field(
        4_096, ge=1, description="Longest regular expression a chat request may constrain its answer with: a "
        "regex (structured_outputs, guided_regex), each /.../ of a Lark grammar, or a pattern (patternProperties "
        "key, x-guidance whitespace_pattern) in a JSON schema. Compiling one costs time that grows with the square "
        "of its length (a second at 8 KiB of optional characters, on one core).")
    max_grammar_chars: int = Field(
        65_536, ge=1, description="Longest grammar a chat request's answer may follow, as compiled (a JSON "
        "schema's, a forced tool call's over its tools, a choice list's): its size bounds the compiler's depth.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for a model's answer: 504, or 503 while it has no replica; "
        "also the longest silence within a stream (then an in-band 504 event).")
    body_timeout_s: float = Field(
        30.0, gt=0, description="Longest pause while a request body arrives (then 408): a client that sends "
        "its headers and stalls holds one of the ingress's max_ongoing_requests slots until then.")
    body_min_bytes_per_s: int = Field(
        4096, ge=0, description="Slowest average rate a request body may arrive at, after its first "
        "body_timeout_s (then 408; 0: no floor): a body trickled a byte at a time, each pause under "
        "body_timeout_s, would otherwise hold an ingress slot for ever.")


INGRESS_DEPLOYMENT = "ingress"
"""The ingress deployment's name: a model is reachable only through it."""
REGISTRAR_DEPLOYMENT = "registrar"
"""The node registrar's deployment, where registration is on."""


class AppConfig(StrictModel):
    """The whole application: project identity, limits, storage and models."""

    project: str = Field("serve_app", min_length=1, description="Project name shown in /v1/models.")
    public_base_url: BaseUrl = Field(
        "http://127.0.0.1:1088",
        description="Base URL clients reach this server at; image URLs are built from it.",
    )
    image_dir: str = Field("./generated_images", validate_default=True,
                           description="Folder where generated images are stored (made absolute where the config is read).")
    max_body_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest body of the image routes, edits and generations (which runs an "
        "edit sent to it): an edit carries images (413 above)."
    )
    max_text_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest body of a chat completion, which carries no images (413 "
        "above). Parsing a JSON body holds the ingress's event loop for every object "
        "in it, so these stay small; raise it with limits.max_prompt_chars. Never more than max_body_bytes.")
    image_input: ImageInputOptions = Field(default_factory=ImageInputOptions)
    image_retention: ImageRetentionOptions = Field(default_factory=ImageRetentionOptions)
    catalog_ttl_s: float = Field(1.5, ge=0, description="How long /v1/models caches Serve's status.")
    auth: AuthOptions = Field(default_factory=AuthOptions)
    cors: CorsOptions = Field(default_factory=CorsOptions)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    access_log: bool = Field(True, description="One structured log line per request (prompt text only with log_prompts).")
    log_prompts: bool = Field(False, description="Quote the prompt (a chat's last message, first 500 characters) "
                                                 "in the access log line.")
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    registration: RegistrationOptions = Field(default_factory=RegistrationOptions)
    models: list[ModelConfig] = Field(min_length=1, description="The models to serve.")

    @field_validator("models", mode="wrap")
    @classmethod
    def _errors_name_the_model(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[ModelConfig]:
        """A mistake in a model is reported with its name (`model 'SuperImage' (models[1]):
        deployment.num_gpu: ...`), not only its place in the list."""
        try:
            return handler(value)
        except ValidationError as exc:
            raise ValueError("; ".join(_model_error(error, value) for error in exc.errors())) from None

    @field_validator("image_dir")
    @classmethod
    def _absolute_dir(cls, value: str) -> str:
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _unique_names(self) -> "AppConfig":
        seen: dict[str, str] = {}
        for model in self.models:
            for key in (model.name, model.deployment_name):
                if key in seen:
                    raise ValueError(f"model name {model.name!r} is not unique (clashes with {seen[key]!r})")
                seen[key] = model.name
        return self

    @model_validator(mode="after")
    def _registration_needs_cids(self) -> "AppConfig":
        if self.registration.enabled:
            missing = [m.name for m in self.models if not m.cid]
            if missing:
                raise ValueError(f"registration needs a `cid` for every model; missing for {missing}")
        return self

    @model_validator(mode="after")
    def _registered_urls_name_the_nodes_machine(self) -> "AppConfig":
        """The node takes a model's URL only at `localhost` or an IP address of its own machine
        (AIComputingNode refuses any other: "parse ip from model api failed"), so a public
        host name here would be retried and refused for ever."""
        if self.registration.enabled:
            base_url = self.registration.public_base_url or self.public_base_url
            host = urlsplit(base_url).hostname or ""
            raw_host = urlsplit(base_url).netloc.rpartition("@")[2]  # as the node reads it: case kept
            local = host == "localhost" and raw_host.startswith("localhost")
            if not local and (not _is_ip_address(host) or ipaddress.ip_address(host).is_unspecified):
                source = "registration.public_base_url" if self.registration.public_base_url else "public_base_url"
                shown = raw_host if raw_host.endswith("]") else raw_host.rsplit(":", 1)[0]  # without its port
                raise ValueError(
                    f"registration: the node accepts a model's URL only at localhost or one of its own machine's "
                    f"IP addresses (not 0.0.0.0), not {shown!r} "
                    f"({source} {base_url!r}); set registration.public_base_url, "
                    "e.g. http://127.0.0.1:1088 where the node runs on this machine")
        return self


def _model_error(error: Any, models: Any) -> str:
    """One pydantic error inside `models`, said with the model's name and the field's path."""
    loc = list(error["loc"])
    index = loc.pop(0) if loc and isinstance(loc[0], int) else None
    if loc and loc[0] in ("chat", "image"):  # the union's tag: which kind it was read as
        loc.pop(0)
    entry = models[index] if isinstance(models, list) and index is not None and index < len(models) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    where = f"model {name!r} (models[{index}])" if name else f"models[{index}]" if index is not None else ""
    path = ".".join(str(part) for part in loc)
    said = f"{path + ': ' if path else ''}{error['msg'].removeprefix('Value error, ')}"
    return f"{where}: {said}" if where else said  # the list's own error: `models` names it already


def deployment_names(config: AppConfig) -> list[str]:
    """The Serve deployments of an application built from `config` (what `serve status` lists,
    and what a Serve config's `deployments:` may name)."""
    names = [INGRESS_DEPLOYMENT, *(model.deployment_name for model in config.models)]
    return names + [REGISTRAR_DEPLOYMENT] if config.registration.enabled else names


RAY_METRICS_INTERVAL_S = 10.0
"""How often Serve's replicas report their load to the autoscaler (Ray's `metrics_interval_s`)."""
NODE_CHAT_TIMEOUT_S = 180.0
"""How long the AI network's node waits for a chat answer (5 minutes for an image)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tekken.json",
                   "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "tiktoken.model")
"""Any of these beside a checkpoint's weights: transformers can load its tokenizer from there."""


def checkpoint_problem(model: ChatModelConfig | ImageModelConfig) -> str | None:
    """What a local model folder shows it cannot be loaded as for its `kind`, said plainly
    (transformers' and diffusers' own errors for these send the operator after a missing
    package or file); None for a hub id, a path that is not a folder here, or a folder that
    looks right."""
    folder = Path(model.path)
    if not _is(folder, "dir"):
        return None
    pipeline, checkpoint = _is(folder / "model_index.json"), _is(folder / "config.json")
    if model.kind == "chat":
        if pipeline:
            return "is a diffusers pipeline (it has model_index.json): an image model, kind: image"
        if not checkpoint:
            return f"has no config.json, so it is not a transformers checkpoint{_models_within(folder)}"
        if not any(_is(folder / name) for name in TOKENIZER_FILES):
            return (f"has no tokenizer ({', '.join(TOKENIZER_FILES)}): a chat model needs its checkpoint's "
                    "tokenizer beside the weights")
    elif not pipeline:
        if checkpoint and "_diffusers_version" in _text(folder / "config.json"):
            return ("is one part of a diffusers pipeline (a unet, transformer or vae folder): name the "
                    "pipeline's folder, the one with model_index.json")
        if checkpoint:
            return "is a transformers checkpoint (config.json, no model_index.json): a chat model, kind: chat"
        return f"has no model_index.json, so it is not a diffusers pipeline{_models_within(folder)}"
    return None


def _is(path: Path, kind: str = "file") -> bool:
    """Whether `path` is a file (or a folder); False where it cannot be looked at (a folder
    this user may not read, as a volume's root-only lost+found): never a reason to refuse."""
    try:
        return path.is_dir() if kind == "dir" else path.is_file()
    except OSError:
        return False


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[:100_000]
    except OSError:
        return ""


def _models_within(folder: Path) -> str:
    """", naming the model folders inside `folder`", for a config that names their parent."""
    try:
        inside = sorted(sub.name for sub in folder.iterdir() if _is(sub, "dir") and (
            _is(sub / "model_index.json") or _is(sub / "config.json")))
    except OSError:
        return ""
    return f" (it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''}: name the model's own folder)" \
        if inside else ""


def require_loadable(model: ChatModelConfig | ImageModelConfig) -> None:
    """Raise `checkpoint_problem`'s finding, naming the model (a replica that cannot load)."""
    if problem := checkpoint_problem(model):
        raise ValueError(f"model {model.name!r}: {model.path} {problem}")


ENV_VARIABLE = re.compile(r"\$(\{\w+\}|\w+)")
"""`$NAME` or `${NAME}`: what a config author may expect to be expanded (nothing expands it)."""


def config_warnings(config: AppConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """What in a valid config is probably not what its author meant, said when it deploys
    (not errors: a cluster's weights may live only on the GPU nodes, say). `environ`: the
    environment the ingress replica will have (default: this process's)."""
    environ = os.environ if environ is None else environ
    warnings = []
    passed_on = config.ingress.max_ongoing_requests * config.ingress.num_replicas
    for model in config.models:
        if Path(model.path).is_absolute() and not Path(model.path).exists():
            warnings.append(f"model {model.name!r}: path {model.path} does not exist here; its replicas will fail "
                            "to load unless it exists on the nodes that run them")
        elif not Path(model.path).is_absolute() and not _is_hub_id(model.path):
            variable = " (nothing expands $variables in it)" if ENV_VARIABLE.search(model.path) else ""
            warnings.append(f"model {model.name!r}: path {model.path!r} is neither a folder here nor a hub id "
                            f"(namespace/name){variable}, so its replicas will fail to load; a local folder is "
                            "written ./path or /path (relative to where the config is read)")
        if model.deployment.num_replicas == "auto":
            warnings.append(f"model {model.name!r}: num_replicas 'auto' takes Ray's autoscaling defaults, which add "
                            "a replica for every 2 requests in flight, up to 100 replicas; give "
                            "deployment.autoscaling_config with min_replicas and max_replicas instead (its target "
                            "is then the model's max_batch_size)")
        fixed = model.deployment.num_replicas if isinstance(model.deployment.num_replicas, int) else 1
        scaling = model.deployment.autoscaling_config
        replicas = max(1, scaling.min_replicas) if scaling is not None else fixed
        if model.kind == "chat" and model.max_ongoing_requests * replicas < passed_on:
            warnings.append(f"model {model.name!r}: the ingress passes on up to {passed_on} requests at once "
                            f"(ingress max_ongoing_requests x num_replicas) and this model's {replicas} replica(s) "
                            f"take {model.max_ongoing_requests} each (deployment.max_ongoing_requests): in a burst "
                            "the rest wait in Ray's router, which hands them to a full replica at a few a second; "
                            f"raise its max_ongoing_requests to {-(-passed_on // replicas)}")
        if model.max_ongoing_requests < model.max_batch_size:
            warnings.append(f"model {model.name!r}: deployment.max_ongoing_requests "
                            f"({model.max_ongoing_requests}) is below max_batch_size "
                            f"({model.max_batch_size}), so a replica never gets enough requests to fill a batch")
        scaling = model.deployment.autoscaling_config
        if scaling is not None and scaling.look_back_period_s is not None \
                and scaling.look_back_period_s <= RAY_METRICS_INTERVAL_S:
            warnings.append(f"model {model.name!r}: autoscaling_config.look_back_period_s "
                            f"({scaling.look_back_period_s:g}) is not above the {RAY_METRICS_INTERVAL_S:g} s at "
                            "which replicas report their load, so it averages one report at most (Ray warns that "
                            "a future release will refuse it)")
    text_limit = min(config.max_text_body_bytes, config.max_body_bytes)  # as the ingress applies it
    if config.max_text_body_bytes > config.max_body_bytes:
        warnings.append(f"max_text_body_bytes ({config.max_text_body_bytes}) is above max_body_bytes "
                        f"({config.max_body_bytes}), which bounds every body: chat bodies are limited to "
                        f"{config.max_body_bytes}; raise max_body_bytes too")
    if text_limit < 4 * config.limits.max_prompt_chars:  # UTF-8 takes up to 4 bytes a character
        warnings.append(f"the chat body limit ({text_limit} bytes, max_text_body_bytes) is below 4 bytes per character "
                        f"of limits.max_prompt_chars ({config.limits.max_prompt_chars}): a chat request within the "
                        "prompt limit may be refused as too large (413)")
    bases = [("public_base_url", config.public_base_url),
             ("registration.public_base_url", config.registration.public_base_url)]
    for field, url in bases:
        if url and urlsplit(url).path.rstrip("/").endswith("/v1"):
            warnings.append(f"{field} ({url}) ends in /v1, and the routes, which begin with /v1, are added to it: "
                            f"image URLs would read {url}/v1/files/images/...; give the server's own address, "
                            f"{url.rstrip('/').removesuffix('/v1')} (an OpenAI client's base_url is that plus /v1)")
    for key in config.auth.api_keys:
        if ENV_VARIABLE.fullmatch(key.strip()):
            warnings.append(f"auth.api_keys holds {key.strip()!r}, which looks like an environment variable: nothing "
                            "expands it, so that text itself is the key; put keys in the ingress's "
                            f"${config.auth.api_keys_env} (auth.api_keys_env) instead")
    if config.registration.enabled:
        for url in config.registration.node_urls:
            unset = [name for name in credential_variables(url) if not environ.get(name)]
            if unset:
                warnings.append(f"registration.node_urls: {shown_url(url)}'s user or password names "
                                f"{', '.join('$' + name for name in unset)}, unset or empty here: the registrar reads "
                                "it from its replica's environment (set it where Ray starts), and until then "
                                "every registration with that node fails")
    if config.registration.enabled and config.limits.request_timeout_s >= NODE_CHAT_TIMEOUT_S:
        warnings.append(f"registration is on and limits.request_timeout_s ({config.limits.request_timeout_s:g}) is not "
                        f"below the node's {NODE_CHAT_TIMEOUT_S:g} s wait for a chat: a slow answer ends as the node's "
                        "timeout instead of this server's 504; set it below that")
    if config.registration.enabled and (config.auth.api_keys or environ.get(config.auth.api_keys_env, "").strip()):
        warnings.append("registration is on and API keys are required: the network's node forwards requests "
                        "without a key, so each one will be refused (401); to serve the network, turn the keys "
                        "off and let only the node's machine reach this port (a firewall rule)")
    return warnings


def _is_hub_id(path: str) -> bool:
    """Whether `path` can name a model on the Hugging Face hub (`name` or `namespace/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def parse_size(value: str) -> tuple[int, int] | None:
    """'1024x768' -> (1024, 768); None when the text is not a size."""
    match = SIZE_PATTERN.match(value)
    return (int(match.group(1)), int(match.group(2))) if match else None
