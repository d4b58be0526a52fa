"""Chat model deployment: a transformers causal LM, decoded with continuous batching.

The replica loads the tokenizer and model once with `from_pretrained` (a local
folder or a hub id, exactly as for any checkpoint) and formats each
conversation with the tokenizer's own chat template. One engine loop per
replica drives a `DecodeBatch` (see `chat_engine`): each step is one forward
pass for every request in flight, requests that arrived meanwhile join
before the next step (up to `max_batch_size`), and finished or abandoned ones
leave. `@serve.batch` is not used for chat because it forms static batches:
a request arriving while a batch decodes would wait for the whole batch, or
start a second batch whose forward passes compete with the first. Forward
passes run on the replica's worker thread (see `ModelReplica`), off the event
loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections import deque
from typing import AsyncIterator

import jinja2
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.chat_engine import DecodeBatch, Slot, deltas_by_slot, merge_deltas
from serve_app.decoding import ChoiceDecoder
from serve_app.config import ChatModelConfig, require_loadable
from serve_app.errors import APIError, InvalidRequest
from serve_app.jobs import ChatJob, ChatResult, ChatStreamChunk, ChoiceDelta, prompt_chars
from serve_app.metrics import ChatEngineMetrics
from serve_app.model_replica import ModelReplica, raise_to_caller
from serve_app.placement import spread_devices, weights_device_map
from serve_app.reasoning import prompt_opening
from serve_app.sampling import SamplingDefaults, make_rows
from serve_app.structured_output import GrammarCompiler, grammar_executor
from serve_app.token_bytes import TokenBytes

logger = logging.getLogger("ray.serve")

END = object()
"""Posted to a slot's outbox after its last deltas."""


INLINE_PROMPT_CHARS = 20_000
"""Conversations longer than this are templated and tokenised off the replica's event loop."""


@serve.deployment
class ChatModel(ModelReplica):
    """One replica of one chat model."""

    metrics: ChatEngineMetrics

    def __init__(self, config: ChatModelConfig) -> None:
        super().__init__(config)
        require_loadable(config)  # said plainly, before transformers' own error
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{config.path} has no chat template; chat models need one")
        # What apply_chat_template takes as its own arguments, and the conversation's name in the
        # template: a request's chat_template_kwargs (more template variables) may not set them.
        self._template_parameters = {"messages", "conversations", "self",
                                     *inspect.signature(self.tokenizer.apply_chat_template).parameters} - {"kwargs"}
        # Straight onto the replica's device (no full copy in CPU memory first: for an 8B model in
        # bf16, 16 GB per replica loading at once on a GPU node), or spread over its GPUs.
        self.model = AutoModelForCausalLM.from_pretrained(
            config.path, dtype=self.dtype, device_map=weights_device_map(config, self.device)).eval()
        generation = self.model.generation_config
        self.sampling_defaults = SamplingDefaults.of(generation)
        # Both lists, as vLLM stops on both: some checkpoints name only the base model's end in
        # their generation config while the chat template ends a turn with the tokenizer's.
        eos = generation.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None}
        # Padding is masked, but its id is still looked up: a pad token added to the tokenizer
        # without resizing the embeddings (some fine-tunes ship that) would index past them.
        pad = self.tokenizer.pad_token_id
        embeddings = getattr(self.model.get_input_embeddings(), "num_embeddings", None)
        fits = pad is not None and pad >= 0 and (embeddings is None or pad < embeddings)
        self.pad_id = pad if fits else min(self.eos_ids)
        head = self.model.get_output_embeddings()  # the logits' width; some models name no head
        self.vocabulary = getattr(head, "out_features", None) or self.model.config.get_text_config().vocab_size
        self.token_bytes = TokenBytes(self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocabulary, self.eos_ids, config.reasoning_parser)
        # Started here, not by the first constrained request: its stack size is set process-wide while it starts.
        self._grammar_thread = grammar_executor()
        self._batch = self._new_batch()
        self.context_length = self._batch.context_length
        self._cache_merges = True  # until a prefill shows this model's cache cannot take newcomers
        self._waiting: deque[Slot] = deque()
        self._engine: asyncio.Task | None = None
        self._active: set[Slot] = set()
        self._steps = 0
        self._tokens = 0
        self.record_metrics(ChatEngineMetrics(config.name, self._load))
        self.log_loaded(spread_devices(self.model))

    async def generate(self, job: ChatJob) -> ChatResult | APIError:
        """The whole completion at once. A client's mistake (a conversation too long for the
        context, messages the chat template refuses, a schema the answer cannot follow) comes
        back as a value: raised, Serve would log it as a failed request, with a traceback, at
        ERROR."""
        try:
            slot = await self._prepared(job)
            async for _ in self._decoded(slot, coalesce_s=None):
                pass
        except APIError as refused:
            return refused
        return ChatResult(choices=[row.decoder.result() for row in slot.rows], prompt_tokens=len(slot.prompt_ids),
                          opening=slot.opening)

    async def generate_stream(self, job: ChatJob) -> AsyncIterator[ChatStreamChunk | APIError]:
        """The completion as it is produced; the first tokens go out at once. A client's
        mistake is the last item (see `generate`), the only one if found before any token."""
        try:
            slot = await self._prepared(job)
            # Every message through a streaming handle costs CPU: one message carries several tokens.
            async for deltas in self._decoded(slot, coalesce_s=self.config.stream_interval_s):
                used, thought = slot.counted
                yield ChatStreamChunk(deltas, len(slot.prompt_ids), used, slot.opening, thought)
        except APIError as refused:
            yield refused

    async def stats(self) -> dict[str, int]:
        """Requests in flight, forward passes and tokens so far: lets operators and tests see
        work stop, and how many rows the steps carried."""
        decoding, waiting = self._load()
        return {"active_requests": len(self._active), "decode_steps": self._steps, "decoded_tokens": self._tokens,
                "batch_requests": decoding, "waiting_requests": waiting}

    def _load(self) -> tuple[int, int]:
        """Requests decoding and requests waiting for room, for the metrics' gauges."""
        return self._batch.live_slots, sum(not slot.cancelled for slot in self._waiting)

    async def _decoded(self, slot: Slot, coalesce_s: float | None) -> AsyncIterator[list[ChoiceDelta]]:
        """The slot's deltas as the engine makes them, merged into one message per
        `coalesce_s` (None: none; the caller reads the whole answer from the decoders once it
        ends); raises what the engine posted."""
        self._active.add(slot)
        self._waiting.append(slot)
        if self._engine is None:
            # In a context of its own: it outlives the request that starts it, whose id Serve keeps in a
            # context variable and would stamp on every log line of the loop.
            self._engine = asyncio.get_running_loop().create_task(self._run_engine(), name="decode loop",
                                                                  context=contextvars.Context())
        try:
            last_sent, pending, ended = None, [], False
            while not ended:
                items = [await slot.outbox.get()]
                if coalesce_s and last_sent is not None:
                    await asyncio.sleep(coalesce_s - (time.monotonic() - last_sent))
                while not slot.outbox.empty():
                    items.append(slot.outbox.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise_to_caller(item)
                    if item is END:
                        ended = True
                    elif coalesce_s is not None:  # a whole answer is read from its decoders at the end
                        pending += item
                if pending:
                    yield merge_deltas(pending)
                    pending, last_sent = [], time.monotonic()
        finally:
            slot.cancelled = True  # finished, or the client left: its rows leave the batch next step
            self._active.discard(slot)

    async def _run_engine(self) -> None:
        """Step the batch while anything is in flight or waiting; admits newcomers between steps."""
        joining: list[Slot] = []
        try:
            if self.config.batch_wait_timeout_s:  # an idle replica may wait to prefill a burst together
                await asyncio.sleep(self.config.batch_wait_timeout_s)
            while True:
                joining = self._admit()
                if self._batch.done and not joining:
                    return
                try:
                    started = time.monotonic()
                    deltas = await self.run_on_worker(self._batch.tick, joining)
                except Exception as exc:  # noqa: BLE001 - a failed pass fails the requests in it, not the loop
                    logger.exception("decode step failed")
                    if self._batch.owners and not self._batch.prefilling:  # the running rows' pass failed (out
                        self._waiting.extendleft(reversed(joining))  # of memory, say) before the newcomers': they
                        joining = []  # join the next step, the failed batch's memory freed (once: it has no rows)
                    self._fail_batch(joining, exc)
                    continue
                if self._batch.merges is not None:
                    self._cache_merges = self._batch.merges
                if deltas:  # a tick that only dropped departed rows ran no forward pass
                    self.metrics.step(time.monotonic() - started)
                    self._steps += 1
                    self._tokens += len(deltas)
                self._deliver(deltas)
        except BaseException as exc:
            # Those being admitted too: out of the queue, maybe not yet in the batch.
            self._fail_batch(list(self._waiting) + joining, exc)
            self._waiting.clear()
            raise
        finally:
            self._engine = None

    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.model, self.pad_id, self.device)

    def _fail_batch(self, also: list[Slot], exc: BaseException) -> None:
        """Fail every request of the batch, and `also`, with `exc`; an empty batch takes its place.
        The failed batch (its KV cache) is let go before `released` returns memory to the GPU."""
        failed, self._batch = self._batch, self._new_batch()
        slots = also + [slot for slot, _ in failed.owners]
        del failed
        self._fail(slots, exc)

    def _admit(self) -> list[Slot]:
        """Waiting requests that join the batch now, oldest first, while their rows (one per
        choice) fit in `max_batch_size` and their padded prompts in `max_prefill_tokens`. A
        request with more choices than that runs alone."""
        if not self._batch.can_join():
            return []
        room = self.config.max_batch_size - self._batch.live_rows
        joining: list[Slot] = []
        longest = 0  # newcomers are prefilled together, each padded to the longest prompt
        while self._waiting:
            slot = self._waiting[0]
            if not slot.cancelled:
                if len(slot.rows) > room and (joining or not self._batch.done):
                    break  # it waits for room; those behind it wait too (first come, first served)
                longest = max(longest, len(slot.prompt_ids))
                # Over the budget, it joins at the next step (one prompt over it is prefilled alone);
                # where the cache cannot merge (sliding-window, recurrent layers) there is no next
                # step to join until the batch is done, so the budget does not hold it back.
                if joining and self._cache_merges and longest * (len(joining) + 1) > self.config.max_prefill_tokens:
                    break
                joining.append(slot)
                room -= len(slot.rows)
                if not slot.admitted:  # its queue time once, though a failed step put it back
                    slot.admitted = True
                    self.metrics.admitted(time.monotonic() - slot.arrived)
            self._waiting.popleft()
        return joining

    def _deliver(self, deltas: list[tuple[Slot, int, str]]) -> None:
        now = time.monotonic()
        for slot, grouped in deltas_by_slot(deltas).items():
            if slot.ended:
                continue
            if slot.error is not None:
                if isinstance(slot.error, APIError) and slot.error.status_code < 500:  # the client's mistake
                    logger.info("request refused while decoding (%s); its batch-mates go on", slot.error)
                else:
                    logger.error("request failed while decoding; its batch-mates go on", exc_info=slot.error)
                self._fail([slot], slot.error)
                continue
            self._timed(slot, now)
            slot.counted = (sum(row.decoder.used for row in slot.rows),
                            sum(row.decoder.reasoning_tokens for row in slot.rows))
            if grouped:
                slot.outbox.put_nowait(grouped)
            if slot.finished:
                slot.ended = True
                slot.outbox.put_nowait(END)
                for row in slot.rows:  # not a client's leaving, which also ends the slot
                    if row.decoder.finish_reason is not None and not slot.cancelled:
                        self.metrics.choice_finished(row.decoder.finish_reason)

    def _timed(self, slot: Slot, now: float) -> None:
        """A step gave `slot`'s rows a token: its time to first token, and once it finishes
        (not once its client leaves), its mean time per token after the first."""
        if slot.first_token_at is None:
            slot.first_token_at = now
            self.metrics.first_token(now - slot.arrived)
        slot.token_steps += 1
        if slot.finished and not slot.cancelled and slot.token_steps > 1:
            self.metrics.finished((now - slot.first_token_at) / (slot.token_steps - 1))

    def _fail(self, slots: list[Slot], exc: BaseException) -> None:
        """Each request gets the error first: nothing after that may leave one waiting."""
        for slot in dict.fromkeys(slots):  # each once, in order
            if not slot.ended:
                slot.ended = True
                slot.outbox.put_nowait(exc)
        self.released(exc)

    async def _prepared(self, job: ChatJob) -> Slot:
        """`_slot`, in a thread for a long conversation: templating and tokenising up to
        `limits.max_prompt_chars` characters takes long enough to hold up the deltas of every
        stream this replica serves. Short ones stay on the loop, where they cost less than
        the hop to a thread."""
        self.refuse_if_unhealthy()
        arrived = time.monotonic()
        if job.grammar is not None and not self.grammars.ready:  # the first constrained request: about a second
            await asyncio.to_thread(self.grammars.prepare, job.grammar_param)
        if job.grammar is not None:  # its compile may take seconds: on the replica's one grammar thread
            slot = await asyncio.get_running_loop().run_in_executor(self._grammar_thread, self._slot, job)
        elif prompt_chars(job.messages, job.tools, job.template_kwargs) > INLINE_PROMPT_CHARS:
            slot = await asyncio.to_thread(self._slot, job)
        else:
            slot = self._slot(job)
        slot.arrived = arrived
        return slot

    def _slot(self, job: ChatJob) -> Slot:
        """Tokenise and check a request before it joins a batch: its errors are its own."""
        taken = job.template_kwargs.keys() & self._template_parameters
        if taken:
            raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(sorted(taken))}: the server sets "
                                 "it (or, for tools, the request's own field does).", param="chat_template_kwargs")
        try:
            prompt = self.tokenizer.apply_chat_template(job.messages, tools=job.tools, add_generation_prompt=True,
                                                        tokenize=False, **job.template_kwargs)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
            # The template refuses these messages (roles, order, a tool call's shape), tools or
            # variables; its only inputs are the client's, so this is the client's error.
            inputs = ", ".join(["messages", *(["tools"] if job.tools else []),
                                *(["chat_template_kwargs"] if job.template_kwargs else [])])
            raise InvalidRequest(f"This model's chat template rejects the request's {inputs}: {exc}",
                                 param="chat_template_kwargs" if job.template_kwargs else "messages") from exc
        try:  # text the wire checks let through (a tool call's JSON arguments) may decode to a lone surrogate
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("The messages hold an unpaired UTF-16 surrogate (such as \\ud800), here inside "
                                 "a tool call's arguments; send valid Unicode.", param="messages") from None
        # verbose=False: no "sequence length is longer than the specified maximum" warning in the
        # operator's console for a prompt refused just below, in a line of its own.
        prompt_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
        max_new = self._fit_to_context(len(prompt_ids), job)
        if any(token >= self.vocabulary for token in job.logit_bias):
            raise InvalidRequest(f"logit_bias names a token id this model does not have (ids go up to "
                                 f"{self.vocabulary - 1}).", param="logit_bias")
        top_logprobs = job.top_logprobs if job.logprobs else None
        opening = prompt_opening(prompt) if self.config.reasoning_parser else None
        decoders = [ChoiceDecoder(self.tokenizer, self.eos_ids, job.stop, max_new, top_logprobs, self.token_bytes,
                                  job.skip_special_tokens, job.min_tokens, self.grammars.thinking(opening))
                    for _ in range(job.n)]
        grammars = None
        if job.grammar is not None:
            grammars = self.grammars.grammars(job.grammar, job.n, job.grammar_param, opening)
        return Slot(prompt_ids=prompt_ids, rows=make_rows(job, self.sampling_defaults, decoders, prompt_ids, grammars),
                    opening=opening)

    def _fit_to_context(self, prompt_length: int, job: ChatJob) -> int:
        """max_tokens that fit the context: an explicit ask that does not fit is an error."""
        if self.context_length is None:
            return job.max_tokens
        room = self.context_length - prompt_length
        if room <= 0:
            raise InvalidRequest(
                f"The conversation is {prompt_length} tokens; this model's context is "
                f"{self.context_length} tokens, which leaves no room for an answer.", param="messages",
                code="context_length_exceeded")
        if job.max_tokens > room and job.max_tokens_explicit:
            raise InvalidRequest(
                f"{job.max_tokens_param}={job.max_tokens} plus the conversation's {prompt_length} tokens "
                f"exceeds this model's context of {self.context_length} tokens.", param=job.max_tokens_param,
                code="context_length_exceeded")
        if job.min_tokens > room:  # it could only end at the context's end, short of what it asks
            raise InvalidRequest(
                f"min_tokens={job.min_tokens} plus the conversation's {prompt_length} tokens exceeds this "
                f"model's context of {self.context_length} tokens.", param="min_tokens",
                code="context_length_exceeded")
        return min(job.max_tokens, room)
