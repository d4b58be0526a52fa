"""Chat model deployment: a transformers causal LM, decoded in batches across requests.

The replica loads the tokenizer and model once with `from_pretrained` (a local
folder or a hub id, exactly as for any checkpoint) and formats each
conversation with the tokenizer's own chat template. Concurrent requests are
grouped by Ray Serve's `@serve.batch` and decoded together by `DecodeBatch`
(see `chat_engine`): one forward pass per step for every request in the
batch, each with its own sampling settings and seed. Forward passes run on
the replica's worker thread (see `ModelReplica`), off the event loop.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.chat_engine import ChoiceDecoder, DecodeBatch, Slot, deltas_by_slot, make_rows, merge_deltas
from serve_app.config import ChatModelConfig
from serve_app.errors import InvalidRequest
from serve_app.jobs import ChatJob, ChatResult, ChatStreamChunk, ChoiceDelta
from serve_app.placement import ModelReplica

COALESCE_S = 0.01
"""After a request's first tokens (sent at once), its tokens go out at most this often:
every message through a streaming handle costs CPU, so one message carries several tokens."""


@serve.deployment
class ChatModel(ModelReplica):
    """One replica of one chat model."""

    def __init__(self, config: ChatModelConfig) -> None:
        super().__init__(config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{config.path} has no chat template; chat models need one")
        self.model = AutoModelForCausalLM.from_pretrained(config.path, dtype=self.dtype).to(self.device).eval()
        generation = self.model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self._active: set[int] = set()
        self._steps = 0
        self._decode_batch.set_max_batch_size(config.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.log_loaded()

    async def generate(self, job: ChatJob) -> ChatResult:
        """The whole completion at once."""
        slot = self._slot(job)
        async for _ in self._decoded(slot):
            pass
        return ChatResult(choices=[row.decoder.result() for row in slot.rows], prompt_tokens=len(slot.prompt_ids))

    async def generate_stream(self, job: ChatJob) -> AsyncIterator[ChatStreamChunk]:
        """The completion as it is produced; the first tokens go out at once."""
        slot = self._slot(job)
        async for deltas in self._decoded(slot):
            used = sum(row.decoder.used for row in slot.rows)
            yield ChatStreamChunk(deltas, len(slot.prompt_ids), used)

    async def stats(self) -> dict[str, int]:
        """Requests in flight and decode steps so far: lets operators and tests see work stop."""
        return {"active_requests": len(self._active), "decode_steps": self._steps}

    async def _decoded(self, slot: Slot) -> AsyncIterator[list[ChoiceDelta]]:
        self._active.add(id(slot))
        try:
            async for deltas in self._decode_batch(slot):
                if deltas:
                    yield deltas
        finally:
            slot.cancelled = True  # finished, or the client left: its rows leave the batch next step
            self._active.discard(id(slot))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def _decode_batch(self, slots: list[Slot]) -> AsyncIterator[list]:
        """One batch of requests, decoded together; yields one entry per request each time."""
        batch = DecodeBatch(self.model, slots, self.pad_id, self.device)
        pending: dict[int, list[ChoiceDelta]] = {id(slot): [] for slot in slots}
        last_sent: dict[int, float] = {}
        stopped: set[int] = set()
        while not batch.done:
            grouped = deltas_by_slot(slots, await self.run_on_worker(batch.step))
            self._steps += 1
            now, out = time.monotonic(), []
            for slot in slots:
                key = id(slot)
                pending[key] += grouped[key]
                due = slot.finished or key not in last_sent or now - last_sent[key] >= COALESCE_S
                if key in stopped:
                    out.append(StopIteration)
                elif pending[key] and due:
                    out.append(merge_deltas(pending[key]))
                    pending[key], last_sent[key] = [], now
                elif slot.finished:
                    out.append(StopIteration)
                    stopped.add(key)
                else:
                    out.append([])
            yield out

    def _slot(self, job: ChatJob) -> Slot:
        """Tokenise and check a request before it joins a batch: its errors are its own."""
        prompt = self.tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        max_new = self._fit_to_context(len(prompt_ids), job)
        decoders = [ChoiceDecoder(self.tokenizer, self.eos_ids, job.stop, max_new) for _ in range(job.n)]
        return Slot(job=job, prompt_ids=prompt_ids, rows=make_rows(job, self.model.generation_config, decoders))

    def _fit_to_context(self, prompt_length: int, job: ChatJob) -> int:
        """max_tokens that fit the context: an explicit ask that does not fit is an error."""
        if self.context_length is None:
            return job.max_tokens
        room = self.context_length - prompt_length
        if room <= 0:
            raise InvalidRequest(
                f"The conversation is {prompt_length} tokens; this model's context is "
                f"{self.context_length} tokens.", param="messages", code="context_length_exceeded")
        if job.max_tokens > room and job.max_tokens_explicit:
            raise InvalidRequest(
                f"max_tokens={job.max_tokens} plus the conversation's {prompt_length} tokens exceeds "
                f"this model's context of {self.context_length} tokens.", param="max_tokens",
                code="context_length_exceeded")
        return min(job.max_tokens, room)
