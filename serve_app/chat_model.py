"""Chat model deployment: a transformers causal LM behind `generate`.

The replica loads the tokenizer and model once with `from_pretrained` (a local
folder or a hub id, exactly as for any checkpoint), formats the conversation
with the tokenizer's own chat template and runs `model.generate` on the
replica's worker thread (see `ModelReplica`). Both the plain and the streamed
answer go through one `ChoiceDecoder` per choice, so stop strings, end of
sequence and token counts are decided the same way in both.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

import torch
from ray import serve
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from serve_app.config import ChatModelConfig
from serve_app.errors import InvalidRequest
from serve_app.jobs import ChatChoiceResult, ChatJob, ChatResult, ChatStreamChunk, ChoiceDelta
from serve_app.placement import ModelReplica


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated so far.

    transformers' `repetition_penalty` is multiplicative and also counts the
    prompt; OpenAI subtracts `presence * [count > 0] + frequency * count` for
    the completion's own tokens, which is what clients tune for.
    """

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class StopWhenCancelled(StoppingCriteria):
    """Ends generation at the next step once the request is gone (client disconnected)."""

    def __init__(self, cancelled: threading.Event) -> None:
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class QueueStreamer(BaseStreamer):
    """Hands each step's new tokens (one per sequence) from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first echoes the prompt
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class ChoiceDecoder:
    """Turns one choice's tokens into text deltas, and decides truthfully why it ended.

    Text that may still become a stop string, or half a UTF-8 character, is
    held back until it is known to be safe to send.
    """

    def __init__(self, tokenizer, eos_ids: set[int], stop: list[str], max_tokens: int) -> None:
        self.tokenizer, self.eos_ids, self.stop, self.max_tokens = tokenizer, eos_ids, stop, max_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.used = 0
        self.finish_reason: str | None = None

    def feed(self, token: int) -> str:
        """Add one token; returns the text that may be sent now."""
        if self.finish_reason is not None:
            return ""  # padding after this sequence ended
        self.used += 1
        if token in self.eos_ids:
            return self._finish("stop")
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.text = self.text[:cut]
            return self._finish("stop")
        if self.used >= self.max_tokens:
            return self._finish("length")
        safe = len(self.text) - self._unsafe_tail()
        delta, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return delta

    def close(self) -> str:
        """Generation ended without a reason seen here (e.g. the context filled up)."""
        if self.finish_reason is not None:
            return ""
        return self._finish("length" if self.used >= self.max_tokens else "stop")

    def result(self) -> ChatChoiceResult:
        return ChatChoiceResult(text=self.text, finish_reason=self.finish_reason or "stop",
                                completion_tokens=self.used)

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def _unsafe_tail(self) -> int:
        if self.text.endswith("\ufffd"):
            return 1
        return max((k for s in self.stop for k in range(len(s) - 1, 0, -1)
                    if self.text.endswith(s[:k])), default=0)


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
        self.log_loaded()

    async def generate(self, job: ChatJob) -> ChatResult:
        """The whole completion at once, computed off the event loop."""
        return await self.run_on_worker(self._generate, job)

    async def generate_stream(self, job: ChatJob) -> AsyncIterator[ChatStreamChunk]:
        """The completion as it is produced: the first tokens at once, later ones
        coalesced into one message per wake-up of this loop (each message through a
        handle costs CPU, so sending per token would slow everything down)."""
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        inputs, prompt_length, max_new = self._prepare(job)
        decoders = self._decoders(job, max_new)
        run = asyncio.ensure_future(self.run_on_worker(
            self._run_generate, job, inputs, prompt_length, max_new, QueueStreamer(loop, queue), cancelled))
        try:
            finished = False
            while not finished:
                steps = [await queue.get()]
                while not queue.empty():
                    steps.append(queue.get_nowait())
                finished = steps[-1] is None
                deltas = self._feed(decoders, [s for s in steps if s is not None], close=finished)
                if deltas:
                    yield ChatStreamChunk(deltas, prompt_length, sum(d.used for d in decoders))
            await run  # surface an exception from the worker
        finally:
            cancelled.set()  # client gone or done: stop generating at the next step

    def _generate(self, job: ChatJob) -> ChatResult:
        inputs, prompt_length, max_new = self._prepare(job)
        output = self._run_generate(job, inputs, prompt_length, max_new)
        decoders = self._decoders(job, max_new)
        self._feed(decoders, output[:, prompt_length:].T.tolist(), close=True)
        return ChatResult(choices=[d.result() for d in decoders], prompt_tokens=prompt_length)

    def _prepare(self, job: ChatJob) -> tuple[dict, int, int]:
        prompt = self.tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        # One row per choice: works for sampling and greedy alike (generate() refuses
        # num_return_sequences > 1 without sampling).
        inputs = {key: value.repeat(job.n, 1).to(self.device) for key, value in inputs.items()}
        prompt_length = int(inputs["input_ids"].shape[1])
        return inputs, prompt_length, self._fit_to_context(prompt_length, job)

    def _decoders(self, job: ChatJob, max_new: int) -> list[ChoiceDecoder]:
        return [ChoiceDecoder(self.tokenizer, self.eos_ids, job.stop, max_new) for _ in range(job.n)]

    @staticmethod
    def _feed(decoders: list[ChoiceDecoder], steps: list[list[int]], *, close: bool) -> list[ChoiceDelta]:
        """Feed steps (one token per choice each) to the decoders; the non-empty deltas."""
        was_open = [decoder.finish_reason is None for decoder in decoders]
        texts = ["" for _ in decoders]
        for step in steps:
            for i, token in enumerate(step):
                texts[i] += decoders[i].feed(token)
        if close:
            for i, decoder in enumerate(decoders):
                texts[i] += decoder.close()
        return [ChoiceDelta(i, texts[i], decoder.finish_reason)
                for i, decoder in enumerate(decoders)
                if texts[i] or (was_open[i] and decoder.finish_reason is not None)]

    def _run_generate(self, job: ChatJob, inputs: dict, prompt_length: int, max_new: int,
                      streamer: BaseStreamer | None = None,
                      cancelled: threading.Event | None = None) -> torch.Tensor:
        if job.seed is not None:
            torch.manual_seed(job.seed)
        kwargs = self._sampling(job, prompt_length, max_new)
        if cancelled is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopWhenCancelled(cancelled)])
        try:
            with torch.inference_mode():
                return self.model.generate(**inputs, **kwargs, streamer=streamer)
        finally:
            if streamer is not None:
                streamer.end()  # also when generate() raised: the reader must not wait forever

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

    def _sampling(self, job: ChatJob, prompt_length: int, max_new_tokens: int) -> dict:
        """generate() arguments. Omitted parameters keep the checkpoint's own defaults."""
        kwargs: dict = {"max_new_tokens": max_new_tokens, "pad_token_id": self.pad_id}
        if job.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        elif job.temperature is not None or job.top_p is not None:
            kwargs["do_sample"] = True
            if job.temperature is not None:
                kwargs["temperature"] = job.temperature
            if job.top_p is not None:
                kwargs["top_p"] = job.top_p
        if job.stop:
            kwargs.update(stop_strings=job.stop, tokenizer=self.tokenizer)
        if job.presence_penalty or job.frequency_penalty:
            kwargs["logits_processor"] = LogitsProcessorList([OpenAIPenalties(
                prompt_length, job.presence_penalty or 0.0, job.frequency_penalty or 0.0)])
        return kwargs
