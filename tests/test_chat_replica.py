"""One chat replica in-process (no Ray): its engine loop, on the real tiny model.

Failures are injected at one seam each (one request's tokenizer, the model's forward
pass for one long prompt, the chat template); everything else is the real code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from types import SimpleNamespace

import pytest
import torch

from serve_app.decoding import ChoiceDecoder
from serve_app.chat_model import ChatModel
from serve_app.config import ChatModelConfig, RequestLimits
from serve_app.errors import InvalidRequest, Overloaded
from serve_app.http_errors import as_api_error
from serve_app.jobs import ChatJob, ChatResult
from serve_app.protocol import ChatCompletionRequest
from serve_app.translate import chat_job


class InjectedFailure(RuntimeError):
    pass


def injected(outcome: object) -> bool:
    """Whether `outcome` is the injected failure as the replica raises it to the ingress: a
    builtin RuntimeError naming it (see model_replica.raise_to_caller)."""
    return type(outcome) is RuntimeError and "InjectedFailure: " in str(outcome)


@pytest.fixture
def replica(models_dir):
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": str(models_dir / "tiny-llama")})
    return ChatModel.func_or_class(config)


def job(content: str, max_tokens: int = 12) -> ChatJob:
    return ChatJob(messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                   max_tokens_explicit=True, temperature=0)


def test_a_request_whose_text_cannot_be_decoded_fails_alone(replica):
    """One request's tokenizer raises mid-answer. It gets that error; the request batched
    with it finishes with exactly the text it has alone."""
    real_slot = replica._slot

    def breaking_decode(tokens, **kwargs):
        if len(tokens) >= 3:
            raise InjectedFailure("cannot decode")
        return replica.tokenizer.decode(tokens, **kwargs)

    def slot_with_broken_tokenizer(request):
        slot = real_slot(request)
        if request.messages[0]["content"] == "break":
            broken = SimpleNamespace(decode=breaking_decode, is_fast=False)
            for row in slot.rows:
                old = row.decoder
                row.decoder = ChoiceDecoder(broken, old.eos_ids, old.stop, old.max_tokens)
        return slot

    replica._slot = slot_with_broken_tokenizer

    async def run():
        alone = await replica.generate(job("hello there"))
        together = await asyncio.gather(replica.generate(job("hello there")), replica.generate(job("break")),
                                        return_exceptions=True)
        return alone, together, await replica.stats()

    alone, (survivor, failed), stats = asyncio.run(run())
    assert injected(failed)
    assert survivor.choices[0].text == alone.choices[0].text
    assert survivor.choices[0].completion_tokens == alone.choices[0].completion_tokens
    assert stats["active_requests"] == 0 and stats["batch_requests"] == 0


def test_a_newcomer_whose_prefill_fails_does_not_take_the_running_batch_down(replica):
    """A long prompt's prefill raises (as running out of GPU memory would) while another
    request decodes: the newcomer gets the error, the running request its usual text."""
    model, long_prompt = replica.model, "tell me " * 40
    too_long = len(replica._slot(job(long_prompt)).prompt_ids)
    assert len(replica._slot(job("hello there")).prompt_ids) < too_long

    def forward(**inputs):
        if inputs["input_ids"].shape[1] >= too_long:
            raise InjectedFailure("out of memory")
        return model(**inputs)

    replica._batch.model = forward

    async def run():
        alone = await replica.generate(job("hello there", max_tokens=24))
        steps = (await replica.stats())["decode_steps"]
        running = asyncio.ensure_future(replica.generate(job("hello there", max_tokens=24)))
        async with asyncio.timeout(60):  # 24 tokens unless it ends early: then this fails, not hangs
            while (await replica.stats())["decode_steps"] < steps + 3:  # it is decoding now
                await asyncio.sleep(0.005)
        newcomer = await asyncio.gather(replica.generate(job(long_prompt)), return_exceptions=True)
        return alone, await running, newcomer[0], await replica.stats()

    alone, survivor, failed, stats = asyncio.run(run())
    assert injected(failed)
    assert survivor.choices[0].text == alone.choices[0].text
    assert stats["active_requests"] == 0 and stats["batch_requests"] == 0


def test_a_failed_decode_step_fails_the_running_batch_not_the_newcomers_it_had_not_reached(replica):
    """The running rows' pass raises (as running out of GPU memory would) in the step that
    was to prefill a newcomer after it: the running request gets the error; the newcomer,
    whose prefill never ran, joins the next step (the failed batch's memory freed) and gets
    its usual text."""
    model = replica.model

    def forward(**inputs):  # a decode pass (one token a row) while the newcomer is taken from the queue
        if inputs["input_ids"].shape[1] == 1 and len(replica._active) == 2 and not replica._waiting:
            raise InjectedFailure("out of memory")
        return model(**inputs)

    async def run():
        alone = await replica.generate(job("an innocent newcomer", max_tokens=8))
        replica._batch.model = forward  # this batch only: a failed one is replaced by a new batch
        steps = (await replica.stats())["decode_steps"]
        running = asyncio.ensure_future(replica.generate(job("hello there", max_tokens=40)))
        async with asyncio.timeout(60):
            while (await replica.stats())["decode_steps"] < steps + 3:  # it is decoding now
                await asyncio.sleep(0.005)
        newcomer = await replica.generate(job("an innocent newcomer", max_tokens=8))
        return alone, (await asyncio.gather(running, return_exceptions=True))[0], newcomer, await replica.stats()

    alone, failed, newcomer, stats = asyncio.run(run())
    assert injected(failed)
    assert isinstance(newcomer, ChatResult) and newcomer.choices[0].text == alone.choices[0].text
    queued = [value for (name, _), values in replica.metrics.values.items() if name == "queue_time_seconds"
              for value in values]
    assert len(queued) == 3, queued  # each request's queue time once, the newcomer's though it was taken twice
    assert stats["active_requests"] == 0 and stats["batch_requests"] == 0 and stats["waiting_requests"] == 0


def test_prefill_computes_logits_for_the_last_position_only(replica):
    """The vocabulary projection of a long prompt is what a prefill would otherwise spend
    most memory on; only the last position's logits are used."""
    shapes = []
    handle = replica.model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    try:
        asyncio.run(replica.generate(job("tell me " * 40, max_tokens=3)))
    finally:
        handle.remove()
    assert shapes and all(shape[1] == 1 for shape in shapes), shapes


def test_messages_the_chat_template_refuses_are_a_client_error(replica):
    replica.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    request = ChatJob(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                      max_tokens=3, max_tokens_explicit=False)
    # Answered, not raised: Serve logs a raised exception as a failed request (ERROR, traceback).
    refused = asyncio.run(replica.generate(request))
    assert isinstance(refused, InvalidRequest) and "System role not supported" in refused.message
    assert refused.param == "messages"

    async def first_of_stream():
        return [item async for item in replica.generate_stream(request)]

    assert [type(item) for item in asyncio.run(first_of_stream())] == [InvalidRequest]


def test_a_client_leaving_is_not_counted_as_a_finished_answer(replica, monkeypatch):
    """`finished_choices` tells how answers ended (stop, length); a stream whose client left
    mid-answer ended neither way and is not counted, also when it leaves during a step that
    gave it a token."""
    import threading

    from serve_app.chat_engine import DecodeBatch

    tick, ticks, made, left = DecodeBatch.tick, [], threading.Event(), threading.Event()

    def tick_the_client_leaves_during(self, joining):
        deltas = tick(self, joining)
        ticks.append(len(deltas))
        if len(ticks) == 2:  # the second step has made the row's token; now its client leaves
            made.set()
            left.wait(10)
        return deltas

    monkeypatch.setattr(DecodeBatch, "tick", tick_the_client_leaves_during)

    async def run():
        stream = replica.generate_stream(job("hello there", max_tokens=64))
        await anext(stream)
        await asyncio.to_thread(made.wait, 10)
        await stream.aclose()  # the client leaves
        left.set()
        async with asyncio.timeout(60):
            while replica._engine is not None:
                await asyncio.sleep(0.01)

    asyncio.run(run())
    assert ticks[:2] == [1, 1], ticks
    assert not [key for key in replica.metrics.sums if key[0] == "finished_choices"]


def test_a_cancelled_request_no_longer_counts_as_waiting(replica):
    replica.config = replica.config.model_copy(update={"max_batch_size": 1})

    async def run():
        running = asyncio.ensure_future(replica.generate(job("hello there", max_tokens=24)))
        queued = asyncio.ensure_future(replica.generate(job("and me", max_tokens=24)))
        async with asyncio.timeout(60):
            while (await replica.stats())["waiting_requests"] < 1:
                await asyncio.sleep(0.005)
        queued.cancel()
        await asyncio.sleep(0.01)
        during = await replica.stats()
        await running
        return during

    assert asyncio.run(run())["waiting_requests"] == 0


def test_an_engine_stopped_mid_admission_fails_the_requests_it_was_admitting(replica):
    """The engine cancelled (the replica shutting down) while its first step prefills a newcomer:
    that request, out of the queue and not yet in the batch, gets the cancellation at once
    rather than waiting for the ingress's timeout; it is not counted as a model failure."""
    import threading

    entered, release = threading.Event(), threading.Event()
    tick = replica._batch.tick

    def blocking_tick(joining):
        entered.set()
        release.wait(30)
        return tick(joining)

    replica._batch.tick = blocking_tick
    failures_before = dict(replica.metrics.sums)

    async def run():
        request = asyncio.ensure_future(replica.generate(job("hi")))
        async with asyncio.timeout(30):
            while not entered.is_set():
                await asyncio.sleep(0.005)
        replica._engine.cancel()
        try:
            async with asyncio.timeout(10):
                return await asyncio.gather(request, return_exceptions=True)
        finally:
            release.set()

    [outcome] = asyncio.run(run())
    assert isinstance(outcome, asyncio.CancelledError)
    assert {key: value for key, value in replica.metrics.sums.items() if key[0] == "model_failures"} == \
        {key: value for key, value in failures_before.items() if key[0] == "model_failures"}


def test_a_failed_pass_lets_go_of_its_memory_and_a_broken_gpu_context_fails_health(replica):
    """The request that ran out of memory gets its error, and the pass's tensors are freed at
    once (not at the next garbage collection: on a GPU the next pass would run out too). A CUDA
    error that poisons the context makes the replica fail Serve's health check; running out of
    memory does not."""
    import gc
    import weakref

    import torch

    held: list[weakref.ref] = []

    def forward_failing_with(error: Exception):
        def forward(**inputs):
            activations = torch.empty(1_000_000)  # what the failed pass had computed
            held.append(weakref.ref(activations))
            raise error
        return forward

    async def fails(request: ChatJob) -> BaseException:
        (outcome,) = await asyncio.gather(replica.generate(request), return_exceptions=True)
        return outcome

    replica._batch.model = forward_failing_with(torch.OutOfMemoryError("CUDA out of memory (injected)"))
    gc.disable()
    try:
        outcome = asyncio.run(fails(job("hello")))
        # Raised to the ingress as a builtin error naming it (see test_placement).
        assert type(outcome) is RuntimeError and "OutOfMemoryError: CUDA out of memory" in str(outcome)
        assert held and held[0]() is None, "the failed pass's tensors outlived its request"
    finally:
        gc.enable()
    replica.check_health()

    replica._batch.model = forward_failing_with(torch.AcceleratorError("CUDA error: an illegal memory access"))
    assert "AcceleratorError: CUDA error" in str(asyncio.run(fails(job("hello"))))
    with pytest.raises(RuntimeError, match="GPU context failed"):
        replica.check_health()
    # Until Serve replaces it, the replica answers 503 at once instead of failing on the GPU.
    refused = asyncio.run(replica.generate(job("hello")))
    assert isinstance(refused, Overloaded) and refused.code == "replica_failed", refused
    # Each failure counted by kind (the refusal is no failure of the model's), for an operator's alerts.
    failures = {tags: n for (name, tags), n in replica.metrics.sums.items() if name == "model_failures"}
    assert failures == {(replica.config.name, "out_of_memory"): 1, (replica.config.name, "accelerator"): 1}, failures


def test_a_failed_decode_step_lets_go_of_its_batch_before_releasing_its_memory(replica):
    """`released` gives the GPU back what a failed pass reserved (torch.cuda.empty_cache): the
    failed batch, with its KV cache, must be gone by then, or its memory stays reserved."""
    import gc
    import weakref

    import torch

    real_model, calls = replica._batch.model, []

    def forward(**inputs):
        calls.append(1)
        if len(calls) > 1:  # the prefill runs; the first decode step fails the batch
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_model(**inputs)

    replica._batch.model = forward
    failed_batch = weakref.ref(replica._batch)
    alive_after_release: list[bool] = []
    real_released = replica.released

    def released(exc: BaseException) -> BaseException:
        kept = real_released(exc)
        alive_after_release.append(failed_batch() is not None)
        return kept

    replica.released = released

    async def fails() -> BaseException:
        (failure,) = await asyncio.gather(replica.generate(job("hello")), return_exceptions=True)
        return failure

    gc.disable()
    try:
        outcome = asyncio.run(fails())
    finally:
        gc.enable()
    assert "OutOfMemoryError" in str(outcome) and len(calls) == 2
    assert alive_after_release == [False], "the failed batch outlived the release of its memory"


def test_max_batch_size_counts_rows_so_choices_cannot_overfill_the_batch(models_dir):
    """Every choice holds its own KV cache: with room for 4 rows, a 3-choice request and a
    2-choice one take turns, and a 6-choice request still runs (alone)."""
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": str(models_dir / "tiny-llama"),
                                             "max_batch_size": 4})
    replica = ChatModel.func_or_class(config)
    rows: list[int] = []
    tick = replica._batch.tick

    def counting_tick(joining):
        deltas = tick(joining)
        rows.append(len(replica._batch.owners))
        return deltas

    replica._batch.tick = counting_tick

    def choices(n: int, max_tokens: int) -> ChatJob:
        return ChatJob(messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens,
                       max_tokens_explicit=True, temperature=0, n=n)

    async def run():
        three, two = await asyncio.gather(replica.generate(choices(3, 8)), replica.generate(choices(2, 8)))
        assert [len(three.choices), len(two.choices)] == [3, 2] and rows and max(rows) <= 4, rows
        rows.clear()
        assert len((await replica.generate(choices(6, 3))).choices) == 6 and max(rows) == 6, rows

    asyncio.run(run())


def test_a_requests_choices_share_one_prefill_and_start_alike(replica):
    """n=3 prefills the prompt once (one row through the model), and greedy choices are all
    the text a single choice gets."""
    rows_in_prefill = []
    handle = replica.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_in_prefill.append(kwargs["input_ids"].shape) if kwargs["input_ids"].shape[1] > 1
        else None, with_kwargs=True)
    try:
        single = asyncio.run(replica.generate(job("hello there", max_tokens=10)))
        three = asyncio.run(replica.generate(ChatJob(messages=[{"role": "user", "content": "hello there"}], max_tokens=10,
                                                     max_tokens_explicit=True, temperature=0, n=3)))
    finally:
        handle.remove()
    assert [shape[0] for shape in rows_in_prefill] == [1, 1], rows_in_prefill
    assert [choice.text for choice in three.choices] == [single.choices[0].text] * 3


def test_a_long_conversation_is_prepared_off_the_event_loop_and_answered(replica, monkeypatch):
    """Past INLINE_PROMPT_CHARS the template and tokenizer run in a thread (so the replica's
    loop keeps serving streams); its answer, or its client mistake, comes back the same. A
    prompt past the context is the client's 400 and nothing in the operator's console (where
    transformers warned that it was longer than the model's maximum)."""
    import threading

    from serve_app import chat_model
    from serve_app.chat_model import INLINE_PROMPT_CHARS

    threads: list[str] = []
    real_slot = replica._slot

    def recording_slot(request):
        threads.append(threading.current_thread().name)
        return real_slot(request)

    replica._slot = recording_slot
    too_long = " ".join(["otter"] * (INLINE_PROMPT_CHARS // 6 + 1))  # a token a word: past the context
    # The tiny tokenizer's longest word, a token of 14 characters: past INLINE_PROMPT_CHARS, yet
    # about 1,450 tokens, within the 2,048 of the context.
    fits = " conversations" * (INLINE_PROMPT_CHARS // 14 + 1)
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"notes": fits}}}]
    long_calls = ChatJob(messages=[{"role": "assistant", "content": "", "tool_calls": calls},
                                   {"role": "user", "content": "hi"}], max_tokens=4, max_tokens_explicit=True,
                         temperature=0)

    async def run():
        return [await replica.generate(request) for request in (job("hi"), job(too_long), job(fits), long_calls)]

    warned: list[logging.LogRecord] = []
    console = logging.Handler(logging.WARNING)  # beside transformers' own handler on its library logger
    console.emit = warned.append
    logging.getLogger("transformers").addHandler(console)
    try:
        short, long, fitting, tool_calls = asyncio.run(run())
    finally:
        logging.getLogger("transformers").removeHandler(console)
    # Tool calls count as the ingress counts them: short contents, long arguments.
    assert threads[0] == threading.main_thread().name and all(name != threads[0] for name in threads[1:])
    assert replica.context_length == 2048
    assert isinstance(long, InvalidRequest) and long.code == "context_length_exceeded"
    assert long.message.endswith("which leaves no room for an answer."), long.message
    assert not [record.getMessage() for record in warned if "sequence length" in record.getMessage()]
    assert short.choices[0].completion_tokens >= 1 and tool_calls.choices[0].completion_tokens >= 1
    assert fitting.prompt_tokens > 1_000 and fitting.choices[0].completion_tokens >= 1

    # The same request prepared on the loop gets the same answer.
    threads.clear()
    monkeypatch.setattr(chat_model, "INLINE_PROMPT_CHARS", 10**9)
    inline = asyncio.run(replica.generate(job(fits)))
    assert threads == [threading.main_thread().name]
    assert [choice.text for choice in inline.choices] == [choice.text for choice in fitting.choices]
    assert inline.prompt_tokens == fitting.prompt_tokens


def test_latency_metrics_time_the_wait_for_room_the_first_token_and_the_tokens_after(models_dir):
    """With room for one request, the second waits for the whole of the first: its queue
    time is at least the first's time to its last token, and its time to first token
    includes that wait. Each request is timed once (the values Ray gets at the next flush)."""
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": str(models_dir / "tiny-llama"),
                                             "max_batch_size": 1})
    replica = ChatModel.func_or_class(config)

    async def run():
        return await asyncio.gather(replica.generate(job("hello there", 32)), replica.generate(job("hello again", 32)))

    first, second = asyncio.run(run())
    values = {name: observed for (name, tags), observed in replica.metrics.values.items() if tags == ("m",)}
    queued, first_tokens, per_token = (values["queue_time_seconds"], values["time_to_first_token_seconds"],
                                       values["time_per_output_token_seconds"])
    tokens = [result.choices[0].completion_tokens for result in (first, second)]
    assert len(queued) == len(first_tokens) == 2 and len(per_token) == sum(n > 1 for n in tokens), (values, tokens)
    assert tokens[0] > 1, tokens  # 32 tokens unless the random model ends early; one would time nothing after
    first_done = first_tokens[0] + (tokens[0] - 1) * per_token[0]  # from its arrival to its last token
    assert queued[0] < first_done / 4 and queued[1] >= first_done * 0.8, (queued, first_done)
    assert first_tokens[1] > queued[1] and all(0 < t < 1 for t in per_token), values
    # A step per token of each (one row at a time), and how each answer ended.
    assert len(values["decode_step_seconds"]) == sum(tokens) and all(0 < t < 1 for t in values["decode_step_seconds"])
    reasons = [result.choices[0].finish_reason for result in (first, second)]
    assert {tags: n for (name, tags), n in replica.metrics.sums.items() if name == "finished_choices"} == {
        ("m", reason): reasons.count(reason) for reason in set(reasons)}
    assert replica.metrics._gauges() == {"running_requests": {("m",): 0}, "waiting_requests": {("m",): 0}}


TOOL_TEMPLATE = (  # renders what tool-aware templates read: tool calls, their ids, arguments as objects
    "{% for m in messages %}[{{ m.role }}{% if m.name %} {{ m.name }}{% endif %}]"
    "{% for call in m.tool_calls or [] %}call {{ call.id }} {{ call.function.name }} "
    "{{ call.function.arguments | tojson }} city={{ call.function.arguments.city }}{% endfor %}"
    "{% if m.tool_call_id %}answers {{ m.tool_call_id }}: {% endif %}{{ m.content }}\n{% endfor %}")


def test_tool_calls_of_an_earlier_turn_reach_the_chat_template(replica):
    """A conversation from a model that called tools reads as it happened: the assistant's
    calls (arguments as an object, as vLLM hands them over) and the results' call ids."""
    body = {"model": "m", "messages": [
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"}]}
    job = chat_job(ChatCompletionRequest.model_validate(body), replica.config, RequestLimits())
    saved, replica.tokenizer.chat_template = replica.tokenizer.chat_template, TOOL_TEMPLATE
    try:
        prompt = replica.tokenizer.decode(replica._slot(job).prompt_ids)
        # A template that cannot take the messages (a TypeError in it, not only raise_exception) is a 400.
        replica.tokenizer.chat_template = "{{ messages[0].content + 1 }}"
        refused = asyncio.run(replica.generate(job))
    finally:
        replica.tokenizer.chat_template = saved
    assert prompt == ('[user alice]Weather in Paris?\n'
                      '[assistant]call call_1 get_weather {"city": "Paris"} city=Paris\n'
                      '[tool]answers call_1: 22C\n')
    assert isinstance(refused, InvalidRequest) and refused.param == "messages"


def test_reasoning_effort_and_an_earlier_turns_thinking_reach_the_chat_template(replica):
    """As gpt-oss's template reads them: `reasoning_effort` a template variable (a request's own
    chat_template_kwargs win), an assistant turn's thinking as `thinking` (and as Qwen3's
    `reasoning_content`); a value OpenAI does not name is refused."""
    def prompt(**fields) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "Hello", "reasoning": "greet"}], **fields}
        job = chat_job(ChatCompletionRequest.model_validate(body), replica.config, RequestLimits())
        saved, replica.tokenizer.chat_template = replica.tokenizer.chat_template, (
            "effort={{ reasoning_effort | default('unset') }}"
            "{% for m in messages %}|{{ m.thinking }}/{{ m.reasoning_content }}{% endfor %}")
        try:
            return replica.tokenizer.decode(replica._slot(job).prompt_ids)
        finally:
            replica.tokenizer.chat_template = saved

    assert prompt() == "effort=unset|/|greet/greet"
    assert prompt(reasoning_effort="low") == "effort=low|/|greet/greet"
    assert prompt(reasoning_effort="low", chat_template_kwargs={"reasoning_effort": "high"}).startswith("effort=high|")
    gpt_oss = replica.config.model_copy(update={"reasoning_parser": "openai_gptoss"})
    for effort, told in (("minimal", "low"), ("xhigh", "high"), ("medium", "medium")):
        job = chat_job(ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                             "reasoning_effort": effort}), gpt_oss, RequestLimits())
        assert job.template_kwargs == {"reasoning_effort": told}  # the efforts gpt-oss was trained on
    # gpt-oss's template refuses a turn with calls that has both content and thinking: no `thinking` then.
    called = {"model": "m", "messages": [{"role": "assistant", "content": "Checking.", "reasoning": "r", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}
    entry = chat_job(ChatCompletionRequest.model_validate(called), replica.config, RequestLimits()).messages[0]
    assert (entry["content"], entry["reasoning_content"], "thinking" in entry) == ("Checking.", "r", False)
    with pytest.raises(ValueError, match="reasoning_effort"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                              "reasoning_effort": "max"})


def test_tool_call_arguments_no_tokenizer_can_take_are_the_clients_400(replica):
    """Arguments pass the wire's text check as a JSON string, then decode to what the
    template and tokenizer cannot take: a lone surrogate, or nesting past Python's limit."""
    def request(arguments):
        return ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "user", "content": "hi"}]})

    with pytest.raises(InvalidRequest) as nested:
        chat_job(request("[" * 5000 + "]" * 5000), replica.config, RequestLimits())
    assert nested.value.param == "messages" and "nest" in nested.value.message
    deep: dict = {}
    for _ in range(900):  # an object the JSON parser takes, a few frames short of json.dumps' limit
        deep = {"a": deep}
    for arguments in (deep, json.dumps({"a": [{"b": [0]}] * 3} | {"deep": json.loads("[" * 70 + "]" * 70)})):
        with pytest.raises(InvalidRequest, match="nest more than 64 levels") as nested:
            chat_job(request(arguments), replica.config, RequestLimits())
        assert nested.value.param == "messages"
    chat_job(request(json.loads("{" + '"a": {' * 60 + "}" * 61)), replica.config, RequestLimits())  # deep enough
    job = chat_job(request('{"x": "\\ud83d"}'), replica.config, RequestLimits())
    saved, replica.tokenizer.chat_template = replica.tokenizer.chat_template, TOOL_TEMPLATE
    try:
        with pytest.raises(InvalidRequest) as surrogate:
            replica._slot(job)
    finally:
        replica.tokenizer.chat_template = saved
    assert surrogate.value.param == "messages" and "surrogate" in surrogate.value.message


def test_a_turn_ends_at_the_tokenizers_end_too(models_dir, tmp_path):
    """A checkpoint whose generation config names only another end token (the base model's)
    still stops where its tokenizer's end of turn comes, as vLLM stops on both."""
    import json
    import shutil

    checkpoint = shutil.copytree(models_dir / "tiny-llama", tmp_path / "tiny-llama")
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    (checkpoint / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 5}))
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": str(checkpoint)})
    replica = ChatModel.func_or_class(config)
    assert replica.tokenizer.eos_token_id == 2 and replica.eos_ids == {2, 5}
    for end in (2, 5):  # either end token, made first, ends the turn with nothing shown
        answer = asyncio.run(replica.generate(ChatJob(
            messages=[{"role": "user", "content": "hi"}], max_tokens=8, max_tokens_explicit=True,
            temperature=0, logit_bias={end: 100.0})))
        assert (answer.choices[0].finish_reason, answer.choices[0].text) == ("stop", "")
        assert answer.choices[0].completion_tokens == 1


def test_a_pad_token_beyond_the_embeddings_is_not_used(models_dir, tmp_path):
    """A fine-tune that added a pad token to its tokenizer without resizing the model's
    embeddings: padding (masked, but still looked up) takes an end token's id instead, so two
    prompts of different lengths batch, rather than failing on an out-of-range index."""
    import shutil

    from transformers import AutoTokenizer

    checkpoint = shutil.copytree(models_dir / "tiny-llama", tmp_path / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_special_tokens({"pad_token": "<added_pad>"})
    tokenizer.save_pretrained(checkpoint)
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": str(checkpoint)})
    replica = ChatModel.func_or_class(config)
    assert replica.tokenizer.pad_token_id >= replica.model.get_input_embeddings().num_embeddings
    assert replica.pad_id == min(replica.eos_ids)

    async def both():
        return await asyncio.wait_for(asyncio.gather(replica.generate(job("hi")),
                                                     replica.generate(job("a much longer question " * 4))), 60)

    assert all(result.choices[0].completion_tokens > 0 for result in asyncio.run(both()))


def test_a_failing_cleanup_never_leaves_a_request_waiting(replica, monkeypatch):
    """A decode step fails, and so does the cleanup after it (as `torch.AcceleratorError`
    did on torch before 2.8): the request still gets the step's error, at once, and the
    replica serves the next request."""
    from serve_app.chat_engine import DecodeBatch

    def failing_tick(self, joining):
        raise InjectedFailure("step failed")

    def failing_cleanup(exc):
        raise AttributeError("module 'torch' has no attribute 'AcceleratorError'")

    async def run():
        monkeypatch.setattr(DecodeBatch, "tick", failing_tick)
        monkeypatch.setattr(replica, "released", failing_cleanup)
        failed = await asyncio.wait_for(asyncio.gather(replica.generate(job("hi")), return_exceptions=True), 30)
        monkeypatch.undo()
        return failed, await asyncio.wait_for(replica.generate(job("hi")), 60)

    [failed], after = asyncio.run(run())
    assert injected(failed) and after.choices[0].completion_tokens > 0


def tiny_sliding(models_dir, tmp_path, window: int):
    """A tiny random Mistral (every layer a sliding-window one) with the tiny Llama's
    tokenizer, its context 2048 tokens."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1262,
                                  max_position_embeddings=2048, sliding_window=window,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    folder = tmp_path / f"tiny-mistral-{window}"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for file in (models_dir / "tiny-llama").iterdir():
        if "token" in file.name or file.suffix == ".jinja":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize("window, merges", [(4096, True), (16, False)])
def test_a_sliding_window_longer_than_the_context_takes_newcomers(models_dir, tmp_path, window, merges):
    """A window longer than the context (Phi-3.5-mini's) never slides: its cache is a plain
    one, newcomers join the running batch, and a seeded request's text is the same as alone.
    A window that does slide keeps transformers' own layer, and newcomers wait."""
    replica = ChatModel.func_or_class(ChatModelConfig.model_validate(
        {"name": "w", "kind": "chat", "path": str(tiny_sliding(models_dir, tmp_path, window))}))

    def ask(content: str, max_tokens: int) -> ChatJob:
        return ChatJob(messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                       max_tokens_explicit=True, temperature=1.0, seed=7, logit_bias={2: -100.0})

    async def run():
        # 48 tokens: the running request is still decoding when the newcomer's 4 (and its prefill) are done
        alone = await replica.generate(ask("hi", 48))
        running = asyncio.ensure_future(replica.generate(ask("hi", 48)))
        async with asyncio.timeout(60):
            while not replica._batch.live_rows:  # it is decoding now (the finished `alone` may still be an owner)
                await asyncio.sleep(0.001)
        joined = replica._batch.merges
        newcomer = await replica.generate(ask("a longer prompt than the first one", 4))
        return alone, running.done(), await running, newcomer, joined

    alone, running_ended_first, running, newcomer, joined = asyncio.run(run())
    assert joined is merges
    assert newcomer.choices[0].completion_tokens == 4
    # Joined, the 4-token newcomer ends while the 48-token request runs on; waiting, after it.
    assert running_ended_first is not merges
    assert running.choices[0].text == alone.choices[0].text


def tiny_lfm2(models_dir, tmp_path):
    """A tiny random LFM2 (convolution layers beside attention: its cache keeps conv states)
    with the tiny Llama's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("lfm2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1262,
                                  layer_types=["conv", "full_attention", "conv", "full_attention"],
                                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny-lfm2")
    for file in (models_dir / "tiny-llama").iterdir():
        if "token" in file.name or file.suffix == ".jinja":
            shutil.copy(file, tmp_path / "tiny-lfm2" / file.name)
    return tmp_path / "tiny-lfm2"


def test_a_hybrid_recurrent_model_batches_rows_that_end_apart(models_dir, tmp_path):
    """A hybrid model (LFM2: convolution layers beside attention, whose cache keeps conv
    states, not only keys and values): rows that end at different steps leave the batch, and
    a request's n choices start from copies of its one prefilled row, states included."""
    replica = ChatModel.func_or_class(ChatModelConfig.model_validate(
        {"name": "h", "kind": "chat", "path": str(tiny_lfm2(models_dir, tmp_path))}))

    def ask(content: str, max_tokens: int, n: int = 1) -> ChatJob:  # never the end token: each runs its course
        # Sampled with a seed: a random model's greedy text is one token repeated, which shows nothing.
        return ChatJob(messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                       max_tokens_explicit=True, temperature=1.0, seed=5, n=n, logit_bias={2: -100.0})

    async def run():
        alone = await replica.generate(ask("hi", 9, n=2))
        return alone, *await asyncio.gather(replica.generate(ask("hello there", 3)), replica.generate(ask("hi", 9, n=2)))

    alone, short, long = asyncio.run(run())
    assert [c.completion_tokens for c in short.choices] == [3]
    assert [c.completion_tokens for c in long.choices] == [9, 9]
    # Left-padded beside a longer prompt, copied for its two choices, and kept on after its
    # batch-mate left: the same seeded text as alone (the conv states masked and selected).
    assert [c.text for c in long.choices] == [c.text for c in alone.choices]
    assert long.choices[0].text != long.choices[1].text


def test_a_newcomer_whose_merge_runs_out_of_memory_leaves_the_batch_as_it_was(replica, monkeypatch):
    """Merging a newcomer's rows makes each layer's new room in turn; when the second layer's
    fails (out of GPU memory), the first gives the newcomer's rows back: the newcomer gets the
    error and the running request its usual text."""
    from serve_app.kv_cache import ReservedLayer

    real_rooms, appended = ReservedLayer.rooms_for, []

    def rooms_for(self, joining, pad_mine):
        appended.append(self)
        if len(appended) == 2:
            raise InjectedFailure("out of memory")
        return real_rooms(self, joining, pad_mine)

    async def run():
        alone = await replica.generate(job("hello there", max_tokens=24))
        steps = (await replica.stats())["decode_steps"]
        running = asyncio.ensure_future(replica.generate(job("hello there", max_tokens=24)))
        async with asyncio.timeout(60):
            while (await replica.stats())["decode_steps"] < steps + 3:  # it is decoding now
                await asyncio.sleep(0.005)
        monkeypatch.setattr(ReservedLayer, "rooms_for", rooms_for)
        newcomer = await asyncio.gather(replica.generate(job("a longer prompt than that one")),
                                        return_exceptions=True)
        return alone, await running, newcomer[0]

    alone, survivor, failed = asyncio.run(run())
    assert injected(failed) and len(appended) == 2
    assert survivor.choices[0].text == alone.choices[0].text


def test_newcomers_are_prefilled_within_the_token_budget(models_dir):
    """Newcomers whose padded prompts exceed `max_prefill_tokens` are prefilled over several
    passes (the prefill's memory peak stays bounded); each still gets its own text."""
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": str(models_dir / "tiny-llama"),
                                             "max_prefill_tokens": 40})
    replica = ChatModel.func_or_class(config)
    widths: list[int] = []
    model = replica._batch.model

    def forward(**inputs):
        if inputs["input_ids"].shape[1] > 1:  # a prefill
            widths.append(inputs["input_ids"].numel())
        return model(**inputs)

    replica._batch.model = forward
    prompts = ["one two three four", "five six seven eight", "nine ten eleven twelve"]

    async def run():
        alone = [await replica.generate(job(p, max_tokens=4)) for p in prompts]
        widths.clear()
        return alone, await asyncio.gather(*(replica.generate(job(p, max_tokens=4)) for p in prompts))

    alone, together = asyncio.run(run())
    lengths = [len(replica._slot(job(p)).prompt_ids) for p in prompts]
    assert 2 * max(lengths[:2]) <= 40 < 3 * max(lengths), lengths  # two fit the budget, three do not
    assert widths == [2 * max(lengths[:2]), lengths[2]], (lengths, widths)
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]


def test_a_row_whose_logits_are_not_numbers_fails_alone(replica):
    """fp16 overflow gives NaN logits, from which sampling draws garbage without an error: that
    request fails (its batch-mate gets its usual text), rather than answering nonsense."""
    from serve_app.errors import NotANumber

    model = replica._batch.model

    def forward(**inputs):
        output = model(**inputs)
        if inputs["input_ids"].shape[0] == 2:  # both requests decoding: the second row overflows
            output.logits[1] = float("nan")
        return output

    async def run():
        alone = await replica.generate(job("hello there", max_tokens=8))
        replica._batch.model = forward
        return alone, await asyncio.gather(replica.generate(job("hello there", max_tokens=8)),
                                           replica.generate(job("break", max_tokens=8)), return_exceptions=True)

    alone, (survivor, failed) = asyncio.run(run())
    assert isinstance(failed, NotANumber) and "set dtype" in str(failed)
    assert survivor.choices[0].text == alone.choices[0].text
    # The client is told what happened (a 500 of its own), not the generic "Internal server error".
    error = as_api_error(failed)
    assert (error.status_code, error.code) == (500, "model_output_not_a_number") and "NaN" in error.message


def test_a_custom_tool_call_in_the_history_reaches_the_template_as_it_came():
    """OpenAI's newer custom tools: `{"type": "custom", "custom": {"name", "input"}}` calls in an
    assistant turn are read (a 400 before), their free-text input passed as it came."""
    from pydantic import ValidationError

    from serve_app.protocol import ChatMessage
    from serve_app.translate import template_message

    message = ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "grep", "input": "needle *.py"}},
        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]})
    assert template_message(message)["tool_calls"] == [
        {"id": "c1", "type": "custom", "custom": {"name": "grep", "input": "needle *.py"}},
        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    with pytest.raises(ValidationError, match="needs its custom object"):
        ChatMessage.model_validate({"role": "assistant", "tool_calls": [{"id": "c", "type": "custom"}]})
    with pytest.raises(ValidationError, match="needs its function object"):
        ChatMessage.model_validate({"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]})


@pytest.mark.parametrize("rope, expected", [
    (None, 64),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256),  # Qwen2.5's card, at 1/512 scale
    ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4}, 160),  # DeepSeek's style
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}, 64),  # already extended
    ({"rope_type": "linear", "factor": 4.0}, 64)])
def test_yarn_scaling_extends_the_context(rope, expected):
    """A checkpoint extended by YaRN in `rope_scaling` alone takes original x factor positions
    (vLLM's reading): its long conversations were refused as over the original context."""
    from types import SimpleNamespace

    from transformers import Qwen2Config

    from serve_app.chat_engine import context_length

    config = Qwen2Config(max_position_embeddings=64, **({"rope_scaling": rope} if rope else {}))
    assert context_length(SimpleNamespace(config=config)) == expected


def test_a_repetition_penalty_request_keeps_its_own_text_in_a_batch(replica):
    """`repetition_penalty` reaches the model's sampling through the request (greedy here): it
    changes the answer, which is the same alone and beside an unpenalized request."""
    import dataclasses

    plain = job("otter otter otter", max_tokens=16)
    penalized = dataclasses.replace(plain, repetition_penalty=2.0)

    async def run():
        alone = await replica.generate(penalized)
        together = await asyncio.gather(replica.generate(penalized), replica.generate(plain))
        return alone, together

    alone, (batched, unpenalized) = asyncio.run(run())
    assert batched.choices[0].text == alone.choices[0].text != unpenalized.choices[0].text


def test_openai_legacy_function_calling_in_the_history_reads_as_tool_calls():
    """OpenAI's older function calling: an assistant's `function_call` reaches the template as
    its one tool call, and the `function` message answering it as that call's result (a tool
    message with the call's id, which templates that pair them need)."""
    from serve_app.protocol import ChatMessage
    from serve_app.translate import template_messages

    history = [ChatMessage.model_validate(m) for m in (
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"role": "function", "name": "weather", "content": "18C"})]
    user, assistant, result = template_messages(history)
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert assistant["tool_calls"] == [{"id": "call00001", "type": "function",
                                        "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    assert result == {"role": "tool", "content": "18C", "name": "weather", "tool_call_id": "call00001"}


def test_a_mistral_models_template_gets_nine_character_call_ids(replica):
    """Mistral's chat templates refuse any other length: a conversation whose ids are longer
    (another model's, OpenAI's) reaches a `tool_call_parser: mistral` model's template with
    each id's last nine characters, in the call and in its result alike, as vLLM hands it over."""
    body = {"model": "m", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0123456789abcdefXYZ", "type": "function",
                                                               "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_0123456789abcdefXYZ", "content": "sunny"},
        {"role": "assistant", "content": None, "function_call": {"name": "w", "arguments": "{}"}},
        {"role": "function", "name": "w", "content": "rain"}]}
    request = ChatCompletionRequest.model_validate(body)
    mistral = replica.config.model_copy(update={"tool_call_parser": "mistral"})
    _, call, result, legacy, legacy_result = chat_job(request, mistral, RequestLimits()).messages
    assert call["tool_calls"][0]["id"] == result["tool_call_id"] == "abcdefXYZ"
    assert legacy["tool_calls"][0]["id"] == legacy_result["tool_call_id"] == "call00003"
    assert chat_job(request, replica.config, RequestLimits()).messages[1]["tool_calls"][0]["id"] == \
        "call_0123456789abcdefXYZ"  # other models' templates get ids as they came
    no_id = ChatCompletionRequest.model_validate({**body, "messages": [body["messages"][0], {
        "role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w"}}]}]})
    assert chat_job(no_id, mistral, RequestLimits()).messages[1]["tool_calls"][0]["id"] is None  # as it came


@pytest.mark.parametrize("fields, param", [
    ({"function_call": {"name": "weather"}}, "function_call"),  # a function tools does not define
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "weather", "parameters": {"type": "object"}}]}, "functions"),  # the model would never see them
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio")])
def test_asking_for_what_this_server_never_does_is_a_400_not_ignored(fields, param):
    """A forced call to a function the request does not define (the older `tool_choice`) or an
    answer in audio cannot be made: refused, naming the parameter. `function_call: "auto"` and text-only
    `modalities` are what this server does anyway, so they pass."""
    from pydantic import ValidationError

    from serve_app.http_errors import validation_error
    from serve_app.protocol import ChatCompletionRequest

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({**base, **fields})
    error = validation_error(refused.value)
    assert (error.status_code, error.param) == (400, param) and any(word in error.message for word in ("text", "weather", "tools"))
    ChatCompletionRequest.model_validate({**base, "function_call": "auto", "modalities": ["text"], "audio": None,
                                          "functions": None})


def test_top_logprobs_name_the_same_tied_tokens_whatever_the_batch_asks():
    """A row's `top_logprobs: 2` names the same tokens alone and beside a row asking for 20, even
    where many tokens share its cut's value (as in a bf16 checkpoint): the lowest ids, best first."""
    from serve_app.chat_engine import _position_logprobs

    def asking(k):
        return SimpleNamespace(decoder=SimpleNamespace(top_logprobs=k))

    torch.manual_seed(0)
    scores = torch.randn(3, 4000).to(torch.bfloat16).float()  # bf16-rounded: runs of equal values
    scores[:, 100:140] = 5.0  # forty tokens tie for the best
    scores[1, 3000], scores[2, 3990] = 6.0, 6.0  # one token above the tie
    logprobs = torch.log_softmax(scores, dim=-1)
    chosen = torch.zeros(3, dtype=torch.long)
    for row in range(3):
        alone = _position_logprobs(logprobs[row:row + 1], chosen[:1], [0], [asking(2)])[0][1]
        beside = _position_logprobs(logprobs, chosen, [0, 1, 2], [asking(20), asking(20), asking(20)])
        shared = _position_logprobs(logprobs[[row, (row + 1) % 3]], chosen[:2], [0, 1], [asking(2), asking(20)])[0][1]
        assert alone == shared, (alone, shared)
        expected_ids = ([100, 101] if row == 0 else [3000 if row == 1 else 3990, 100])
        assert [token for token, _ in alone] == expected_ids
        assert [token for token, _ in beside[row][1]][:len(expected_ids)] == expected_ids


def test_a_token_the_model_rules_out_reports_a_finite_logprob():
    """JSON has no -Infinity (pydantic would write null, which OpenAI's client rejects): such a
    token reports -9999.0, as vLLM and OpenAI report it."""
    from serve_app.jobs import TokenAlternative, TokenLogprob
    from serve_app.translate import choice_logprobs

    entry = TokenLogprob(token="a", logprob=float("-inf"), bytes=[97],
                         top=[TokenAlternative(token="a", logprob=float("-inf"), bytes=[97])])
    wire = json.loads(choice_logprobs([entry]).model_dump_json())
    assert wire["content"][0]["logprob"] == -9999.0 and wire["content"][0]["top_logprobs"][0]["logprob"] == -9999.0


def test_the_prefill_budget_never_holds_back_newcomers_of_a_cache_that_cannot_merge(models_dir, tmp_path):
    """A recurrent model's newcomers cannot join a running batch: over-budget ones would wait
    for the whole batch to finish, so they are all prefilled together instead."""
    replica = ChatModel.func_or_class(ChatModelConfig.model_validate(
        {"name": "h", "kind": "chat", "path": str(tiny_lfm2(models_dir, tmp_path)), "max_prefill_tokens": 1}))
    prefills: list[int] = []
    model = replica._batch.model

    def forward(**inputs):
        if inputs["input_ids"].shape[1] > 1:
            prefills.append(inputs["input_ids"].shape[0])
        return model(**inputs)

    replica._batch.model = forward

    async def run():
        await replica.generate(job("first", max_tokens=2))  # shows the cache cannot merge
        prefills.clear()
        return await asyncio.gather(*(replica.generate(job(p, max_tokens=2)) for p in ("a", "b c", "d e f")))

    asyncio.run(run())
    assert prefills == [3]


def test_max_tokens_defaults_from_the_config_and_fits_the_context(replica):
    """No max_tokens: the config's `default_max_tokens`, or what the context has room for
    after a long conversation (the answer then ends with `length`); an explicit max_tokens
    the context cannot hold is the client's 400, naming the parameter it used."""
    def request(content: str, **fields) -> ChatJob:
        return chat_job(ChatCompletionRequest.model_validate({
            "model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "logit_bias": {str(token): -100 for token in replica.eos_ids}, **fields}), replica.config, RequestLimits())

    def prompt_length(words: int) -> int:
        return len(replica._slot(request("otter " * words)).prompt_ids)

    per_100_words = prompt_length(101) - prompt_length(1)
    words = 1 + (replica.context_length - 30 - prompt_length(1)) * 100 // per_100_words  # about 30 tokens short
    long = request("otter " * words)
    prompt = len(replica._slot(long).prompt_ids)
    assert replica.context_length - 60 < prompt < replica.context_length

    async def run():
        return (await replica.generate(request("hi")), await replica.generate(long),
                await replica.generate(request("otter " * words, max_completion_tokens=1000)),
                await replica.generate(request("otter " * words, min_tokens=100)))

    short, fitted, refused, too_few = asyncio.run(run())
    assert short.choices[0].completion_tokens == replica.config.default_max_tokens
    assert short.choices[0].finish_reason == "length"
    assert fitted.prompt_tokens == prompt and fitted.choices[0].completion_tokens == replica.context_length - prompt
    assert fitted.choices[0].finish_reason == "length"
    assert isinstance(refused, InvalidRequest) and refused.code == "context_length_exceeded"
    assert refused.param == "max_completion_tokens"
    # min_tokens past the room left could only end at the context's end, short of what it asks.
    assert isinstance(too_few, InvalidRequest) and too_few.code == "context_length_exceeded"
    assert too_few.param == "min_tokens"


@pytest.mark.parametrize("interval, messages", [(0.0, "one a step"), (1.0, "first, then coalesced")])
def test_a_stream_sends_its_first_tokens_at_once_and_coalesces_the_rest(models_dir, interval, messages):
    """`stream_interval_s`: 0 sends each step's tokens as one message; a longer interval sends
    the first tokens at once and then at most one message per interval, each carrying every
    token made meanwhile. The text is the same either way."""
    replica = ChatModel.func_or_class(ChatModelConfig.model_validate(
        {"name": "m", "kind": "chat", "path": str(models_dir / "tiny-llama"), "stream_interval_s": interval}))
    ask = ChatJob(messages=[{"role": "user", "content": "hi"}], max_tokens=24, max_tokens_explicit=True,
                  temperature=0, logit_bias={token: -100.0 for token in replica.eos_ids})

    async def run():
        started, chunks = time.monotonic(), []
        async for chunk in replica.generate_stream(ask):
            chunks.append((time.monotonic() - started, chunk))
        return chunks, await replica.generate(ask)

    chunks, whole = asyncio.run(run())
    text = "".join(delta.text for _, chunk in chunks for delta in chunk.deltas)
    assert text == whole.choices[0].text and chunks[-1][1].completion_tokens == 24
    if interval == 0:
        assert len(chunks) >= 12  # a message a step (a step's text may be held back: part of a character)
    else:
        # The first token at once, then at most one message per interval (on a slow machine the 24
        # tokens may take more than one), each at least an interval after the one before.
        elapsed = chunks[-1][0] - chunks[0][0]
        assert 2 <= len(chunks) <= 1 + math.ceil(elapsed / interval) and chunks[0][1].completion_tokens == 1
        assert all(later - earlier >= interval * 0.9 for (earlier, _), (later, _) in zip(chunks, chunks[1:]))
        assert chunks[-1][1].deltas[0].finish_reason == "length"


def test_a_streamed_chunks_running_token_count_is_of_the_tokens_sent_so_far(models_dir):
    """Each chunk's completion_tokens (vLLM's continuous_usage_stats shows it) counts the
    tokens sent up to and with it, never one the worker has already made for the next step:
    here each step's delivery waits 50 ms after its tokens are counted, and the client takes
    70 ms over each chunk, so it asks for the next while the step after it is counted."""
    from serve_app.chat_engine import DecodeBatch

    replica = ChatModel.func_or_class(ChatModelConfig.model_validate(
        {"name": "m", "kind": "chat", "path": str(models_dir / "tiny-llama"), "stream_interval_s": 0}))
    ask = ChatJob(messages=[{"role": "user", "content": "hi"}], max_tokens=10, max_tokens_explicit=True,
                  temperature=0, logprobs=True, top_logprobs=0, logit_bias={token: -100.0 for token in replica.eos_ids})
    real_tick = DecodeBatch.tick

    def slow_tick(self, joining):
        deltas = real_tick(self, joining)
        time.sleep(0.05)  # counted, not yet delivered
        return deltas

    async def run():
        sent, seen = 0, []
        async for chunk in replica.generate_stream(ask):
            sent += sum(len(delta.logprobs or []) for delta in chunk.deltas)  # one entry a token
            seen.append((chunk.completion_tokens, sent))
            await asyncio.sleep(0.07)
        return seen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DecodeBatch, "tick", slow_tick)
        seen = asyncio.run(run())
    assert len(seen) >= 3 and all(counted == sent for counted, sent in seen), seen
    assert seen[-1] == (10, 10)


def test_a_decode_step_that_hangs_fails_the_health_check_until_it_moves_again(models_dir):
    """A hung GPU raises nothing: the forward pass just never returns. Once a step has gone
    `stall_timeout_s` without returning, the replica fails Serve's health check (so Serve
    replaces it) and refuses new requests with a 503 a client may retry; a step that
    finishes after all clears both."""
    import threading

    replica = ChatModel.func_or_class(ChatModelConfig.model_validate(
        {"name": "m", "kind": "chat", "path": str(models_dir / "tiny-llama"), "deployment": {"stall_timeout_s": 2}}))
    real_model, release = replica._batch.model, threading.Event()

    def hanging_forward(**inputs):
        release.wait(timeout=60)
        return real_model(**inputs)

    async def run():
        replica._batch.model = hanging_forward
        stuck = asyncio.ensure_future(replica.generate(job("hello", max_tokens=3)))
        await asyncio.sleep(0.1)
        replica.check_health()  # a step may take a while
        await asyncio.sleep(2.1)
        with pytest.raises(RuntimeError, match=r"no progress for \d+ s \(stall_timeout_s: 2\)"):
            replica.check_health()
        refused = await replica.generate(job("hello"))
        replica._batch.model = real_model
        release.set()
        return refused, await stuck

    refused, answered = asyncio.run(run())
    assert isinstance(refused, Overloaded) and refused.code == "replica_failed", refused
    assert answered.choices[0].completion_tokens == 3
    replica.check_health()
    assert replica._worker.stalled_for() == 0.0  # idle


@pytest.mark.parametrize("kind", ["chat", "image"])
def test_a_model_folder_missing_on_the_node_is_said_as_such(tmp_path, kind):
    """Not transformers' "Repo id must be in the form 'repo_name'", which is how it reads a
    folder that is not there: the replica's failure (in `serve status`) says what is wrong."""
    from serve_app.config import ImageModelConfig
    from serve_app.image_model import ImageModel

    fields = {"name": "m", "kind": kind, "path": "./no-such-folder"}
    config = (ChatModelConfig if kind == "chat" else ImageModelConfig).model_validate(fields)
    with pytest.raises(FileNotFoundError, match=r"model 'm': its path /\S+/no-such-folder does not exist on this node"):
        (ChatModel if kind == "chat" else ImageModel).func_or_class(config)


def _ref_chain(depth: int) -> dict:
    """A JSON schema whose grammar recurses `depth` levels: each $def's one property the next."""
    defs = {str(i): {"properties": {"a": {"$ref": f"#/$defs/{i + 1}"}}} for i in range(depth)}
    return {"$ref": "#/$defs/0", "$defs": {**defs, str(depth): {"type": "string"}}}


def test_costly_or_deep_grammars_are_refused_before_any_model_work(replica):
    """From a security review: a 20 KB regex took 10 s to compile (on the replica's event loop,
    every stream held), and a 50 KB schema chaining 1,000 $refs crashed the replica's process
    (the compiler's recursion overflowed its thread's stack). Each regular expression a request
    writes is within `limits.max_regex_chars` (a regex, a Lark grammar, a schema's patterns) and
    the grammar as compiled within `limits.max_grammar_chars`, refused at the ingress (400s
    naming the field), before any model work."""
    limits = RequestLimits()

    def refused(**fields) -> InvalidRequest:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
        with pytest.raises(InvalidRequest) as raised:
            chat_job(ChatCompletionRequest.model_validate(body), replica.config, limits)
        return raised.value

    long_regex = ".?" * (limits.max_regex_chars // 2 + 1)
    assert refused(structured_outputs={"regex": long_regex}).param == "structured_outputs.regex"
    assert refused(guided_grammar=f'start: "a" | /{long_regex}/\n').param == "guided_grammar"
    # llguidance reads a schema's own x-guidance: its whitespace_pattern is a regex too (from a review).
    guided = {"type": "object", "x-guidance": {"whitespace_pattern": long_regex}}
    assert refused(structured_outputs={"json": guided}).param == "structured_outputs.json"
    deep_pattern = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string",
                                                                                      "pattern": long_regex}}}}
    error = refused(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": deep_pattern}})
    assert error.param == "response_format" and "regular expression of 4098 characters" in error.message
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "patternProperties": {long_regex: {"type": "string"}}}}}
    assert refused(tools=[tool], tool_choice="required").param == "tools"
    too_deep = refused(structured_outputs={"json": _ref_chain(1320)})
    assert too_deep.param == "structured_outputs.json" and "grammar it makes is" in too_deep.message
    # Within the limits, the same shapes pass: a long grammar of short regexes, and data that only
    # looks like a pattern (a const, an enum value).
    lark = "start: item+\n" + "".join(f'item{i}: /[a-c]{{{i % 9 + 1}}}/ | "w{i}"\n' for i in range(400))
    data = {"type": "object", "properties": {"k": {"const": {"pattern": long_regex}},
                                             "e": {"enum": [{"pattern": long_regex}]}}}
    for fields in ({"structured_outputs": {"regex": "[a-c]{2}"}}, {"guided_grammar": lark},
                   {"structured_outputs": {"json": data}}):
        assert len(lark) > limits.max_regex_chars
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
        assert chat_job(ChatCompletionRequest.model_validate(body), replica.config, limits).grammar is not None


def test_grammars_compile_on_the_replicas_grammar_thread_and_the_deepest_allowed_does(replica, monkeypatch):
    """A request's grammar is compiled on the replica's one grammar thread (never on its event
    loop), whose stack takes the deepest schema `limits.max_grammar_chars` lets through: on a
    thread's default 8 MiB, llguidance's recursion through it killed the process."""
    import threading

    compiled_on: list[str] = []
    compile_grammars = replica.grammars.grammars

    def recording(*args, **kwargs):
        compiled_on.append(threading.current_thread().name)
        return compile_grammars(*args, **kwargs)

    monkeypatch.setattr(replica.grammars, "grammars", recording)
    limits = RequestLimits()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "structured_outputs": {"json": _ref_chain(1290)}}
    job = chat_job(ChatCompletionRequest.model_validate(body), replica.config, limits)
    assert limits.max_grammar_chars * 0.9 < len(job.grammar) <= limits.max_grammar_chars
    result = asyncio.run(replica.generate(job))
    assert isinstance(result, ChatResult)
    assert compiled_on and all(name.startswith("grammar compiler") for name in compiled_on)
