"""Between the wire and the models: requests to jobs within each model's limits, results to bodies.

Limits come from the model's config and are checked here, in the ingress,
before any model work, so a request over a limit costs a model replica nothing
and gets a 400 naming the parameter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import ChatModelConfig, ImageModelConfig, RequestLimits, parse_size
from serve_app.errors import InvalidRequest
from serve_app.image_check import InputImage
from serve_app.jobs import ChatChoiceResult, ChatJob, ChatResult, ImageJob, TokenLogprob, prompt_chars
from serve_app.protocol import (
    AnswerToolCall,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    ForcedToolCall,
    FunctionCall,
    ImageEditRequest,
    ImageGenerationRequest,
    ToolCall,
    TopLogprob,
    function_definition,
    function_name,
    usage_of,
)
from serve_app.protocol import TokenLogprob as WireTokenLogprob
from serve_app.reasoning import Opening, ReasoningFormat, ReasoningReader, Split
from serve_app.structured_output import is_schema, json_grammar, text_grammar
from serve_app.harmony import HarmonyReader
from serve_app.tool_calls import (CALL_IDS, KEEPS_SPECIAL_TOKENS, TYPED_BY_SCHEMA, CallPiece, ForcedCallReader,
                                  ToolCallFormat, ToolCallReader, tool_call_reader)

_ROLE_ALIASES = {"developer": "system", "function": "tool"}  # OpenAI's newer and older names


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it, as vLLM hands it to them: the role, the text,
    and where given the name, the tool calls an assistant turn made (their arguments as an
    object, which templates render with `tojson`) and the call a tool's result answers.
    A conversation from another model that made tool calls then reads as it happened."""
    entry: dict[str, Any] = {"role": _ROLE_ALIASES.get(message.role, message.role), "content": message.text()}
    if message.name is not None:
        entry["name"] = message.name
    if message.tool_calls:
        entry["tool_calls"] = [_template_call(call) for call in message.tool_calls]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.thinking is not None and message.role == "assistant":
        entry["reasoning_content"] = message.thinking  # Qwen3's template keeps the latest turns' thinking
        if not (message.tool_calls and entry["content"]):  # gpt-oss's, which refuses both beside calls
            entry["thinking"] = message.thinking
    return entry


def template_messages(messages: list[ChatMessage], short_call_ids: bool = False) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (`template_message`), OpenAI's older function
    calling read as the tool call and result it is: an assistant's `function_call` as its one
    tool call, under an id made up here, and the `function` message(s) after it as that call's
    result (templates that pair calls and results by id need one). `short_call_ids`: ids longer
    than nine characters reach the template as their last nine, as vLLM hands them to Mistral's
    templates, which refuse any other length (a conversation from another model, whose ids are
    longer, then goes on)."""
    entries, call_id = [], None
    for index, message in enumerate(messages):
        entry = template_message(message)
        if message.function_call is not None and not message.tool_calls:
            call_id = f"call{index:05d}"  # nine characters, as Mistral's templates want them
            entry["tool_calls"] = [_template_call(ToolCall(id=call_id, function=message.function_call))]
        elif message.role == "function" and message.tool_call_id is None and call_id is not None:
            entry["tool_call_id"] = call_id
        if short_call_ids:
            for call in entry.get("tool_calls", []):
                if isinstance(call.get("id"), str):
                    call["id"] = call["id"][-9:]
            if isinstance(entry.get("tool_call_id"), str):
                entry["tool_call_id"] = entry["tool_call_id"][-9:]
        entries.append(entry)
    return entries


def _template_call(call: ToolCall) -> dict[str, Any]:
    """A tool call as templates read it: a function's arguments as an object; a custom tool's
    `input` (free text) passed as it came."""
    if call.custom is not None and call.type == "custom":
        return {"id": call.id, "type": "custom", "custom": {"name": call.custom.name, "input": call.custom.input}}
    assert call.function is not None  # the wire model requires it for every other type
    return {"id": call.id, "type": call.type, "function": {
        "name": call.function.name, "arguments": _arguments(call.function.arguments)}}


MAX_ARGUMENT_NESTING = 64
"""Deepest nesting of a tool call's arguments (and of `tools`, `chat_template_kwargs`): far beyond any real tool's, and far below where
re-encoding them (the prompt-size check here, the chat template's `tojson` on the replica) would
exhaust Python's stack, which the JSON parser, a few frames shallower, lets through."""


def _arguments(arguments: str | dict[str, Any] | None) -> str | dict[str, Any]:
    """A tool call's arguments as an object; a string that is no JSON object stays as it is."""
    too_deep = InvalidRequest(f"A tool call's arguments nest more than {MAX_ARGUMENT_NESTING} levels deep.",
                              param="messages")
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return arguments
        except RecursionError:  # absurd nesting inside a flat request body
            raise too_deep from None
        if not isinstance(parsed, dict):
            return arguments
        arguments = parsed
    if _nesting(arguments) > MAX_ARGUMENT_NESTING:
        raise too_deep
    return arguments


def _nesting(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (without recursion: it may be deep)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _check_n(n: int, limit: int) -> None:
    if n > limit:
        raise InvalidRequest(f"n must be at most {limit} for this model.", param="n")


HARMONY_EFFORTS = {"none": "low", "minimal": "low", "xhigh": "high"}
"""OpenAI's efforts gpt-oss was not trained on, as the nearest it was."""


def chat_job(request: ChatCompletionRequest, config: ChatModelConfig, limits: RequestLimits) -> ChatJob:
    _check_n(request.n, config.max_n)
    if len(request.messages) > limits.max_messages:
        raise InvalidRequest(f"At most {limits.max_messages} messages are accepted.", param="messages")
    tools, template_kwargs = request.template_tools, request.chat_template_kwargs or {}
    if request.reasoning_effort is not None:  # a template variable, as vLLM hands it to gpt-oss's
        effort = request.reasoning_effort
        if config.reasoning_parser == "openai_gptoss":  # trained on low, medium and high only
            effort = HARMONY_EFFORTS.get(effort, effort)
        template_kwargs = {"reasoning_effort": effort, **template_kwargs}
    for name, value in (("tools", tools), ("chat_template_kwargs", template_kwargs)):
        if _nesting(value) > MAX_ARGUMENT_NESTING:  # the template's copy of them recurses
            raise InvalidRequest(f"{name} nest more than {MAX_ARGUMENT_NESTING} levels deep.", param=name)
    messages = template_messages(request.messages, short_call_ids=config.tool_call_parser == "mistral")
    if prompt_chars(messages, tools, template_kwargs) > limits.max_prompt_chars:
        raise InvalidRequest(f"The messages, tools and chat_template_kwargs are longer than {limits.max_prompt_chars} "
                             "characters in all.", param="messages", code="prompt_too_long")
    requested = request.requested_max_tokens
    max_tokens_param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if requested is not None and requested > config.max_tokens_limit:
        raise InvalidRequest(f"{max_tokens_param} must be at most {config.max_tokens_limit} for this model.",
                             param=max_tokens_param)
    return ChatJob(
        messages=messages,
        # Left to the default, max_tokens makes room for min_tokens (vLLM's default is the context's room).
        max_tokens=requested or min(max(config.default_max_tokens, request.min_tokens or 0), config.max_tokens_limit),
        max_tokens_explicit=requested is not None,
        max_tokens_param=max_tokens_param,
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=list(request.stop or []),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        top_k=None if request.top_k is None else max(request.top_k, 0),
        min_p=request.min_p,
        min_tokens=_min_tokens(request, requested, max_tokens_param, config.max_tokens_limit),
        ignore_eos=bool(request.ignore_eos),
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        logit_bias=request.logit_bias or {},
        tools=tools,
        template_kwargs=template_kwargs,
        skip_special_tokens=not AnswerFormat.of(request, config).keeps_special_tokens,
        grammar=_grammar(request, config, limits),
        grammar_param=grammar_param(request),
    )


def _min_tokens(request: ChatCompletionRequest, requested: int | None, max_tokens_param: str, limit: int) -> int:
    """vLLM refuses min_tokens above max_tokens; left to the default, max_tokens makes room for
    it, up to the model's limit (more could only ever end at that limit, never as asked)."""
    wanted = request.min_tokens or 0
    if requested is not None and wanted > requested:
        raise InvalidRequest(f"min_tokens ({wanted}) is more than {max_tokens_param} ({requested}).",
                             param="min_tokens")
    if wanted > limit:
        raise InvalidRequest(f"min_tokens must be at most {limit} for this model.", param="min_tokens")
    return wanted


def _grammar(request: ChatCompletionRequest, config: ChatModelConfig, limits: RequestLimits) -> str | None:
    """The grammar the answer follows (`_answer_grammar`), within `limits.max_grammar_chars` (a
    compiler that recursed through a deeper one crashed the model's replica). gpt-oss's answer
    follows one in its final channel, but it calls tools in its commentary channel, which the
    grammar does not wait for: a forced call is a 400 for it."""
    if config.reasoning_parser == "openai_gptoss" and request.forced_tool_call is not None:
        param = "tool_choice" if request.tool_choice is not None else "function_call"
        raise InvalidRequest(f"This model answers in gpt-oss's harmony format, whose calls this server cannot yet "
                             f"force: {param} may be auto or none for it.", param=param)
    grammar = _answer_grammar(request, config, limits.max_regex_chars)
    if grammar is not None and len(grammar) > limits.max_grammar_chars:
        param = grammar_param(request)
        what = "schema" if is_schema(param) else "grammar"
        raise InvalidRequest(f"{param}'s {what} is too large: the grammar it makes is {len(grammar)} characters, "
                             f"more than this server's {limits.max_grammar_chars}.", param=param)
    return grammar


LARK_REGEX = re.compile(r"/(?:[^/\\\n]|\\.)+/")
"""A regular expression written in a Lark grammar (`/.../`, one line)."""
NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples"})
"""Keywords of a JSON schema whose values are data, not schemas: a `pattern` key there is no regex."""


def _regexes_within(value: Any, limit: int, param: str, kind: str = "regex") -> None:
    """Every regular expression a request writes within `limit` characters (see
    `RequestLimits.max_regex_chars`): the value itself for a regex, each `/.../` of a Lark
    grammar, and for a JSON schema each `pattern`, `patternProperties` key and llguidance
    `x-guidance` `whitespace_pattern`, at any depth."""
    if kind == "regex":
        found = [value] if isinstance(value, str) else []
    elif kind == "grammar":
        found = LARK_REGEX.findall(value) if isinstance(value, str) else []
    else:
        found, pending = [], [value]
        while pending:
            node = pending.pop()
            if isinstance(node, dict):
                for key in ("pattern", "whitespace_pattern"):
                    if isinstance(node.get(key), str):
                        found.append(node[key])
                if isinstance(node.get("patternProperties"), dict):
                    found += [key for key in node["patternProperties"] if isinstance(key, str)]
                pending += (child for key, child in node.items() if key not in NOT_SCHEMAS)
            elif isinstance(node, list):
                pending += node
    longest = max(found, key=len, default="")
    if len(longest) > limit:
        raise InvalidRequest(f"{param} holds a regular expression of {len(longest)} characters, more than this "
                             f"server's {limit}: compiling one takes time that grows with the square of its length.",
                             param=param)


def _answer_grammar(request: ChatCompletionRequest, config: ChatModelConfig, max_regex_chars: int) -> str | None:
    """The grammar the answer follows: a forced tool call's, a `json_object` or `json_schema`
    answer's, or what vLLM's `structured_outputs` (`guided_*`) asks; None for text. Each regular
    expression in it within `max_regex_chars` (`_regexes_within`)."""
    forced, wanted, constraint = request.forced_tool_call, request.response_format, request.constraint
    json_wanted = wanted is not None and wanted.type != "text"
    if constraint is not None and (forced is not None or json_wanted):
        other = "a tool_choice that forces a call" if forced is not None else "a JSON response_format"
        raise InvalidRequest(f"{constraint[2]} and {other} both say what the answer is: give one.",
                             param=constraint[2])
    if forced is not None:
        if json_wanted:
            raise InvalidRequest("A tool_choice that forces a call makes the answer that call's JSON: give it or a "
                                 "JSON response_format, not both.", param="response_format")
        schema = _forced_call_schema(forced, single=request.parallel_tool_calls is False)
        _regexes_within(schema, max_regex_chars, "tools", kind="json")
        return json_grammar(schema, config.json_any_whitespace, param="tools")
    if constraint is not None:
        kind, value, param = constraint
        if kind != "json":
            _regexes_within(value, max_regex_chars, param, kind)
            return text_grammar(kind, value, param)
        schema = _loads_schema(value, param) if isinstance(value, str) else value
        _regexes_within(schema, max_regex_chars, param, kind="json")
        return json_grammar(schema, config.json_any_whitespace, param=param)
    if not json_wanted:
        return None
    _regexes_within(wanted.schema, max_regex_chars, "response_format", kind="json")
    return json_grammar(wanted.schema, config.json_any_whitespace)


def _loads_schema(text: str, param: str) -> dict[str, Any]:
    """A JSON schema sent as its JSON text (vLLM takes either)."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        schema = None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON schema: an object, or its JSON text.", param=param)
    return schema


def grammar_param(request: ChatCompletionRequest) -> str:
    """The request field an answer's grammar came from, which its errors name."""
    if request.forced_tool_call is not None:
        return "tools"
    constraint = request.constraint
    return constraint[2] if constraint is not None else "response_format"


def _forced_call_schema(forced: ForcedToolCall, single: bool) -> dict[str, Any]:
    """What a forced call's answer is, as vLLM constrains it: the named function's arguments
    (its `parameters` schema), or with `required` a list of one or more calls (one only with
    `parallel_tool_calls` false), each `{"name": ..., "parameters": ...}` of a tool it may call.
    A call's arguments are an object, as OpenAI requires of `parameters`: the schema is narrowed
    to objects (one without a `type`, or whose types include others), and one that declares
    another type, or allows no object at all (`{"enum": [1, 2]}`), is a 400."""
    def parameters(tool: dict[str, Any]) -> dict[str, Any]:
        function = function_definition(tool)
        schema = function.get("parameters")
        if schema is None or schema == {}:
            return {"type": "object"}
        if not isinstance(schema, dict):
            raise InvalidRequest(f"The parameters of function {function_name(tool)!r} must be a JSON Schema object, "
                                 f"not {type(schema).__name__}.", param="tools")
        kind = schema.get("type", "object")
        if kind != "object" and not (isinstance(kind, list) and "object" in kind):
            raise InvalidRequest(f"The parameters of function {function_name(tool)!r} must be a JSON Schema of "
                                 f"type 'object' (arguments are an object), not {kind!r}.", param="tools")
        return {**schema, "type": "object"}

    if forced.named:
        return parameters(forced.tools[0])
    # Each tool's schema moves under the root's $defs, its own `$ref`s ("#", "#/$defs/Unit",
    # "#/properties/a") rebased onto it there, so that each means what it meant in its tool; a
    # tool whose schema has an `$id` of its own (no other tool's) keeps it, and is a resource of
    # its own there, whose refs (by that URI too) mean what they meant (not one with a
    # fragment, from which no ref resolves).
    calls, definitions = [], {}
    ids = [parameters(tool).get("$id") for tool in forced.tools]
    for index, tool in enumerate(forced.tools):
        own = isinstance(ids[index], str) and ids.count(ids[index]) == 1 and "#" not in ids[index].rstrip("#")
        definitions[f"tool_{index}"] = parameters(tool) if own else _rebased(parameters(tool), f"#/$defs/tool_{index}")
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                      "properties": {"name": {"const": function_name(tool)},
                                     "parameters": {"$ref": f"#/$defs/tool_{index}"}}})
    return {"type": "array", "minItems": 1, **({"maxItems": 1} if single else {}), "items": {"anyOf": calls},
            "$defs": definitions}


_SUBSCHEMA = {"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "additionalItems", "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_SUBSCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems", "items"}  # `items` as a list: drafts 4 to 7
_SUBSCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"}
"""The JSON Schema keywords whose values are schemas, lists of them or maps to them; any other
value (`const`, `enum`, `default`, unknown keywords) is data, whatever keys it holds."""


def _rebased(schema: Any, base: str, root: bool = True) -> Any:
    """`schema` with every JSON Pointer `$ref` of its own ("#" or "#/..."), in any subschema,
    moved under `base`. A root `$id` goes (its refs now point from the wrapper); a nested one
    starts a resource of its own, whose refs stay as they are, as do anchors ("#name")."""
    if not isinstance(schema, dict) or (not root and isinstance(schema.get("$id"), str)):
        return schema
    rebased = {}
    for key, value in schema.items():
        if key == "$id" and root:
            continue
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            value = base + value[1:]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            value = {name: _rebased(sub, base, root=False) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            value = [_rebased(sub, base, root=False) for sub in value]
        elif key in _SUBSCHEMA:
            value = _rebased(value, base, root=False)
        rebased[key] = value
    return rebased


@dataclass
class AnswerParts:
    """A piece of an answer, read: the model's thinking, its content, the tool calls it completes."""

    reasoning: str = ""
    content: str = ""
    calls: list[CallPiece] = field(default_factory=list)

    def __iadd__(self, other: "AnswerParts") -> "AnswerParts":
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls += other.calls
        return self


@dataclass(frozen=True)
class AnswerFormat:
    """How a request's answers are read: the model's thinking (its `reasoning_parser`) and its
    tool calls (its `tool_call_parser`, for a request that gives tools, not with `tool_choice`
    "none"), or the call a `tool_choice` forces. Neither: the answer is its text. An answer
    under a grammar (a forced call, a JSON `response_format`, `structured_outputs`) follows it
    once its thinking has ended (`structured_output.AnswerGrammar`): it is read for thinking,
    and a forced call's as that call, never with the `tool_call_parser`."""

    reasoning: ReasoningFormat | None = None
    tool_calls: ToolCallFormat | None = None
    forced: ForcedToolCall | None = None
    call_ids: ToolCallFormat | None = None  # the model's `tool_call_parser`: how its calls' ids look
    first_call_only: bool = False  # `parallel_tool_calls` false: the client gets the first call only
    # each function's parameters' schemas, by its name, for a format whose values are text (qwen3_coder)
    tool_parameters: dict[str, dict[str, Any]] | None = None

    @classmethod
    def of(cls, request: ChatCompletionRequest, config: ChatModelConfig) -> "AnswerFormat":
        forced = request.forced_tool_call
        constrained = forced is not None or request.constraint is not None or (
            request.response_format is not None and request.response_format.type != "text")
        tool_calls = None if constrained else config.tool_call_parser if request.template_tools else None
        return cls(reasoning=config.reasoning_parser, tool_calls=tool_calls, forced=forced,
                   call_ids=config.tool_call_parser, first_call_only=request.parallel_tool_calls is False,
                   tool_parameters=_tool_parameters(request.tools) if tool_calls in TYPED_BY_SCHEMA else None)

    @property
    def harmony(self) -> bool:
        """gpt-oss's harmony format: its channels carry the thinking and the calls (`HarmonyReader`)."""
        return self.reasoning == "openai_gptoss"

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the answer is decoded with special tokens kept: the format's markers may be some."""
        return self.harmony or self.tool_calls in KEEPS_SPECIAL_TOKENS

    @property
    def read(self) -> bool:
        """Whether the answer is read into parts at all (else it is all content)."""
        return bool(self.reasoning or self.tool_calls or self.forced)

    def reader(self, opening: Opening = None, stream: bool = False) -> "AnswerReader | None":
        """A choice's reader; `opening`: where the replica found the prompt leaving the answer;
        `stream`: calls go out in pieces as they are written."""
        return AnswerReader(self, opening, stream) if self.read else None


def _tool_parameters(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each function's parameters' schemas (its `parameters.properties`), by the function's name."""
    found: dict[str, dict[str, Any]] = {}
    for tool in tools:
        schema = function_definition(tool).get("parameters")
        properties = schema.get("properties") if isinstance(schema, dict) else None
        name = function_name(tool)
        if name is not None and isinstance(properties, dict):
            found.setdefault(name, properties)
    return found


class AnswerReader:
    """One choice's answer read into its parts as it is produced (`feed`, then `finish` once
    it has ended): the thinking first, then tool calls out of the content after it."""

    def __init__(self, fmt: AnswerFormat, opening: Opening = None, stream: bool = False) -> None:
        self.thinking = ReasoningReader(fmt.reasoning, opening) if fmt.reasoning and not fmt.harmony else None
        self.forced = fmt.forced is not None  # the answer is a call (unless cut off)
        self.named = self.forced and fmt.forced.named
        self.first_call_only = fmt.first_call_only
        self.tools: ToolCallReader | None
        if fmt.harmony:  # thinking and calls, one reader
            self.tools = HarmonyReader(stream, read_calls=fmt.tool_calls == "openai")
        elif fmt.forced is not None:
            self.tools = ForcedCallReader(function_name(fmt.forced.tools[0]) if fmt.forced.named else None, stream,
                                          CALL_IDS.get(fmt.call_ids))
        else:
            self.tools = tool_call_reader(fmt.tool_calls, stream, fmt.tool_parameters) if fmt.tool_calls else None

    @property
    def calls_made(self) -> int:
        return self.tools.calls_made if self.tools else 0

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's `tool_calls` for an answer that ended on its own after calling tools (with
        `required` too); a call to a function `tool_choice` names ends as `stop`, as OpenAI and
        vLLM end it, and an answer cut off by `max_tokens` as `length`; one that a stop string
        ended inside a call it had begun to stream, as `stop`: that call is not whole."""
        cut = self.tools.cut if self.tools else None
        called = self.calls_made and (cut is None or (self.first_call_only and cut > 0))  # the calls sent are whole
        return "tool_calls" if reason == "stop" and called and not self.named else reason

    def feed(self, text: str) -> AnswerParts:
        return self._parts(self.thinking.feed(text) if self.thinking else Split(content=text), ended=False)

    def finish(self) -> AnswerParts:
        return self._parts(self.thinking.finish() if self.thinking else Split(), ended=True)

    def read(self, text: str) -> AnswerParts:
        """A whole answer."""
        parts = self.feed(text)
        parts += self.finish()
        return parts

    def _parts(self, split: Split, ended: bool) -> AnswerParts:
        if self.tools is None:
            return AnswerParts(split.reasoning, split.content)
        read = self.tools.feed(split.content)
        if ended:
            read += self.tools.finish()
        return AnswerParts(split.reasoning + read.reasoning, read.content, read.calls)


def wire_tool_calls(calls: list[CallPiece], request: ChatCompletionRequest) -> list[CallPiece]:
    """The calls (or pieces of calls) a client gets: with `parallel_tool_calls` false, only
    those of the answer's first call."""
    if request.parallel_tool_calls is False:
        return [piece for piece in calls if piece.index == 0]
    return calls


def joined_calls(pieces: list[CallPiece]) -> list[AnswerToolCall]:
    """Whole calls from their pieces, in order, as a client joins a stream's."""
    calls: dict[int, AnswerToolCall] = {}
    for piece in pieces:
        if piece.index in calls:
            calls[piece.index].function.arguments += piece.arguments
        else:
            calls[piece.index] = AnswerToolCall(id=piece.id, function=FunctionCall(name=piece.name,
                                                                                  arguments=piece.arguments))
    return list(calls.values())


def choice_logprobs(entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    """The wire form of a choice's (or a chunk's) token log-probabilities."""
    if entries is None:
        return None
    return ChoiceLogprobs(content=[
        WireTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                         top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top])
        for e in entries])


def chat_response(request: ChatCompletionRequest, result: ChatResult,
                  answer_format: AnswerFormat = AnswerFormat()) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        model=request.model,
        choices=[_chat_choice(i, c, request, answer_format.reader(result.opening))
                 for i, c in enumerate(result.choices)],
        usage=usage_of(result.prompt_tokens, result.completion_tokens, result.reasoning_tokens),
    )


def _chat_choice(index: int, choice: ChatChoiceResult, request: ChatCompletionRequest,
                 reader: AnswerReader | None) -> ChatChoice:
    """One choice; with a `reader`, its thinking and calls read out of its text."""
    finish_reason = choice.finish_reason
    if reader is None:
        message = AssistantMessage(content=choice.text)
    else:
        parts = reader.read(choice.text)
        calls = wire_tool_calls(parts.calls, request)
        message = AssistantMessage(content=parts.content or (None if calls else ""),
                                   reasoning=parts.reasoning or None, reasoning_content=parts.reasoning or None,
                                   tool_calls=joined_calls(calls) or None)
        finish_reason = reader.finish_reason(finish_reason)
    return ChatChoice(index=index, message=message, logprobs=choice_logprobs(choice.logprobs),
                      finish_reason=finish_reason)


def _requested_size(request: ImageGenerationRequest) -> tuple[tuple[int, int], str] | None:
    """(size, parameter it came from), or None when the request names no size."""
    named = None
    if request.size and request.size.strip().lower() != "auto":
        named = parse_size(request.size)
        if named is None:
            raise InvalidRequest(f"size must look like '1024x1024', not {request.size!r}.", param="size")
    if request.width or request.height:
        if not (request.width and request.height):
            raise InvalidRequest("width and height must be given together.",
                                 param="height" if request.width else "width")
        if named not in (None, (request.width, request.height)):
            raise InvalidRequest(f"size {request.size!r} and width x height {request.width}x{request.height} "
                                 "say different sizes: give one.", param="size")
        return (request.width, request.height), "width"
    return (named, "size") if named is not None else None


def _fit_within(width: int, height: int, config: ImageModelConfig) -> tuple[int, int]:
    """An input image's size scaled into the model's bounds, on its size grid."""
    scale = min(1.0, config.max_side / max(width, height))
    step = config.size_multiple
    fit = [max(config.min_side, int(side * scale) // step * step) for side in (width, height)]
    return fit[0], fit[1]


def _nearest_allowed(size: tuple[int, int], config: ImageModelConfig) -> tuple[int, int]:
    """`size`, or for a model that makes only some sizes, the one nearest it in shape, then in area."""
    allowed = config.allowed_size_pairs
    if not allowed or size in allowed:
        return size
    shape, area = size[0] / size[1], size[0] * size[1]
    return min(allowed, key=lambda wh: (round(abs(math.log(wh[0] / wh[1] / shape)), 6),
                                        abs(math.log(wh[0] * wh[1] / area))))


def image_size(request: ImageGenerationRequest, config: ImageModelConfig,
               source: InputImage | None = None) -> tuple[int, int]:
    """The size to make: as requested, else the input image's (edits), else the model's default."""
    requested = _requested_size(request)
    if requested is None:
        if source is not None:
            return _nearest_allowed(_fit_within(source.width, source.height, config), config)
        return parse_size(config.default_size)  # type: ignore[return-value]
    (width, height), param = requested
    if not config.within_bounds(width, height):
        raise InvalidRequest(
            f"{param}: width and height must be between {config.min_side} and {config.max_side} and multiples "
            f"of {config.size_multiple}; got {width}x{height}.", param=param, code="invalid_size")
    allowed = config.allowed_size_pairs
    if allowed and (width, height) not in allowed:
        raise InvalidRequest(f"{param}: this model makes only {', '.join(config.allowed_sizes)}.",
                             param=param, code="invalid_size")
    return width, height


def check_image_request(request: ImageGenerationRequest, config: ImageModelConfig, limits: RequestLimits) -> int:
    """Refuse what an image request asks beyond the model's limits that no input image changes
    (n, prompts, steps, an explicit size): an edit checks these before it fetches its images,
    so that `n: 99` costs no download. Returns the steps to run."""
    _check_n(request.n, config.max_n)
    for param, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars_image:
            raise InvalidRequest(f"{param} is longer than {limits.max_prompt_chars_image} characters.",
                                 param=param, code="prompt_too_long")
    steps = request.requested_steps or config.default_steps
    if steps > config.max_steps:
        param = "steps" if request.steps else "step"
        raise InvalidRequest(f"{param} must be at most {config.max_steps} for this model.", param=param)
    if _requested_size(request) is not None:
        image_size(request, config)
    return steps


def image_job(request: ImageGenerationRequest, config: ImageModelConfig, limits: RequestLimits, *,
              source: InputImage | None = None, mask: InputImage | None = None) -> ImageJob:
    steps = check_image_request(request, config, limits)
    if source is not None and mask is not None and (mask.width, mask.height) != (source.width, source.height):
        # As OpenAI requires: a mask of another shape, stretched onto the image, would repaint elsewhere.
        raise InvalidRequest(f"mask must have the same dimensions as image: image is {source.width}x{source.height}, "
                             f"mask is {mask.width}x{mask.height}.", param="mask")
    width, height = image_size(request, config, source)
    # None leaves the choice to the model, which knows whether the edit is an inpainting
    # (default_inpaint_strength) or an image-to-image one (default_strength).
    strength = request.strength if isinstance(request, ImageEditRequest) else None
    too_weak = InvalidRequest(f"strength must be at least {1 / config.max_steps:.4g} for this model "
                              f"(it runs {config.max_steps} steps at most).", param="strength")
    if source is not None and strength is not None and strength < 1 / config.max_steps:
        raise too_weak
    job = ImageJob(
        prompt=request.prompt, n=request.n, width=width, height=height, steps=steps, seed=request.seed,
        negative_prompt=request.negative_prompt, strength=strength,
        output_format=request.output_format or "png", quality=request.output_compression,
        init_image=source.data if source else None, mask_image=mask.data if mask else None,
    )
    if strength is not None and job.pipeline_steps > config.max_steps:  # 1 / max_steps may round to a step too many
        raise too_weak
    return job
