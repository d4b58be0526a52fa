"""Wire protocol: the request and response bodies of every route, as pydantic models.

Each response carries both dialects at once: the AI Model Interface Standard's
envelope (`code`, `message`) and the OpenAI fields, so one body satisfies a
network node and the official `openai` client alike. Requests accept unknown
fields (clients and nodes send `user`, `wallet`, `signature`, ...) and log
them at debug level; constraints live in the types so a bad value is reported
with the parameter's name.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from serve_app.errors import APIError, InvalidRequest
from serve_app.jobs import ImageFormat

logger = logging.getLogger("ray.serve")


class WireModel(BaseModel):
    """Base of every request and response body: unknown fields are kept and ignored."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> "WireModel":
        if self.model_extra:
            logger.debug("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self


def _blank_is_none(value: Any) -> Any:
    """Multipart forms carry every field as text: an empty one means absent."""
    return None if isinstance(value, str) and not value.strip() else value


def _zero_means_one(value: Any) -> Any:
    value = _blank_is_none(value)
    return 1 if value in (None, 0, "0") else value


Blankable = BeforeValidator(_blank_is_none)


def _well_formed(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (`"\\ud800"`, from a string cut inside an emoji);
    no tokenizer takes one, so it is the client's error here rather than a model's failure."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired UTF-16 surrogate (such as \\ud800); send valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_well_formed)]
"""Text that reaches a tokenizer: well-formed Unicode."""

MAX_STOP_CHARS = 1000
"""Longest stop sequence: each is matched against every new token of its request."""


Count = Annotated[int, BeforeValidator(_zero_means_one), Field(ge=1)]
"""`n`: `0`, `null` or absent mean one, as a network node sends zero values."""

Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # OpenAI's seed is a 64-bit integer


# --------------------------------------------------------------------------- chat


class ContentPart(WireModel):
    """One part of a message's content. Only text reaches a text model: `text` parts, and the
    `refusal` parts OpenAI's clients may replay in an assistant's turn (as their text)."""

    type: str
    text: Text | None = None
    refusal: Text | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type not in ("text", "refusal"):
            raise ValueError(f"content parts of type {self.type!r} are not supported; use 'text'")
        if getattr(self, self.type) is None:
            raise ValueError(f"a content part of type {self.type!r} needs a {self.type!r} string")
        return self

    @property
    def value(self) -> str:
        return (self.text if self.type == "text" else self.refusal) or ""


class ToolCallFunction(WireModel):
    name: Text
    arguments: Text | dict[str, Any] | None = None  # OpenAI sends a JSON string


class CustomToolCall(WireModel):
    name: Text
    input: Text = ""


class ToolCall(WireModel):
    """A tool call an earlier assistant turn made:
    a function's (`type: function`) or, in OpenAI's newer form, a custom tool's (`type: custom`)."""

    id: Text | None = None
    type: Text = "function"
    function: ToolCallFunction | None = None
    custom: CustomToolCall | None = None

    @model_validator(mode="after")
    def _says_what_it_called(self) -> "ToolCall":
        if (self.function if self.type != "custom" else self.custom) is None:
            raise ValueError(f"a tool call of type {self.type!r} needs its "
                             f"{'custom' if self.type == 'custom' else 'function'} object")
        return self


ROLES_WITH_CONTENT = ("system", "developer", "user", "tool")
"""Roles whose messages must have `content`, as OpenAI requires: an assistant's may be left out
(a tool call's turn), and a `function` result's may be null."""


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = Field(None, validate_default=True)
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None
    function_call: ToolCallFunction | None = None  # OpenAI's older form of an assistant's one tool call
    reasoning: Text | None = None  # an assistant turn's thinking, as this server and vLLM answer it
    reasoning_content: Text | None = None  # the same under DeepSeek's name, which Qwen3's template reads

    @property
    def thinking(self) -> str | None:
        """An assistant turn's thinking, under either name."""
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning

    @field_validator("content")
    @classmethod
    def _required_for_the_role(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role in ROLES_WITH_CONTENT:
            raise PydanticCustomError("missing", "a {role} message needs content (a string or a list of text parts)",
                                      {"role": role})
        return value

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM joins them)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.value for part in self.content)


class StreamOptions(WireModel):
    include_usage: bool | None = False  # null: absent, as for every other optional field
    continuous_usage_stats: bool | None = Field(False, description=(
        "vLLM's extension: with include_usage, every chunk also carries the usage so far."))


class JsonSchemaFormat(WireModel):
    """`response_format.json_schema`, as OpenAI takes it (`client.chat.completions.parse` sends it)."""

    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced here


class ResponseFormatSpec(WireModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (one that validates against it)."""

    type: str
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _known_format(self) -> "ResponseFormatSpec":
        if self.type not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format {self.type!r} is not supported by this server; use 'text', "
                             "'json_object' or 'json_schema'")
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("a response_format of type 'json_schema' needs json_schema.schema, a JSON schema object")
        return self

    @property
    def schema(self) -> dict[str, Any] | None:
        """The schema the answer must validate against; None: any JSON object (or, for `text`, unused)."""
        return self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else None


class StructuredOutputs(WireModel):
    """vLLM's `structured_outputs`: what the answer's text must be, one of these (its older
    `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar` fields say the same)."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")  # a JSON schema, or its JSON text
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None  # Lark, or llama.cpp's GBNF
    json_object: bool | None = None
    structural_tag: Any = None  # not supported: a 400 rather than an answer it does not constrain

    @field_validator("json_", mode="before")
    @classmethod
    def _a_schema(cls, value: Any) -> Any:
        return _schema_or_its_text(value, "structured_outputs.json")


def _schema_or_its_text(value: Any, field: str) -> Any:
    if value is not None and not isinstance(value, (dict, str)):
        raise ValueError(f"{field} must be a JSON schema object, or its JSON text")
    return value


ConstraintKind = Literal["json", "regex", "choice", "grammar"]


def _token_id(value: Any) -> Any:
    """A `logit_bias` key: the token id in plain digits ("01", "+5", "5_0" would name another token)."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit() and (value == "0" or value[0] != "0")):
        raise ValueError(f"a token id must be written in plain digits, not {value!r}")
    return value


TokenId = Annotated[int, BeforeValidator(_token_id), Field(ge=0)]

MAX_LOGIT_BIAS = 300
"""Most `logit_bias` entries in one request: each is an op on every decoding step."""
MAX_JSON_VALUES = 100_000
"""Most JSON values (objects, arrays, strings, numbers...) in one request body, counted on
the parsed JSON before pydantic builds or checks any of it. pydantic's cost is per value,
and so is its error list: a 4 MiB body of a million tiny tool calls, `stop` entries or
`logit_bias` keys held the ingress's event loop for seconds and gigabytes before any
limit (`max_messages`, at most 4 stops, 300 biases) refused it. A long conversation
with tools is a few thousand values; its text counts one per string."""


def _at_most_values(data: Any, budget: int = MAX_JSON_VALUES) -> Any:
    """`data`, unless it holds more than `budget` JSON values (a 400 naming the limit)."""
    pending, seen = [data], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > budget:
            raise ValueError(f"the request holds more than {budget} JSON values")
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return data


class BoundedRequest(WireModel):
    """A request body: its size in JSON values is checked before anything in it is validated.
    Python's JSON parser reads `NaN` and `Infinity`; a number field says they are not numbers
    ("less than or equal to 2" would be the bound's message for a NaN)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        return _at_most_values(data)


OptionalModel = Annotated[str | None, Blankable, Field(description=(
    "The model's name. May be left out when the server serves one model of the route's kind."))]


@dataclass(frozen=True)
class ForcedToolCall:
    """A `tool_choice` that makes the answer a call: to the one function it names (`named`: the
    answer is that function's arguments), or with `required`, to one or more of `tools`."""

    named: bool
    tools: list[dict[str, Any]]  # the function tools it may call, as the request defines them


def function_name(tool: Any) -> str | None:
    """The name a tool definition or a tool choice gives its function: OpenAI's nested form
    (`{"type": "function", "function": {"name": ...}}`), its flat one (`{"type": "function",
    "name": ...}`, as `allowed_tools` lists them), or the older `function_call`'s `{"name": ...}`."""
    if not isinstance(tool, dict):
        return None
    nested = tool.get("function")
    name = nested.get("name") if isinstance(nested, dict) else tool.get("name")
    return name if isinstance(name, str) else None


def function_definition(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool definition's function: OpenAI's nested `function`, or the flat tool itself."""
    nested = tool.get("function")
    return nested if isinstance(nested, dict) else tool


def _forced_tool_call(value: str | dict[str, Any] | None, tools: list[dict[str, Any]] | None) -> ForcedToolCall | None:
    """What a `tool_choice` (or `function_call`) forces, checked against `tools`; None where the
    model may answer in text. A choice that names what `tools` lacks is a ValueError."""
    mode = _tool_mode(value)
    if mode is None or mode in ("auto", "none"):
        return None
    named = [(name, tool) for tool in tools or [] if isinstance(tool, dict) and tool.get("type", "function") == "function"
             and (name := function_name(tool)) is not None]
    functions = dict(named)
    if len(functions) < len(named):
        twice = next(name for i, (name, _) in enumerate(named) if name in dict(named[:i]))
        raise ValueError(f"tools defines the function {twice!r} more than once; a forced call needs one of each")
    if mode == "required":
        allowed = value["allowed_tools"].get("tools") if isinstance(value, dict) and value.get("allowed_tools") else None
        if allowed is not None and not isinstance(allowed, list):
            raise ValueError("allowed_tools.tools must be a list of tools")
        if allowed is not None:
            names = [function_name(tool) for tool in allowed]
            missing = [name for name in names if name not in functions]
            if missing:
                raise ValueError(f"allowed_tools names {missing[0]!r}, which is not a function in tools")
            functions = {name: functions[name] for name in names}
        if not functions:
            raise ValueError("'required' needs at least one function in tools")
        return ForcedToolCall(named=False, tools=list(functions.values()))
    if isinstance(mode, dict) and mode.get("type", "function") == "function" and function_name(mode):
        name = function_name(mode)
        if name not in functions:
            raise ValueError(f"it names the function {name!r}, which tools does not define")
        return ForcedToolCall(named=True, tools=[functions[name]])
    raise ValueError("use 'auto', 'none', 'required' or a function tool's name "
                     "({\"type\": \"function\", \"function\": {\"name\": ...}}); custom tools cannot be forced here")


def _tool_mode(value: str | dict[str, Any] | None) -> Any:
    """A `tool_choice`'s mode: the string itself, the mode of OpenAI's `allowed_tools` form
    (`{"type": "allowed_tools", "allowed_tools": {"mode": ...}}`), else the object (a named
    function or custom tool, which forces a call)."""
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        allowed = value.get("allowed_tools")
        if not isinstance(allowed, dict):
            raise ValueError("allowed_tools must be an object: {\"mode\": \"auto\" | \"required\", \"tools\": [...]}")
        return allowed.get("mode")
    return value


class ChatCompletionRequest(BoundedRequest):
    model: OptionalModel = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0 keeps the most likely token alone
    n: Count = 1
    seed: Seed | None = None
    stop: Text | list[Text] | None = None
    stream: bool | None = False  # null is false, as OpenAI documents it
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=2, description=(  # 0.01: a logit / 1e-40 is inf
        "vLLM's and transformers' multiplicative penalty on tokens already in the prompt or the answer "
        "(1: none). Default: the checkpoint's generation_config, else 1."))
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description=(
        "vLLM's extension (Qwen's and DeepSeek's model cards ask for it): sample among the k most likely "
        "tokens (-1 or 0: all). Default: the checkpoint's generation_config while temperature is left to it, "
        "else all."))
    min_p: float | None = Field(None, ge=0, le=1, description=(
        "vLLM's extension: leave out tokens less likely than min_p times the most likely one (0: none). "
        "Default: as top_k's."))
    min_tokens: int | None = Field(None, ge=0, le=2**31 - 1, description=(
        "vLLM's extension: the answer cannot end on an end-of-sequence token (it is not chosen) or a stop "
        "string before this many tokens."))
    ignore_eos: bool | None = Field(None, description=(
        "vLLM's extension: the answer never ends on an end-of-sequence token (it is not chosen), only at "
        "max_tokens, a stop string or the end of a JSON response_format or forced call."))
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormatSpec | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description=(
        "vLLM's extension: the answer's text follows a JSON schema (`json`), a regular expression (`regex`), "
        "one of some strings (`choice`) or a Lark/GBNF grammar (`grammar`), or is a JSON object (`json_object`)."))
    guided_json: dict[str, Any] | Text | None = None  # vLLM's older names for structured_outputs' fields
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None  # OpenAI's older `tool_choice`
    functions: list[Any] | None = None  # OpenAI's older `tools`: refused, not silently ignored
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "vLLM's extension: more variables for the model's chat template (e.g. Qwen3's "
        "`{\"enable_thinking\": false}`)."))
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(None, description=(
        "false: at most one tool call per answer (the first the model makes)."))
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(None, description=(
        "How hard a reasoning model thinks, handed to its chat template as `reasoning_effort` (gpt-oss's reads "
        "it: low, medium or high); templates without it ignore it."))
    user: str | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # OpenAI and vLLM refuse them too: a client that set include_usage on a plain request
        # would otherwise believe it asked for something that changed the answer.
        if value is not None and "stream" in info.data and not info.data["stream"]:  # absent: its own error
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        stops = [s for s in stops if s]
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long")
        return stops or None

    @field_validator("modalities")
    @classmethod
    def _text_out_only(cls, value: list[str] | None) -> list[str] | None:
        if value and set(value) != {"text"}:
            raise ValueError("this server answers in text only: modalities may only name 'text'")
        return value

    @field_validator("functions")
    @classmethod
    def _tools_instead(cls, value: list[Any] | None) -> list[Any] | None:
        """Ignored, the model would never see them, and answer as if no function existed."""
        if value:
            raise ValueError('functions, OpenAI\'s deprecated form of tools, is not supported: send each as '
                             'tools: [{"type": "function", "function": {...}}] (function_call works as tool_choice); '
                             "calls come back as tool_calls")
        return value

    @field_validator("audio")
    @classmethod
    def _no_audio_out(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("this server answers in text only, never in audio")
        return value

    @field_validator("tools", "chat_template_kwargs")
    @classmethod
    def _template_inputs_well_formed(cls, value: Any) -> Any:
        """What goes into the chat template as it is, strings of any depth: well-formed Unicode (`Text`)."""
        if value is not None:
            _well_formed(json.dumps(value, ensure_ascii=False))
        return value

    @field_validator("guided_json", mode="before")
    @classmethod
    def _guided_schema(cls, value: Any) -> Any:
        return _schema_or_its_text(value, "guided_json")

    @field_validator("tools")
    @classmethod
    def _tools_name_their_functions(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """Each tool a function with a name (and a JSON Schema object of parameters, if any), or a
        custom tool, as OpenAI checks them: a tool without a name could not be called."""
        for index, tool in enumerate(value or []):
            kind = tool.get("type", "function")
            if kind == "custom":
                custom = tool.get("custom")
                if not (isinstance(custom, dict) and isinstance(custom.get("name"), str) and custom["name"].strip()):
                    raise ValueError(f"tools[{index}] names no tool: it needs custom.name, a non-empty string")
                continue
            if kind != "function":
                raise ValueError(f"tools[{index}] is of type {kind!r}: chat completions take 'function' and "
                                 "'custom' tools")
            if not (function_name(tool) or "").strip():
                raise ValueError(f"tools[{index}] names no function: it needs function.name, a non-empty string")
            function = function_definition(tool)
            if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
                raise ValueError(f"tools[{index}].function.parameters must be a JSON Schema object")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _forces_a_known_tool(cls, value: str | dict[str, Any] | None,
                             info: ValidationInfo) -> str | dict[str, Any] | None:
        if info.field_name == "function_call" and info.data.get("tool_choice") is not None:
            return value  # replaced by tool_choice, as OpenAI reads them: not checked either
        _forced_tool_call(value, info.data.get("tools"))
        return value

    @property
    def forced_tool_call(self) -> ForcedToolCall | None:
        """The call `tool_choice` (or the older `function_call`) forces, if it forces one."""
        return _forced_tool_call(self.chosen_tool_mode, self.tools)

    @property
    def chosen_tool_mode(self) -> str | dict[str, Any] | None:
        """`tool_choice`, else the older `function_call` it replaces, as OpenAI reads them."""
        return self.tool_choice if self.tool_choice is not None else self.function_call

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` is the newer name of `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def constraint(self) -> tuple[ConstraintKind, Any, str] | None:
        """What `structured_outputs` (or a `guided_*` field) asks of the answer: its kind, its value,
        the field it came from; None if nothing. Several at once are a 400, as vLLM answers them."""
        given: list[tuple[ConstraintKind, Any, str]] = []
        if self.structured_outputs is not None:
            outputs = self.structured_outputs
            if outputs.structural_tag is not None:
                raise InvalidRequest("structured_outputs.structural_tag is not supported by this server; use json, "
                                     "regex, choice or grammar.", param="structured_outputs.structural_tag")
            given += [(kind, value, f"structured_outputs.{field}") for kind, value, field in (
                ("json", outputs.json_, "json"), ("regex", outputs.regex, "regex"), ("choice", outputs.choice, "choice"),
                ("grammar", outputs.grammar, "grammar"),
                ("json", {"type": "object"} if outputs.json_object else None, "json_object")) if value is not None]
            if not given:
                raise InvalidRequest("structured_outputs says nothing the answer must follow: give one of json, regex, "
                                     "choice, grammar or json_object (true).", param="structured_outputs")
        given += [(kind, value, f"guided_{kind}") for kind, value in (
            ("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice),
            ("grammar", self.guided_grammar)) if value is not None]
        if len(given) > 1:
            raise InvalidRequest("Give one of structured_outputs' json, regex, choice, grammar and json_object (or "
                                 "of the guided_* fields), not several.", param=given[1][2])
        return given[0] if given else None

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model's chat template is given: none where `tool_choice` (or the older
        `function_call`) says "none", as vLLM leaves them out, so that the model answers in text."""
        if not self.tools or _tool_mode(self.chosen_tool_mode) == "none":
            return None
        return self.tools


def _omitted_when_null() -> Any:
    return Field(None, exclude_if=lambda value: value is None)


class FunctionCall(WireModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class AnswerToolCall(WireModel):
    """A tool call the model made (see `tool_calls`)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(WireModel):
    """As OpenAI sends it, `refusal` and `annotations` included (this server has neither);
    with tool calls, `content` is null unless the model also wrote text. A reasoning model's
    thinking (`reasoning_parser`) is in `reasoning`, as vLLM sends it, and in
    `reasoning_content`, DeepSeek's and vLLM's earlier name, which many clients read."""

    role: Literal["assistant"] = "assistant"
    content: str | None = ""
    refusal: str | None = None
    annotations: list[Any] = Field(default_factory=list)
    tool_calls: list[AnswerToolCall] | None = _omitted_when_null()
    reasoning: str | None = _omitted_when_null()
    reasoning_content: str | None = _omitted_when_null()


LEAST_LOGPROB = -9999.0
"""What a token the model itself rules out (a -inf logit, as some checkpoints give tokens they
never emit) reports, as vLLM and OpenAI report it: JSON has no -Infinity, and pydantic would
write it as null, which clients reject."""


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None = None

    @field_validator("logprob")
    @classmethod
    def _finite(cls, value: float) -> float:
        return max(value, LEAST_LOGPROB)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(WireModel):
    """`logprobs` of a choice: one entry per generated token (the end-of-sequence token excluded)."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(WireModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(WireModel):
    cached_tokens: int = 0  # no prefix cache: every prompt token is computed


class CompletionTokensDetails(WireModel):
    reasoning_tokens: int = 0  # a reasoning model's thinking tokens (shown as `reasoning`), as vLLM counts them


def usage_of(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> "Usage":
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens))


class Usage(WireModel):
    """OpenAI's usage, its details included (as OpenAI always sends them, so that code reading
    `usage.prompt_tokens_details.cached_tokens` works here too)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


_ID_BITS = random.Random()  # its own generator, seeded from the OS: nobody else's seed() can repeat ids


def new_id(prefix: str) -> str:
    """A unique response id: 128 random bits like a uuid4, without a system call per response."""
    return f"{prefix}-{_ID_BITS.getrandbits(128):032x}"


def now() -> int:
    return int(time.time())


class Success(WireModel):
    """The standard's success envelope, merged into every success body."""

    code: int = 0
    message: str = "success"


class ChatCompletionResponse(Success):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None



class ChunkFunctionCall(WireModel):
    name: str | None = _omitted_when_null()
    arguments: str


class ChunkToolCall(WireModel):
    """A tool call in a stream, as OpenAI streams one: its first delta carries the call's `id`,
    `type` and function `name` with the start of its `arguments`; later deltas only more of the
    arguments' text, under the same `index` (counting the choice's calls)."""

    index: int
    id: str | None = _omitted_when_null()
    type: Literal["function"] | None = _omitted_when_null()
    function: ChunkFunctionCall


class DeltaMessage(WireModel):
    """What a chunk adds to a choice; as OpenAI sends it, the role only in a choice's first
    delta, and no null fields."""

    role: Literal["assistant"] | None = _omitted_when_null()
    content: str | None = _omitted_when_null()
    tool_calls: list[ChunkToolCall] | None = _omitted_when_null()
    reasoning: str | None = _omitted_when_null()
    reasoning_content: str | None = _omitted_when_null()


class ChunkChoice(WireModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(WireModel):
    """One server-sent event of a streamed completion (plain OpenAI shape)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -------------------------------------------------------------------------- images

ResponseFormat = Literal["url", "b64_json"]


class ImageGenerationRequest(BoundedRequest):
    """`/v1/images/generations`. Size as `size: "WxH"` or `width`/`height`."""

    model: OptionalModel = None
    prompt: Text = Field(min_length=1)
    n: Count = 1
    size: str | None = None
    width: Annotated[int | None, Blankable] = Field(None, ge=0)
    height: Annotated[int | None, Blankable] = Field(None, ge=0)
    response_format: ResponseFormat = "url"
    steps: Annotated[int | None, Blankable] = Field(None, ge=0)
    step: Annotated[int | None, Blankable] = Field(None, ge=0, description="The network node's name for `steps`.")
    negative_prompt: Annotated[Text | None, Blankable] = None  # a form's empty field, a node's "": none
    seed: Annotated[Seed | None, Blankable] = None
    output_format: Annotated[ImageFormat | None, Blankable] = None
    output_compression: Annotated[int | None, Blankable] = Field(
        None, ge=0, le=100, description="JPEG/WebP quality, 0-100; PNG is lossless.")
    background: Annotated[Literal["auto", "opaque", "transparent"] | None, Blankable] = None
    stream: Annotated[bool | None, Blankable] = None
    user: str | None = None

    @field_validator("stream")
    @classmethod
    def _whole_images_only(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this server answers with whole images, not a stream of partial ones; "
                             "leave stream unset or false")
        return value

    @field_validator("background")
    @classmethod
    def _opaque_only(cls, value: str | None) -> str | None:
        if value == "transparent":
            raise ValueError("this server's image models make opaque images; use 'auto' or 'opaque'")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _empty_means_url(cls, value: Any) -> Any:
        return "url" if value in (None, "", 0) else value

    @property
    def requested_steps(self) -> int | None:
        """`steps` or the node's `step`; zero means the model's default."""
        return self.steps or self.step or None


def _image_url_of(value: Any) -> Any:
    """OpenAI's JSON edits name an image as `{"image_url": ...}` (or `{"file_id": ...}`,
    which needs OpenAI's file store); the URL is what this server fetches."""
    if not isinstance(value, dict):
        return value
    if not value.get("image_url"):
        said = ("this server keeps no files, so a file_id names nothing here" if "file_id" in value else
                f"the object given has {', '.join(repr(str(key)) for key in list(value)[:3])} but no image_url"
                if value else "the object given is empty")
        raise ValueError(f"give the image as {{\"image_url\": <http(s) or data: URL>}}; {said}")
    return value["image_url"]


ImageURL = Annotated[str | None, BeforeValidator(_image_url_of)]


class ImageEditRequest(ImageGenerationRequest):
    """`/v1/images/edits`: as JSON, `image` (and `mask`) are http(s) or data: URLs, plain or
    as OpenAI's `{"image_url": ...}` (`images: [...]` holding the one image); as multipart,
    they are uploaded files and these fields stay empty."""

    image: ImageURL = None
    images: list[ImageURL] | None = Field(None, description="OpenAI's JSON form of `image`: one `{\"image_url\": ...}`.")
    mask: ImageURL = Field(None, description=(
        "Optional. Where to edit: its transparent pixels, as OpenAI reads a mask; a mask without "
        "transparency paints where it is white. Without a mask, the image's own transparent pixels "
        "are edited."))
    strength: Annotated[float | None, Blankable] = Field(None, gt=0, le=1)

    @field_validator("images")
    @classmethod
    def _one_image(cls, value: list[str | None] | None, info: ValidationInfo) -> list[str | None] | None:
        if value and len(value) > 1:  # the code a multipart form's second `image[]` part gets too
            raise PydanticCustomError(TOO_MANY_FILES, ONE_IMAGE)
        if value and info.data.get("image"):
            raise ValueError("give the image as image or as images, not both")
        return value

    @model_validator(mode="after")
    def _image_from_images(self) -> "ImageEditRequest":
        if self.images:
            self.image = self.images[0]
        return self


TOO_MANY_FILES = "too_many_files"
ONE_IMAGE = ("this server edits one image per request (OpenAI's newer models take several as references; "
             "diffusers' edit pipelines take one); send one")


class ImageData(WireModel):
    """One image, as the standard's example and OpenAI show it: `{"url": ...}` or
    `{"b64_json": ...}`, without the other fields as nulls."""

    url: str | None = _omitted_when_null()
    b64_json: str | None = _omitted_when_null()
    revised_prompt: str | None = _omitted_when_null()


class ImagesResponse(Success):
    """OpenAI's images response; `output_format` and `size` say what was made, as gpt-image models do."""

    created: int = Field(default_factory=now)
    model: str
    data: list[ImageData]
    output_format: ImageFormat
    size: str


# -------------------------------------------------------------------------- models


class ModelCard(WireModel):
    """One entry of /v1/models: the standard's `model`/`url` and OpenAI's fields."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    model: str
    url: str
    kind: Literal["chat", "image"]
    endpoints: list[str]
    scaled_to_zero: bool = False


class ModelDetail(Success, ModelCard):
    """`GET /v1/models/{model}`: one card in the success envelope (OpenAI's `models.retrieve`)."""


class ModelList(Success):
    object: Literal["list"] = "list"
    project: str
    data: list[ModelCard]


# -------------------------------------------------------------------------- errors


class ErrorDetail(WireModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(WireModel):
    """Every failure: the standard's non-zero `code` and `message`, and OpenAI's `error`."""

    code: int
    message: str
    error: ErrorDetail


def error_body(error: APIError) -> ErrorResponse:
    """The error's envelope: its status as the standard's `code`, its words twice."""
    return ErrorResponse(
        code=error.status_code,
        message=error.message,
        error=ErrorDetail(message=error.message, type=error.error_type, param=error.param, code=error.code),
    )


class Health(BaseModel):
    """`GET /health`: the ingress answers."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """`GET /ready`: 200 when every configured model has a live replica, else 503."""

    ready: bool
    missing: list[str] = Field(description="Configured models without a live replica.")
