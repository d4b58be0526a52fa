"""The decode loop behind chat: many requests share each forward pass.

`generate()` from transformers runs one request's sampling settings and one
global RNG per call, so requests batched through it could neither keep their
own `temperature`/`top_p`/penalties nor reproduce their `seed`. This loop
keeps everything per row instead: each choice of each request is one row of
the batch, with its own sampling parameters, its own `torch.Generator` and
its own `ChoiceDecoder`; rows are left-padded, with position ids counted from
their first real token, so a row sees exactly what it would see alone.
A row leaves the batch (and its KV cache rows are dropped) the step it
finishes or its client goes away.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field

import torch

from serve_app.jobs import ChatChoiceResult, ChatJob, ChoiceDelta


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
            return ""
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


@dataclass
class Row:
    """One choice of one request: its sampling settings, RNG and decoder."""

    decoder: ChoiceDecoder
    generator: torch.Generator
    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    presence: float
    frequency: float
    counts: dict[int, int] = field(default_factory=dict)

    def pick(self, logits: torch.Tensor) -> int:
        """Choose the next token from this row's logits (1-D, float32)."""
        if self.presence or self.frequency:
            for token, count in self.counts.items():
                logits[token] -= self.frequency * count + self.presence
        if self.greedy:
            token = int(torch.argmax(logits))
        else:
            logits = logits / max(self.temperature, 1e-5)
            if 0 < self.top_k < logits.shape[-1]:
                kth = torch.topk(logits, self.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if self.top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                outside = torch.cumsum(ordered, dim=-1) - ordered > self.top_p
                probs = probs.index_fill(0, order[outside], 0.0)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


@dataclass
class Slot:
    """One request in flight: its prompt, its rows, and whether its client is still there."""

    job: ChatJob
    prompt_ids: torch.Tensor  # 1-D
    rows: list[Row]
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.cancelled or all(row.decoder.finish_reason is not None for row in self.rows)


def make_rows(job: ChatJob, defaults, decoders: list[ChoiceDecoder]) -> list[Row]:
    """Rows for a job; omitted parameters keep the checkpoint's `generation_config` defaults."""
    sample = bool(defaults.do_sample) if job.temperature is None and job.top_p is None else job.temperature != 0
    seed = job.seed if job.seed is not None else secrets.randbits(62)
    return [Row(decoder=decoder,
                generator=torch.Generator().manual_seed(seed + index),
                greedy=not sample,
                temperature=job.temperature if job.temperature is not None else (defaults.temperature or 1.0),
                top_p=job.top_p if job.top_p is not None else (defaults.top_p or 1.0),
                top_k=(defaults.top_k or 0) if job.temperature is None else 0,
                presence=job.presence_penalty or 0.0,
                frequency=job.frequency_penalty or 0.0)
            for index, decoder in enumerate(decoders)]


class DecodeBatch:
    """A batch of slots decoded together: prefill once, then one forward pass per step."""

    def __init__(self, model, slots: list[Slot], pad_id: int, device: torch.device) -> None:
        self.model, self.slots, self.device = model, slots, device
        self.owners = [(slot, row) for slot in slots for row in slot.rows]
        prompts = [slot.prompt_ids for slot, _ in self.owners]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = prompt
            mask[i, width - len(prompt):] = 1
        self.mask = mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = None
        self.next_input = ids.to(device)
        # transformers 5.x renamed `past_key_values` to `cache`; older releases know only the former.
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def done(self) -> bool:
        return not self.owners

    @torch.inference_mode()
    def step(self) -> list[tuple[Slot, int, str]]:
        """One forward pass for every live row; returns (slot, row index, new text) per row."""
        self._drop_finished()
        if self.done:
            return []
        positions = self.positions if self.cache is None else self.positions[:, -1:]
        output = self.model(input_ids=self.next_input, attention_mask=self.mask, position_ids=positions,
                            use_cache=True, **{self.cache_argument: self.cache})
        self.cache = output.get("cache", None) or output.past_key_values
        logits = output.logits[:, -1, :].float()
        tokens, deltas = [], []
        for i, (slot, row) in enumerate(self.owners):
            token = row.pick(logits[i].clone())
            tokens.append(token)
            deltas.append((slot, slot.rows.index(row), row.decoder.feed(token)))
        self.next_input = torch.tensor(tokens, device=self.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        return deltas

    def _drop_finished(self) -> None:
        """Rows whose choice ended, or whose client left, stop costing compute now."""
        keep = [i for i, (slot, row) in enumerate(self.owners)
                if not slot.cancelled and row.decoder.finish_reason is None]
        if len(keep) == len(self.owners):
            return
        self.owners = [self.owners[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        if self.cache is not None:
            self.cache.batch_select_indices(index)
        self.next_input, self.mask, self.positions = (
            self.next_input[index], self.mask[index], self.positions[index])


def deltas_by_slot(slots: list[Slot], deltas: list[tuple[Slot, int, str]]) -> dict[int, list[ChoiceDelta]]:
    """Group one step's row deltas by slot; a choice's last delta carries its finish_reason."""
    grouped: dict[int, list[ChoiceDelta]] = {id(slot): [] for slot in slots}
    for slot, index, text in deltas:
        reason = slot.rows[index].decoder.finish_reason
        if text or reason is not None:
            grouped[id(slot)].append(ChoiceDelta(index, text, reason))
    return grouped


def merge_deltas(deltas: list[ChoiceDelta]) -> list[ChoiceDelta]:
    """Coalesced deltas as one per choice (text joined, the last finish_reason kept)."""
    merged: dict[int, ChoiceDelta] = {}
    for delta in deltas:
        before = merged.get(delta.index)
        merged[delta.index] = delta if before is None else ChoiceDelta(
            delta.index, before.text + delta.text, delta.finish_reason or before.finish_reason)
    return [merged[index] for index in sorted(merged)]
