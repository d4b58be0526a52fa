"""Chat model deployment: a transformers causal LM behind `generate`.

The replica loads the tokenizer and model once with `from_pretrained` (a local
folder or a hub id, exactly as for any checkpoint), formats the conversation
with the tokenizer's own chat template and runs `model.generate` on the
replica's worker thread (see `ModelReplica`).
"""

from __future__ import annotations

import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from serve_app.config import ChatModelConfig
from serve_app.errors import InvalidRequest
from serve_app.jobs import ChatChoiceResult, ChatJob, ChatResult
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
        """Run one chat completion without blocking the replica's event loop."""
        return await self.run_on_worker(self._generate, job)

    def _generate(self, job: ChatJob) -> ChatResult:
        prompt = self.tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        prompt_length = int(inputs["input_ids"].shape[1])
        max_new_tokens = self._fit_to_context(prompt_length, job)
        if job.seed is not None:
            torch.manual_seed(job.seed)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self._sampling(job, prompt_length, max_new_tokens))
        choices = [self._choice(row[prompt_length:], job, max_new_tokens) for row in output]
        return ChatResult(choices=choices, prompt_tokens=prompt_length)

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
        kwargs: dict = {"max_new_tokens": max_new_tokens, "num_return_sequences": job.n,
                        "pad_token_id": self.pad_id}
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

    def _choice(self, generated: torch.Tensor, job: ChatJob, max_new_tokens: int) -> ChatChoiceResult:
        """Decode one sequence and say truthfully why it ended."""
        tokens = generated.tolist()
        end = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        if end is not None:
            tokens, finish, used = tokens[:end], "stop", end + 1
        else:
            while tokens and tokens[-1] == self.pad_id:  # a sibling sequence ran longer
                tokens.pop()
            used = len(tokens)
            finish = "length" if used >= max_new_tokens else "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=None)
        if cut is not None:
            text, finish = text[:cut], "stop"
        return ChatChoiceResult(text=text, finish_reason=finish, completion_tokens=used)
