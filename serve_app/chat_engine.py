"""The decode loop behind chat: many requests share each forward pass.

`generate()` from transformers runs one request's sampling settings and one
global RNG per call, so requests batched through it could neither keep their
own `temperature`/`top_p`/penalties nor reproduce their `seed`. This loop
keeps everything per row instead: each choice of each request is one row of
the batch, with its own sampling parameters, its own `torch.Generator` and
its own `ChoiceDecoder` (`decoding`); rows are left-padded, with position ids counted from
their first real token, so a row sees exactly what it would see alone. The KV cache keeps
room ahead for the next positions (`kv_cache`), so a step does not copy it.
Requests join the running batch between steps (continuous batching) and a
row leaves it (its KV cache rows dropped) the step it finishes or its client
goes away.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serve_app import kv_cache
from serve_app.decoding import PositionLogprobs
from serve_app.errors import NotANumber
from serve_app.jobs import ChoiceDelta, TokenLogprob
from serve_app.placement import spread_devices
from serve_app.sampling import Row, SamplingPlan, choose_tokens

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel

    from serve_app.reasoning import Opening


def _position_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, rows_at: list[int],
                       rows: list[Row]) -> dict[int, PositionLogprobs]:
    """Each asking row's chosen-token log-probability and its most likely tokens, for the whole
    batch in a few tensor ops and host transfers (not two per alternative per row: on a GPU each
    is a device sync).

    One `topk` serves the batch, at the largest `top_logprobs` asked. Which of several tokens of
    equal log-probability (common in a bf16 checkpoint) a row's own cut names must not depend on
    that: ties go to the lowest token ids, and where a row's cut splits a run of equal values,
    the whole vocabulary is asked for them (rare: one more op for that row)."""
    picked = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    wants = [row.decoder.top_logprobs or 0 for row in rows]
    k = max(wants)
    if not k:
        return {at: (picked[j], []) for j, at in enumerate(rows_at)}
    values, ids = logprobs.topk(k, dim=-1)
    cuts = values.gather(1, torch.tensor([max(want, 1) - 1 for want in wants], device=values.device)[:, None])
    tied = (logprobs == cuts).sum(dim=1).tolist()  # tokens of the whole vocabulary at each row's cut
    values, ids = values.tolist(), ids.tolist()
    per_row: dict[int, PositionLogprobs] = {}
    for j, at in enumerate(rows_at):
        want = wants[j]
        top = sorted(zip(ids[j][:want], values[j][:want]), key=lambda entry: (-entry[1], entry[0]))
        if want and tied[j] > values[j][:want].count(values[j][want - 1]):
            cut = values[j][want - 1]
            above = [entry for entry in top if entry[1] > cut]
            same = torch.nonzero(logprobs[j] == cut).flatten()[:want - len(above)].tolist()
            top = above + [(token, cut) for token in same]
        per_row[at] = (picked[j], top)
    return per_row


class StepPlan:
    """What a decode step needs that depends only on the batch's rows: their `SamplingPlan`,
    and which rows want logprobs (as a list and as an index on the device; None: all)."""

    def __init__(self, owners: list[tuple[Slot, Row]], vocab: int, device: torch.device) -> None:
        rows = [row for _, row in owners]
        self.sampling = SamplingPlan(rows, vocab, device)
        self.wanting = [i for i, row in enumerate(rows) if row.decoder.wants_logprobs]
        self.wanting_index = (None if not self.wanting or len(self.wanting) == len(rows)
                              else torch.tensor(self.wanting, device=device))


@dataclass(eq=False)  # identity: a slot is one request in flight, hashable, never equal to another
class Slot:
    """One request in flight: its prompt, its rows, whether its client is still there,
    and the mailbox the engine loop posts its deltas to (then `END`, or an exception)."""

    prompt_ids: torch.Tensor  # 1-D
    rows: list[Row]
    cancelled: bool = False
    ended: bool = False
    error: Exception | None = None  # this request failed on its own (its batch-mates go on)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    # For the replica's latency metrics (time.monotonic()): arrival, first token.
    arrived: float = field(default_factory=time.monotonic)
    admitted: bool = False  # taken from the queue once (a failed step may put it back)
    first_token_at: float | None = None
    token_steps: int = 0  # steps that gave its rows a token
    opening: Opening = None  # where the prompt leaves a reasoning model's answer (`reasoning.prompt_opening`)
    # Its rows' tokens (and thinking tokens) as of the deltas posted so far: the worker counts
    # the next step's while the event loop sends these, so a running total is read from here.
    counted: tuple[int, int] = (0, 0)

    @property
    def finished(self) -> bool:
        return self.cancelled or self.error is not None or all(
            row.decoder.finish_reason is not None for row in self.rows)


class DecodeBatch:
    """The rows decoding on one replica: requests join between steps and leave when done.

    This is continuous batching: a request that arrives while others decode is
    prefilled on its own and its KV cache is merged into the running batch
    (both sides left-padded to a common length, padding masked out), so it
    starts decoding at the next step instead of waiting for the batch to
    drain. Models whose cache cannot be merged this way (sliding-window or
    recurrent layers) still batch, but new requests wait for the running
    batch to finish.
    """

    def __init__(self, model: PreTrainedModel, pad_id: int, device: torch.device,
                 kv_room_tokens: int = kv_cache.ROOM_TOKENS) -> None:
        self.model, self.pad_id, self.device = model, pad_id, device
        self.kv_room_tokens = kv_room_tokens  # 0: every step copies the cache, as `torch.cat` does
        self.context_length = context_length(model)
        # A model spread over several GPUs keeps each layer's cache on that layer's GPU; a CPU
        # index selects rows of a tensor on any device, a GPU index only on its own.
        self.row_index_device = device if len(spread_devices(model)) <= 1 else torch.device("cpu")
        self.owners: list[tuple[Slot, Row]] = []
        self.plan: StepPlan | None = None  # for `owners` as they are; rebuilt when rows join or leave
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, cached tokens + 1]: the cache and next_input
        self.positions: torch.Tensor | None = None  # [rows, 1]: position of next_input
        self.next_input: torch.Tensor | None = None  # [rows, 1]
        self.prefilling = False  # the last `tick` reached its newcomers' prefill
        # transformers 5.x renamed `past_key_values` to `cache`; older releases know only the former.
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits are used: a prefill computing all of them costs
        # prompt length x vocabulary (GiBs for a long prompt batch on a 128k-vocab model).
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    @property
    def done(self) -> bool:
        return not self.owners

    @property
    def live_slots(self) -> int:
        """Requests still decoding."""
        return len({slot for slot, _ in self.owners if not slot.finished})

    @property
    def live_rows(self) -> int:
        """Rows (choices) of the requests still decoding: what `max_batch_size` counts, as
        each holds its own KV cache."""
        return sum(1 for slot, _ in self.owners if not slot.finished)

    def can_join(self) -> bool:
        return self.done or kv_cache.mergeable(self.cache)

    @property
    def merges(self) -> bool | None:
        """Whether this model's cache takes newcomers while rows decode (None: no cache yet)."""
        return None if self.cache is None else kv_cache.mergeable(self.cache)

    @torch.inference_mode()
    def tick(self, joining: list[Slot]) -> list[tuple[Slot, int, str]]:
        """One decoding step for the running rows, then the prefill of `joining` (their first token).

        Returns (slot, row index, new text) for every row that produced a token. Should it
        raise, `prefilling` says whether `joining` had been reached: if not, they are untouched.
        """
        self.prefilling = False
        self._drop_finished()
        deltas = self._decode() if self.owners else []
        if joining:
            self.prefilling = True
            deltas += self._join(joining)
        return deltas

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache):
        output = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self.cache_argument: cache}, **self.last_logits_only)
        logits = output.logits[:, -1, :].to(device=self.device, dtype=torch.float32)  # a spread model's last GPU
        return logits, output.get("cache", None) or output.past_key_values

    def _pick(self, owners: list[tuple[Slot, Row]], logits: torch.Tensor,
              plan: StepPlan | None = None) -> tuple[torch.Tensor, list]:
        plan = plan or StepPlan(owners, logits.shape[-1], logits.device)
        # Log-probabilities of the model's own distribution, before bias, penalties and temperature.
        logprobs = None
        if plan.wanting:
            logprobs = torch.log_softmax(logits if plan.wanting_index is None else logits[plan.wanting_index], dim=-1)
        # A row whose logits are not numbers (fp16 overflow in a bf16-trained checkpoint) would
        # draw garbage with no error: it fails instead. Its token is sent as -1, in the same transfer.
        peak = logits.amax(dim=-1)  # NaN where any logit is NaN: one vectorised pass, a fraction of the argmax's
        broken = peak.isnan() | peak.isposinf()
        chosen = choose_tokens([row for _, row in owners], logits, plan.sampling)
        per_row: dict[int, PositionLogprobs] = {}
        if logprobs is not None:
            wanted = chosen if plan.wanting_index is None else chosen[plan.wanting_index]
            per_row = _position_logprobs(logprobs, wanted, plan.wanting, [owners[i][1] for i in plan.wanting])
        deltas = []
        tokens = torch.where(broken, -1, chosen).tolist()  # the step's one device sync
        for i, ((slot, row), token) in enumerate(zip(owners, tokens)):
            try:
                if token < 0:
                    raise NotANumber("the model's scores for the next token are not numbers (NaN or inf); in "
                                     "float16, checkpoints trained in bfloat16 can overflow: set dtype to "
                                     "bfloat16 or float32")
                text = row.decoder.feed(token, per_row.get(i))
                # The last token max_tokens allows is still the answer's (and may complete its JSON);
                # an end-of-sequence token or a stop string ended it before this token.
                if row.grammar is not None and row.grammar.follow(token, ended=row.decoder.finish_reason == "stop"):
                    text += row.decoder.end()  # the JSON is complete: nothing more may follow
            except Exception as exc:  # noqa: BLE001 - turning a token into text failed for this request only
                slot.error, text = slot.error or exc, ""
            deltas.append((slot, slot.rows.index(row), text))
        return chosen.unsqueeze(1), deltas

    def _decode(self) -> list[tuple[Slot, int, str]]:
        logits, self.cache = self._forward(self.next_input, self.mask, self.positions, self.cache)
        if self.plan is None:
            self.plan = StepPlan(self.owners, logits.shape[-1], logits.device)
        self.next_input, deltas = self._pick(self.owners, logits, self.plan)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.owners), 1))], dim=1)
        self.positions = self.positions + 1
        return deltas

    def _join(self, slots: list[Slot]) -> list[tuple[Slot, int, str]]:
        """Prefill the newcomers together, then merge their rows into the running batch.

        Each request's prompt is prefilled once; its `n` choices then start from copies of
        that one row (cache, logits, mask), not from n prefills of the same text.
        """
        owners = [(slot, row) for slot in slots for row in slot.rows]
        prompts = [slot.prompt_ids for slot in slots]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = prompt
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            logits, cache = self._forward(ids, mask, positions, None)
            kv_cache.reserve_room(cache, self.kv_room_tokens, self.context_length)
            if len(owners) > len(slots):
                copies = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor([len(s.rows) for s in slots]))
                kv_cache.select_rows(cache, copies.to(self.row_index_device))
                on_device = copies.to(self.device)
                logits, mask, positions = logits[on_device], mask[on_device], positions[on_device]
            next_input, deltas = self._pick(owners, logits)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for a long prompt: the newcomers fail,
            return _failed(slots, exc)  # the running batch (not touched yet) goes on
        mask = torch.cat([mask, mask.new_ones((len(owners), 1))], dim=1)
        positions = positions[:, -1:] + 1
        if self.done:
            self.cache, self.mask, self.positions, self.next_input = cache, mask, positions, next_input
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            try:  # the new rooms are this step's largest allocation; all or nothing (see `merge`)
                merged_mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
                merged_positions = torch.cat([self.positions, positions])
                merged_input = torch.cat([self.next_input, next_input])
                kv_cache.merge(self.cache, cache, width - self.mask.shape[1], width - mask.shape[1])
            except Exception as exc:  # noqa: BLE001 - out of memory: the newcomers fail, the batch goes on
                return _failed(slots, exc)
            self.mask, self.positions, self.next_input = merged_mask, merged_positions, merged_input
        self.owners += owners
        self.plan = None
        return deltas

    def _drop_finished(self) -> None:
        """Rows whose choice ended, whose request failed, or whose client left, stop costing compute now."""
        keep = [i for i, (slot, row) in enumerate(self.owners)
                if not slot.cancelled and slot.error is None and row.decoder.finish_reason is None]
        if len(keep) == len(self.owners):
            return
        self.owners = [self.owners[i] for i in keep]
        self.plan = None
        if not keep:
            self.cache = self.mask = self.positions = self.next_input = None
            return
        index = torch.tensor(keep, device=self.row_index_device)
        self.next_input, self.mask, self.positions = (
            self.next_input[index], self.mask[index], self.positions[index])
        if kv_cache.mergeable(self.cache):
            # Leading columns every remaining row masks out (padding for rows that left) go with them.
            first = int(self.mask.any(dim=0).int().argmax())
            self.mask = self.mask[:, first:]
            kv_cache.keep_rows(self.cache, index, first)
        else:
            kv_cache.select_rows(self.cache, index)


def context_length(model: PreTrainedModel) -> int | None:
    """The most positions the model takes (None where its config does not say); a multimodal
    checkpoint (Gemma 3) keeps its text model's in the text config.

    YaRN scaling extends it past `max_position_embeddings`, which such configs often leave at
    the original length (Qwen2.5's card adds `rope_scaling` alone to reach 128K): there it is
    `original_max_position_embeddings` times the factor, as vLLM reads it. Llama 3's, LongRoPE's
    and linear scaling's configs already give the extended length."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config()
    positions = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    # One set of parameters, or one per attention type (transformers 5: {"full_attention": {...}, ...}).
    for parameters in [rope] if "factor" in rope or "rope_type" in rope else list(rope.values()):
        if not isinstance(parameters, dict) or (parameters.get("rope_type") or parameters.get("type")) != "yarn":
            continue
        original, factor = parameters.get("original_max_position_embeddings"), parameters.get("factor")
        if original and factor:
            positions = max(positions or 0, int(original * factor))
    return positions


def _failed(slots: list[Slot], exc: Exception) -> list[tuple[Slot, int, str]]:
    """Newcomers that could not join: each gets `exc` (the first error it met), delivered as
    an empty delta of its first row."""
    for slot in slots:
        slot.error = slot.error or exc
    return [(slot, 0, "") for slot in slots]


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A [rows, tokens] mask with zero columns in front, to `width` columns."""
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def deltas_by_slot(deltas: list[tuple[Slot, int, str]]) -> dict[Slot, list[ChoiceDelta]]:
    """Group one step's row deltas by slot, in order; a choice's last delta carries its finish_reason."""
    grouped: dict[Slot, list[ChoiceDelta]] = {}
    for slot, index, text in deltas:
        choice = grouped.setdefault(slot, [])
        decoder = slot.rows[index].decoder
        if text or decoder.finish_reason is not None:
            choice.append(ChoiceDelta(index, text, decoder.finish_reason, decoder.take_logprobs()))
    return grouped


def merge_deltas(deltas: list[ChoiceDelta]) -> list[ChoiceDelta]:
    """Coalesced deltas as one per choice (text joined, the last finish_reason kept; logprobs
    joined, none where the last delta has none). Joined once at the end: adding each piece to
    the text so far would copy it at every step, quadratic in a long answer's tokens."""
    texts: dict[int, list[str]] = {}
    finish_reasons: dict[int, str | None] = {}
    logprobs: dict[int, list[TokenLogprob] | None] = {}
    for delta in deltas:
        texts.setdefault(delta.index, []).append(delta.text)
        finish_reasons[delta.index] = delta.finish_reason or finish_reasons.get(delta.index)
        if delta.logprobs is None:
            logprobs[delta.index] = None
        else:
            joined = logprobs.get(delta.index)
            if joined is None:  # a list of its own, extended in place
                logprobs[delta.index] = joined = []
            joined.extend(delta.logprobs)
    return [ChoiceDelta(index, "".join(texts[index]), finish_reasons[index], logprobs[index]) for index in sorted(texts)]
