"""Choosing each row's next token: per-row settings, batched tensor work.

Every choice of every request is one row with its own sampling settings and its
own random generator. Applying them one row at a time costs a handful of tensor
ops per row per step, and on a GPU a device sync per row: for a batch of 32
that is milliseconds a step. `choose_tokens` instead applies temperature,
top-k and top-p to the whole batch at once, draws each sampling row's one
random number from that row's own generator, and brings every token to the
host in one transfer. Only `logit_bias` and presence/frequency penalties stay
per row (one op each, on rows that ask for them).

The generators live on the CPU whatever the model's device, so a `seed` draws
the same numbers on CPU and GPU, and a row's draw never depends on its
batch-mates: the same request with the same seed gives the same text alone or
batched.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from serve_app.jobs import ChatJob

if TYPE_CHECKING:
    from serve_app.chat_engine import ChoiceDecoder


@dataclass(eq=False)  # identity: a row is one choice in flight, hashable, never equal to another
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
    counts: torch.Tensor | None = None  # occurrences of each token id so far, kept only for penalties
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, values) of `logit_bias`

    def add_bias(self, logits: torch.Tensor) -> None:
        """OpenAI's `logit_bias`, in place on this row's logits (1-D), before penalties and sampling."""
        ids, values = self.bias  # type: ignore[misc]
        if ids.device != logits.device:  # once: the row's tensors move to the model's device
            ids, values = self.bias = ids.to(logits.device), values.to(logits.device)
        logits[ids] += values

    @property
    def penalized(self) -> bool:
        return bool(self.presence or self.frequency)

    def penalize(self, logits: torch.Tensor) -> None:
        """OpenAI's presence and frequency penalties, in place on this row's logits (1-D)."""
        if self.counts is None:
            self.counts = torch.zeros_like(logits)
        else:
            logits -= self.frequency * self.counts + self.presence * (self.counts > 0)

    def count(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1


def make_rows(job: ChatJob, defaults, decoders: list[ChoiceDecoder]) -> list[Row]:
    """Rows for a job; omitted parameters keep the checkpoint's `generation_config` defaults."""
    sample = bool(defaults.do_sample) if job.temperature is None and job.top_p is None else job.temperature != 0
    seed = job.seed if job.seed is not None else secrets.randbits(62)
    bias = None
    if job.logit_bias:
        bias = (torch.tensor(list(job.logit_bias), dtype=torch.long),
                torch.tensor(list(job.logit_bias.values()), dtype=torch.float32))
    return [Row(decoder=decoder,
                generator=torch.Generator().manual_seed((seed + index) % 2**64),
                greedy=not sample,
                temperature=job.temperature if job.temperature is not None else (defaults.temperature or 1.0),
                top_p=job.top_p if job.top_p is not None else (defaults.top_p or 1.0),
                top_k=(defaults.top_k or 0) if job.temperature is None else 0,
                presence=job.presence_penalty or 0.0,
                frequency=job.frequency_penalty or 0.0,
                bias=bias)
            for index, decoder in enumerate(decoders)]


def choose_tokens(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """Every row's next token ([rows], on the logits' device) from the batch's logits
    ([rows, vocab], float32, changed in place by penalties)."""
    for i, row in enumerate(rows):
        if row.bias is not None:
            row.add_bias(logits[i])
        if row.penalized:
            row.penalize(logits[i])
    tokens = logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    for filtered in (False, True):  # per row, not per batch: a row draws the same way whatever its batch-mates use
        group = [i for i, row in enumerate(rows)
                 if not row.greedy and (0 < row.top_k < vocab or row.top_p < 1.0) == filtered]
        if group:
            index = torch.tensor(group, device=logits.device)
            tokens[index] = _sample(logits[index], [rows[i] for i in group], filtered)
    return tokens


def _sample(logits: torch.Tensor, rows: list[Row], filtered: bool) -> torch.Tensor:
    """Temperature, then (when `filtered`) top-k and top-p as transformers applies them,
    then one draw per row by inverse CDF with a uniform number from the row's own generator.

    Top-k keeps ties with the k-th token; top-p keeps the most likely tokens until their
    mass reaches `top_p` (at least one). Only filtered rows sort the vocabulary (a full
    sort is most of the cost on a CPU); plain temperature sampling draws in vocabulary order.
    """
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([max(row.temperature, 1e-5) for row in rows], device=device)
    scaled = logits / temperature[:, None]
    order = None
    if filtered:
        top_k = torch.tensor([row.top_k if 0 < row.top_k < vocab else vocab for row in rows], device=device)
        top_p = torch.tensor([row.top_p if row.top_p < 1.0 else float("inf") for row in rows], device=device)
        scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # ties in a fixed order
        scaled = scaled.masked_fill(scaled < scaled.gather(1, (top_k - 1)[:, None]), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs >= top_p[:, None]
        outside[:, 0] = False
        probs = probs.masked_fill(outside, 0.0)
    else:
        probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    # u in (0, 1]: the first position whose cumulative probability reaches u * total has a
    # non-zero probability (where the cdf is flat, probabilities are zero), rounding included.
    uniform = 1.0 - torch.cat([torch.rand(1, generator=row.generator, dtype=torch.float64) for row in rows])
    target = uniform.to(device=device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target)
    if order is None:
        return picked.clamp_(max=vocab - 1).squeeze(1)
    # A parallel scan (GPU) may round the flat tail a few ulps above the last kept position.
    last_kept = ((probs > 0).sum(dim=-1, keepdim=True) - 1).clamp_(min=0)
    return order.gather(1, torch.minimum(picked, last_kept)).squeeze(1)
