"""Choosing each row's next token: per-row settings, batched tensor work.

Every choice of every request is one row with its own sampling settings and its
own random generator. Applying them one row at a time costs a handful of tensor
ops per row per step, and on a GPU a device sync per row: for a batch of 32
that is milliseconds a step. `choose_tokens` instead applies temperature,
min-p, top-k and top-p to the whole batch at once, draws each sampling row's one
random number from that row's own generator, and brings every token to the
host in one transfer. `logit_bias`, presence/frequency penalties and the
end-of-sequence hold (`min_tokens`, `ignore_eos`) are a few ops for the whole batch too, and everything that depends only on which rows
are in the batch is built once per batch composition (`SamplingPlan`).

The generators live on the CPU whatever the model's device, so a `seed` draws
the same numbers on CPU and GPU, and a row's draw never depends on its
batch-mates: the same request with the same seed gives the same text alone or
batched.
"""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from serve_app.jobs import ChatJob, generator_seed
from serve_app.structured_output import fill_masks

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from serve_app.decoding import ChoiceDecoder
    from serve_app.structured_output import AnswerGrammar


UNIFORM_BLOCK = 64
"""Numbers a sampling row draws from its generator at a time: one call instead of one per step
(the same sequence as drawing them one by one)."""


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
    repetition: float = 1.0  # transformers' and vLLM's multiplicative penalty on tokens seen (1: none)
    min_p: float = 0.0  # tokens less likely than min_p times the most likely one are left out
    eos_until: int = 0  # the end-of-sequence tokens are not chosen while the answer has fewer tokens
    prompt_tokens: torch.Tensor | None = None  # the prompt's distinct token ids, on the CPU (repetition-penalized rows)
    counts: torch.Tensor | None = None  # occurrences of each token id so far (penalized rows; see SamplingPlan)
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, values) of `logit_bias`, on the CPU
    grammar: AnswerGrammar | None = None  # what the answer follows (`structured_output`); None: free text
    _uniforms: list[float] = field(default_factory=list, init=False, repr=False)

    @property
    def penalized(self) -> bool:
        return bool(self.presence or self.frequency) or self.repetition != 1.0

    def filtered(self, vocab: int) -> bool:
        """Whether top-k or top-p cut this row's distribution (its vocabulary must be sorted; min-p
        needs no sort)."""
        return 0 < self.top_k < vocab or self.top_p < 1.0

    @property
    def holds_eos(self) -> bool:
        """Whether its end-of-sequence tokens are ruled out this step (`min_tokens`, `ignore_eos`)."""
        return self.decoder.used < self.eos_until

    def uniform(self) -> float:
        """This row's next random number, in (0, 1]."""
        if not self._uniforms:
            drawn = torch.rand(UNIFORM_BLOCK, generator=self.generator, dtype=torch.float64).tolist()
            self._uniforms = drawn[::-1]  # popped from the end: in the order drawn
        return 1.0 - self._uniforms.pop()


@dataclass(frozen=True)
class SamplingDefaults:
    """What a checkpoint's `generation_config` says for requests that omit a setting: only
    the values it sets (unset ones are None in transformers 5, which this needs: transformers 4
    left out any value equal to its own default, a checkpoint's explicit top_k 50 included)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # Qwen2.5's checkpoints set 1.05, which vLLM applies too

    @classmethod
    def of(cls, generation_config: GenerationConfig | None) -> "SamplingDefaults":
        given = generation_config.to_diff_dict() if generation_config is not None else {}
        return cls(**{name: given[name] for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                      if given.get(name) is not None})


def make_rows(job: ChatJob, defaults: SamplingDefaults, decoders: list[ChoiceDecoder],
              prompt_ids: torch.Tensor | None = None, grammars: list[AnswerGrammar] | None = None) -> list[Row]:
    """Rows for a job. Omitted settings take the checkpoint's values, else OpenAI's defaults
    (temperature 1, top_p 1), as vLLM's server does; a request samples unless its
    temperature is 0 (transformers' own `generate` is greedy unless told to sample, but an
    OpenAI client that asks for n=3 expects three answers). The checkpoint's top_k and min_p
    apply while the request leaves them and temperature to it."""
    temperature = job.temperature if job.temperature is not None else defaults.temperature
    sample = temperature != 0
    seed = job.seed if job.seed is not None else secrets.randbits(62)
    repetition = job.repetition_penalty if job.repetition_penalty is not None else defaults.repetition_penalty
    prompt_tokens = None
    if repetition != 1.0 and prompt_ids is not None:
        prompt_tokens = torch.unique(prompt_ids.to("cpu", torch.long))
    bias = None
    if job.logit_bias:
        bias = (torch.tensor(list(job.logit_bias), dtype=torch.long),
                torch.tensor(list(job.logit_bias.values()), dtype=torch.float32))
    return [Row(decoder=decoder,
                generator=torch.Generator().manual_seed(generator_seed(seed, index)),
                greedy=not sample,
                temperature=temperature,
                top_p=job.top_p if job.top_p is not None else defaults.top_p,
                top_k=job.top_k if job.top_k is not None else defaults.top_k if job.temperature is None else 0,
                min_p=job.min_p if job.min_p is not None else defaults.min_p if job.temperature is None else 0.0,
                eos_until=sys.maxsize if job.ignore_eos else job.min_tokens,
                presence=job.presence_penalty or 0.0,
                frequency=job.frequency_penalty or 0.0,
                repetition=repetition,
                prompt_tokens=prompt_tokens,
                bias=bias,
                grammar=grammars[index] if grammars else None)
            for index, decoder in enumerate(decoders)]


class SampleGroup:
    """Rows sampled the same way (with or without top-k/top-p), their settings on the device."""

    def __init__(self, members: list[int], rows: list[Row], batch: int, vocab: int, device: torch.device,
                 filtered: bool) -> None:
        self.rows = [rows[i] for i in members]
        self.filtered = filtered
        self.index = None if len(members) == batch else torch.tensor(members, device=device)  # None: every row
        self.temperature = torch.tensor([max(row.temperature, 1e-5) for row in self.rows], device=device)[:, None]
        if filtered:
            self.top_k_last = torch.tensor([(row.top_k if 0 < row.top_k < vocab else vocab) - 1
                                            for row in self.rows], device=device)[:, None]
            self.top_p = torch.tensor([row.top_p if row.top_p < 1.0 else float("inf")
                                       for row in self.rows], device=device)[:, None]
        # min-p as a distance below the largest scaled logit: log(min_p), -inf for none
        self.log_min_p = None
        if any(row.min_p > 0 for row in self.rows):
            self.log_min_p = torch.tensor([math.log(row.min_p) if row.min_p > 0 else float("-inf")
                                           for row in self.rows], device=device)[:, None]


class SamplingPlan:
    """Everything choosing a batch's tokens needs that depends only on which rows are in it:
    the rows' settings, index tensors and `logit_bias` entries, on the logits' device, and
    one [rows, vocab] tensor of token counts for the penalized rows.

    Built once per batch composition (the engine rebuilds it when rows join or leave), so
    a decode step sends little to the device (each sampling row's random number, constrained
    rows' masks, the rows held from ending when that set changes), and penalties, biases and
    counting take a few ops for the whole batch instead of a few per row: on a GPU every
    small copy is a sync and every op a kernel launch.
    """

    def __init__(self, rows: list[Row], vocab: int, device: torch.device) -> None:
        self.rows = rows
        batch = len(rows)
        biased = [(i, row.bias) for i, row in enumerate(rows) if row.bias is not None]
        self.bias = None
        if biased:
            self.bias = (torch.cat([torch.full((len(ids),), i) for i, (ids, _) in biased]).to(device),
                         torch.cat([ids for _, (ids, _) in biased]).to(device),
                         torch.cat([values for _, (_, values) in biased]).to(device))
        penalized = [i for i, row in enumerate(rows) if row.penalized]
        self.counts = None
        if penalized:
            # The rows' counts so far become rows of one tensor, and each row's `counts` a view
            # of it: counting updates both, and the next plan starts from them.
            self.counts = torch.stack([rows[i].counts.to(device) if rows[i].counts is not None
                                       else torch.zeros(vocab, device=device) for i in penalized])
            for j, i in enumerate(penalized):
                rows[i].counts = self.counts[j]
            self.counted = torch.arange(len(penalized), device=device)
            self.penalized = None if len(penalized) == batch else torch.tensor(penalized, device=device)
            self.frequency = torch.tensor([rows[i].frequency for i in penalized], device=device)[:, None]
            self.presence = torch.tensor([rows[i].presence for i in penalized], device=device)[:, None]
            self.repetition = None
            if any(rows[i].repetition != 1.0 for i in penalized):
                self.repetition = torch.tensor([rows[i].repetition for i in penalized], device=device)[:, None]
                # The prompt's tokens, per penalized row (a row without a repetition penalty has none:
                # its factor is 1 anyway); what the answer adds shows in `counts`.
                self.in_prompt = torch.zeros((len(penalized), vocab), dtype=torch.bool, device=device)
                prompts = [(j, rows[i].prompt_tokens) for j, i in enumerate(penalized)
                           if rows[i].prompt_tokens is not None and rows[i].repetition != 1.0]
                if prompts:  # one upload for all rows: each small host-to-device copy is a sync
                    ids = torch.cat([tokens for _, tokens in prompts])
                    owners = torch.cat([torch.full((len(tokens),), j) for j, tokens in prompts])
                    known = ids < vocab
                    self.in_prompt[owners[known].to(device), ids[known].to(device)] = True
        self.holding = [i for i, row in enumerate(rows) if row.eos_until > 0]
        eos = sorted(i for i in rows[self.holding[0]].decoder.eos_ids if i < vocab) if self.holding else []
        if not eos:  # (an end id past the logits, from a tokenizer larger than the model, is never chosen)
            self.holding = []
        else:
            self.eos = torch.tensor(eos, device=device)
            self.held: tuple[list[int], torch.Tensor] | None = None  # the rows last held, on the device
        self.constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
        if self.constrained:
            self.allowed = torch.empty((len(self.constrained), (vocab + 31) // 32), dtype=torch.int32)
            self.constrained_index = None if len(self.constrained) == batch else torch.tensor(self.constrained,
                                                                                              device=device)
            self.bit = torch.arange(32, dtype=torch.int32, device=device)
        self.groups = []
        for filtered in (False, True):  # per row, not per batch: a row draws the same way whatever its batch-mates use
            members = [i for i, row in enumerate(rows) if not row.greedy and row.filtered(vocab) == filtered]
            if members:
                self.groups.append(SampleGroup(members, rows, batch, vocab, device, filtered))

    def adjust(self, logits: torch.Tensor) -> None:
        """OpenAI's `logit_bias`, then the repetition penalty (a seen token's logit divided by it
        where positive, multiplied where negative, as transformers and vLLM apply it), then
        presence and frequency penalties, then no end-of-sequence token for the rows under their
        `min_tokens` (or `ignore_eos`), then each constrained row's grammar, in place."""
        self._penalize(logits)
        if self.holding:
            self._hold_eos(logits)
        if self.constrained:
            self._constrain(logits)

    def _constrain(self, logits: torch.Tensor) -> None:
        """Tokens a constrained row's grammar does not allow next get -inf: llguidance writes each
        row's allowed tokens as a bitmask (32 tokens per int32; the rows together, in parallel,
        `structured_output.fill_masks`), unpacked here for all rows at once
        (llguidance's own helper needs torch.compile, a C++ toolchain on a CPU)."""
        fill_masks([(j, self.rows[i].grammar) for j, i in enumerate(self.constrained)], self.allowed)
        words = self.allowed.to(logits.device, non_blocking=True)
        allowed = ((words[:, :, None] >> self.bit) & 1).flatten(1)[:, :logits.shape[-1]].bool()
        if self.constrained_index is None:
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            logits[self.constrained_index] = logits[self.constrained_index].masked_fill(~allowed, float("-inf"))

    def _hold_eos(self, logits: torch.Tensor) -> None:
        held = [i for i in self.holding if self.rows[i].holds_eos]
        if not held:
            return
        if self.held is None or self.held[0] != held:  # uploaded again only when the set changes
            self.held = (held, torch.tensor(held, device=logits.device)[:, None])
        logits[self.held[1], self.eos] = float("-inf")

    def _penalize(self, logits: torch.Tensor) -> None:
        if self.bias is not None:
            rows, ids, values = self.bias
            logits.index_put_((rows, ids), values, accumulate=True)
        if self.counts is not None:
            if self.repetition is not None:
                mine = logits if self.penalized is None else logits[self.penalized]
                seen = self.in_prompt | (self.counts > 0)
                mine = torch.where(seen, torch.where(mine > 0, mine / self.repetition, mine * self.repetition), mine)
                if self.penalized is None:
                    logits.copy_(mine)
                else:
                    logits[self.penalized] = mine
            penalty = self.frequency * self.counts + self.presence * (self.counts > 0)
            if self.penalized is None:
                logits -= penalty
            else:
                logits.index_put_((self.penalized,), -penalty, accumulate=True)

    def count(self, tokens: torch.Tensor) -> None:
        """Add each penalized row's chosen token to its counts."""
        if self.counts is not None:
            chosen = tokens if self.penalized is None else tokens[self.penalized]
            self.counts[self.counted, chosen] += 1


def choose_tokens(rows: list[Row], logits: torch.Tensor, plan: SamplingPlan | None = None) -> torch.Tensor:
    """Every row's next token ([rows], on the logits' device) from the batch's logits
    ([rows, vocab], float32, changed in place by bias and penalties). `plan` is the rows'
    `SamplingPlan` when the caller keeps one across steps."""
    if plan is None:
        plan = SamplingPlan(rows, logits.shape[-1], logits.device)
    assert len(plan.rows) == len(rows) == logits.shape[0], "a plan is for the batch's rows as they are"
    plan.adjust(logits)
    tokens = logits.argmax(dim=-1)
    for group in plan.groups:
        if group.index is None:
            tokens = _sample(logits, group)
        else:
            tokens[group.index] = _sample(logits[group.index], group)
    plan.count(tokens)
    return tokens


def _sample(logits: torch.Tensor, group: SampleGroup) -> torch.Tensor:
    """Temperature, then min-p (for any row that asks) before top-k and top-p (for a filtered
    group), as vLLM applies them, then one draw per row by inverse CDF with a uniform number
    from the row's own generator.

    Top-k keeps ties with the k-th token; min-p keeps the tokens at least `min_p` times as
    likely as the most likely one; top-p keeps the most likely tokens until their
    mass reaches `top_p` (at least one). Only filtered rows sort the vocabulary (a full
    sort is most of the cost on a CPU); plain temperature sampling, with min-p or not, draws
    in vocabulary order.
    """
    vocab = logits.shape[-1]
    scaled = logits / group.temperature
    order = None
    if group.filtered:
        scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # ties in a fixed order
        # Top-k and min-p are both floors on the scaled logits (the same whichever comes first).
        floor = scaled.gather(1, group.top_k_last)
        if group.log_min_p is not None:
            floor = torch.maximum(floor, scaled[:, :1] + group.log_min_p)
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs >= group.top_p
        outside[:, 0] = False
        probs = probs.masked_fill(outside, 0.0)
    else:
        if group.log_min_p is not None:
            scaled = scaled.masked_fill(scaled < scaled.amax(dim=-1, keepdim=True) + group.log_min_p, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    # u in (0, 1]: the first position whose cumulative probability reaches u * total has a
    # non-zero probability (where the cdf is flat, probabilities are zero), rounding included.
    uniform = torch.tensor([row.uniform() for row in group.rows], dtype=torch.float64)
    target = uniform.to(device=logits.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target)
    if order is None:
        picked = picked.clamp_(max=vocab - 1)
        if probs.device.type != "cpu":  # a CPU's cumsum adds in double: a flat stretch stays flat
            picked = kept_or_likeliest(probs, picked)
        return picked.squeeze(1)
    # A parallel scan (GPU) may round the flat tail a few ulps above the last kept position.
    last_kept = ((probs > 0).sum(dim=-1, keepdim=True) - 1).clamp_(min=0)
    return order.gather(1, torch.minimum(picked, last_kept)).squeeze(1)


def kept_or_likeliest(probs: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """`picked` ([rows, 1] positions), where one has probability zero replaced by its row's most
    likely token. A GPU's parallel scan may round the cumulative sum a few ulps up across
    tokens of probability zero (a grammar's or min-p's masked tokens lie anywhere in vocabulary
    order), and a draw could land on one (about once in a million draws): a token the grammar
    forbids, or an end of sequence `min_tokens` holds back. A gather and a reduction, no
    vocabulary-wide temporaries, and no sync with the host."""
    return torch.where(probs.gather(1, picked) > 0, picked, probs.argmax(dim=-1, keepdim=True))
