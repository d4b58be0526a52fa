"""The batched sampler: each row draws from exactly its own distribution, with its own
generator, whatever rows share its batch (real tensors, no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from transformers import GenerationConfig

from serve_app.jobs import ChatJob
from serve_app.sampling import UNIFORM_BLOCK, Row, SamplingDefaults, SamplingPlan, choose_tokens, make_rows

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -30.0])


def row(seed: int = 0, *, greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        presence: float = 0.0, frequency: float = 0.0, min_p: float = 0.0) -> Row:
    return Row(decoder=None, generator=torch.Generator().manual_seed(seed), greedy=greedy, temperature=temperature,
               top_p=top_p, top_k=top_k, presence=presence, frequency=frequency, min_p=min_p)


def expected(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """The textbook distribution, computed one step at a time in float64 (min-p as vLLM: on
    the tempered distribution, before top-p)."""
    logits = LOGITS.double() / temperature
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = probs * (probs >= min_p * probs.max())
    probs = probs / probs.sum()
    ordered, order = probs.sort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[(ordered.cumsum(0) - ordered) < top_p]] = True  # until the mass reaches top_p
    keep[order[0]] = True
    probs = probs * keep
    return probs / probs.sum()


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.5}, {"temperature": 2.0, "top_p": 0.8},
                                      {"top_k": 3}, {"top_k": 4, "top_p": 0.7}, {"min_p": 0.2},
                                      {"min_p": 0.1, "top_p": 0.8, "temperature": 1.5}, {"min_p": 0.3, "top_k": 2}])
def test_rows_draw_from_their_own_distribution(settings):
    draws = 20_000
    rows = [row(seed, **settings) for seed in range(draws)]
    tokens = choose_tokens(rows, LOGITS.repeat(draws, 1))
    observed = torch.bincount(tokens, minlength=len(LOGITS)).double() / draws
    want = expected(**settings)
    assert torch.all(observed[want == 0] == 0), f"drew a token outside top-k/top-p: {observed}"
    # 20,000 draws: a frequency's standard error is at most 0.0035; allow about 4 of them.
    assert torch.allclose(observed, want, atol=0.015), (observed, want)


def test_a_rows_tokens_do_not_depend_on_its_batch_mates():
    def run(batch: list[Row], steps: int = 50) -> list[list[int]]:
        out = []
        for _ in range(steps):
            logits = LOGITS.repeat(len(batch), 1)
            out.append(choose_tokens(batch, logits).tolist())
        return out

    alone = [step[0] for step in run([row(42, temperature=0.9, top_p=0.95)])]
    mates = [row(42, temperature=0.9, top_p=0.95), row(1, greedy=True), row(2, temperature=3.0),
             row(3, top_k=2), row(4, frequency=1.0, presence=0.5)]
    batched = [step[0] for step in run(mates)]
    assert alone == batched
    assert len(set(alone)) > 1  # it really sampled


def test_plain_temperature_rows_draw_alike_beside_top_p_rows():
    """Whether the vocabulary gets sorted is each row's own affair, never its batch-mates'."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def tokens(batch: list[Row]) -> list[int]:
        return [choose_tokens(batch, logits.repeat(len(batch), 1)).tolist()[0] for _ in range(30)]

    alone = tokens([row(42, temperature=0.8)])
    assert alone == tokens([row(42, temperature=0.8), row(7, temperature=0.8, top_p=0.9), row(8, top_k=5)])


def test_top_p_zero_keeps_the_most_likely_token():
    assert choose_tokens([row(seed, top_p=0.0) for seed in range(50)], LOGITS.repeat(50, 1)).tolist() == [0] * 50


def test_greedy_rows_take_the_argmax_and_penalties_push_repeats_away():
    greedy, penalized = row(greedy=True), row(greedy=True, frequency=2.0)
    tokens = []
    for _ in range(4):
        tokens.append(choose_tokens([greedy, penalized], LOGITS.repeat(2, 1)).tolist())  # counts them too
    assert [step[0] for step in tokens] == [0, 0, 0, 0]
    # frequency 2.0: each used token loses 2.0 (0: 2.0 -> 0.0, 1: 1.5 -> -0.5, 2: 1.0 -> -1.0),
    # so 1, 2 and then 3 (0.5) come next.
    assert [step[1] for step in tokens] == [0, 1, 2, 3]


def test_presence_penalty_counts_a_token_once_however_often_it_came():
    """presence 1.0: a used token loses 1.0 once (0: 2.0 -> 1.0, below 1's 1.5); frequency 0.3 more
    per use then pulls 1 (1.5 - 1.0 - 0.3) under 2 (1.0) after its first use."""
    presence, both = row(greedy=True, presence=1.0), row(greedy=True, presence=1.0, frequency=0.3)
    tokens = []
    for _ in range(4):
        tokens.append(choose_tokens([presence, both], LOGITS.repeat(2, 1)).tolist())
    # presence only: 0, then 1 (1.5 beats 0's 1.0), then 0 and 1 both at their penalised value,
    # 1.0 and 0.5, with 2 at 1.0 (argmax takes the first): 0 again, and 0 stays ahead.
    assert [step[0] for step in tokens] == [0, 1, 0, 0]
    # with frequency: 0 (2.0 -> 0.7), 1 (1.5 -> 0.2), 2 (1.0 -> -0.3), then 0 (0.7 -> 0.4 next time)
    assert [step[1] for step in tokens] == [0, 1, 2, 0]


def test_bias_and_penalties_are_each_rows_own_with_a_plan_kept_or_not():
    """The engine keeps one SamplingPlan while its rows stay; the tokens are those of a row
    alone, whoever shares the batch and whether they are biased or penalised."""
    def subject() -> Row:
        subject = row(42, temperature=0.9, frequency=0.7, presence=0.3)
        subject.bias = (torch.tensor([6, 2]), torch.tensor([4.0, -1.0]))
        return subject

    def run(batch: list[Row], keep_plan: bool) -> list[int]:
        plan = SamplingPlan(batch, len(LOGITS), LOGITS.device) if keep_plan else None
        return [choose_tokens(batch, LOGITS.repeat(len(batch), 1), plan).tolist()[0] for _ in range(40)]

    alone = run([subject()], keep_plan=False)
    assert alone == run([subject(), row(1, greedy=True), row(2, top_k=2)], keep_plan=True)
    assert alone == run([subject(), row(3, frequency=1.0), row(4, top_p=0.5)], keep_plan=False)
    assert len(set(alone)) > 1 and 6 in alone  # it sampled, and the +4 bias shows


def test_uniforms_drawn_in_blocks_are_the_one_at_a_time_sequence():
    """Across block boundaries (UNIFORM_BLOCK numbers each), the numbers a seed gives are those
    of one draw per step: a seed means the same text as before blocks were drawn."""
    blocked = row(7)
    one_at_a_time = torch.Generator().manual_seed(7)
    expected = [1.0 - torch.rand(1, generator=one_at_a_time, dtype=torch.float64).item()
                for _ in range(2 * UNIFORM_BLOCK + 5)]
    assert [blocked.uniform() for _ in expected] == expected


def test_a_rebuilt_plan_keeps_the_counts_of_rows_that_stay():
    """The engine rebuilds its plan when rows leave or join: a staying row keeps what it
    generated so far (its penalty grows on), a newcomer starts from zero."""
    staying, leaving = row(greedy=True, frequency=2.0), row(greedy=True, frequency=2.0)
    first = SamplingPlan([staying, leaving], len(LOGITS), LOGITS.device)
    for _ in range(2):  # each picks 0, then 1 (0 is down to 0.0)
        choose_tokens([staying, leaving], LOGITS.repeat(2, 1), first)
    newcomer = row(greedy=True, frequency=2.0)
    second = SamplingPlan([newcomer, staying], len(LOGITS), LOGITS.device)
    picked = choose_tokens([newcomer, staying], LOGITS.repeat(2, 1), second).tolist()
    assert picked == [0, 2]  # the newcomer's first pick; the stayer's third (0 and 1 penalised)
    assert staying.counts[:3].tolist() == [1, 1, 1] and newcomer.counts[:3].tolist() == [1, 0, 0]


@pytest.mark.parametrize("checkpoint, asked, expected", [
    # Nothing set anywhere: OpenAI's defaults, sampling at temperature 1 (so n=3 gives three answers).
    ({}, {}, (False, 1.0, 1.0, 0)),
    # The checkpoint's own values for what the request omits; its top_k while it picks the temperature.
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}, {}, (False, 0.6, 0.9, 20)),
    ({"temperature": 0.6, "top_p": 0.9, "top_k": 20}, {"top_p": 0.5}, (False, 0.6, 0.5, 20)),
    ({"temperature": 0.6, "top_p": 0.9, "top_k": 20}, {"temperature": 1.2}, (False, 1.2, 0.9, 0)),
    ({"temperature": 0.6}, {"temperature": 0}, (True, 0, 1.0, 0)),  # 0: greedy
    ({"temperature": 0.0}, {}, (True, 0.0, 1.0, 0)),  # a checkpoint may default to greedy
    # A value equal to transformers 4's own default is still the checkpoint's (4.x dropped it).
    ({"do_sample": True, "top_k": 50, "temperature": 1.0}, {}, (False, 1.0, 1.0, 50)),
    # A request's own top_k (vLLM's extension) wins, with or without its temperature; 0: all.
    ({"temperature": 0.6, "top_k": 20}, {"top_k": 5}, (False, 0.6, 1.0, 5)),
    ({"temperature": 0.6, "top_k": 20}, {"top_k": 0, "temperature": 0.7}, (False, 0.7, 1.0, 0)),
    ({}, {"top_k": 3, "temperature": 0.7}, (False, 0.7, 1.0, 3)),
])
def test_omitted_settings_take_the_checkpoints_then_openais_defaults(checkpoint, asked, expected):
    defaults = SamplingDefaults.of(GenerationConfig(**checkpoint))
    job = ChatJob(messages=[], max_tokens=4, max_tokens_explicit=True, n=3, seed=1, **asked)
    rows = make_rows(job, defaults, [None] * 3)
    assert {(r.greedy, r.temperature, r.top_p, r.top_k) for r in rows} == {expected}


@pytest.mark.parametrize("checkpoint, asked, expected", [
    ({}, {}, 0.0), ({"min_p": 0.05}, {}, 0.05), ({"min_p": 0.05}, {"min_p": 0.2}, 0.2),
    ({"min_p": 0.05}, {"temperature": 0.9}, 0.0), ({"min_p": 0.05}, {"min_p": 0.0}, 0.0)])
def test_min_p_defaults_as_top_k_does(checkpoint, asked, expected):
    job = ChatJob(messages=[], max_tokens=4, max_tokens_explicit=True, **asked)
    assert make_rows(job, SamplingDefaults.of(GenerationConfig(**checkpoint)), [None])[0].min_p == expected


class _Counted:
    """What a row reads of its decoder here: the tokens so far and the end-of-sequence ids."""

    def __init__(self, eos_ids: set[int]) -> None:
        self.used, self.eos_ids = 0, eos_ids


def test_an_end_id_past_the_logits_is_left_out_of_the_hold():
    """A tokenizer larger than the model's head (a token added without resizing) may name one."""
    job = ChatJob(messages=[], max_tokens=6, max_tokens_explicit=True, temperature=0, ignore_eos=True)
    held = make_rows(job, SamplingDefaults(), [_Counted({0, len(LOGITS) + 5})])[0]
    assert choose_tokens([held], LOGITS.repeat(1, 1)).tolist() == [1]
    beyond = make_rows(job, SamplingDefaults(), [_Counted({len(LOGITS) + 5})])[0]
    assert choose_tokens([beyond, row(greedy=True)], LOGITS.repeat(2, 1)).tolist() == [0, 0]


@pytest.mark.parametrize("min_tokens, ignore_eos, held_steps", [(3, False, 3), (0, True, 6), (0, False, 0)])
def test_end_of_sequence_is_held_back_under_min_tokens_or_ignore_eos(min_tokens, ignore_eos, held_steps):
    """The end-of-sequence ids are not chosen while the row holds them; its batch-mate may."""
    eos = {0, 2}  # LOGITS' two most likely tokens
    job = ChatJob(messages=[], max_tokens=6, max_tokens_explicit=True, temperature=0, min_tokens=min_tokens,
                  ignore_eos=ignore_eos)
    held, free = make_rows(job, SamplingDefaults(), [_Counted(eos)])[0], row(greedy=True)
    held.greedy = True
    plan = SamplingPlan([held, free], len(LOGITS), LOGITS.device)
    chosen = []
    for _ in range(6):
        tokens = choose_tokens([held, free], LOGITS.repeat(2, 1), plan).tolist()
        assert tokens[1] == 0
        chosen.append(tokens[0])
        held.decoder.used += 1
    assert chosen == [1] * held_steps + [0] * (6 - held_steps)


def test_repetition_penalty_is_transformers_own_per_row():
    """`repetition_penalty` as transformers applies it (a seen token's logit divided where
    positive, multiplied where negative), over the prompt and the answer so far, for the rows
    that ask for it alone, whatever shares their batch."""
    from transformers import RepetitionPenaltyLogitsProcessor

    prompts = [torch.tensor([0, 6, 6]), torch.tensor([1, 2]), torch.tensor([3])]
    job = ChatJob(messages=[], max_tokens=4, max_tokens_explicit=True, temperature=0)
    rows = [make_rows(job, SamplingDefaults(), [None], prompts[0].clone())[0],  # no penalty asked
            make_rows(ChatJob(**{**job.__dict__, "repetition_penalty": 1.5}), SamplingDefaults(), [None], prompts[1])[0],
            make_rows(job, SamplingDefaults(repetition_penalty=1.3), [None], prompts[2])[0]]  # the checkpoint's
    plan = SamplingPlan(rows, len(LOGITS), LOGITS.device)
    seen = [prompt.tolist() for prompt in prompts]
    for _ in range(4):
        logits = LOGITS.repeat(3, 1)
        want = logits.clone()
        for i, penalty in ((1, 1.5), (2, 1.3)):
            want[i] = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen[i]]), want[i:i + 1].clone())[0]
        plan.adjust(logits)
        assert torch.allclose(logits, want), (logits, want)
        tokens = want.argmax(dim=-1)
        plan.count(tokens)
        for i, token in enumerate(tokens.tolist()):
            seen[i].append(token)


def test_the_checkpoints_repetition_penalty_is_the_default():
    assert SamplingDefaults.of(GenerationConfig(repetition_penalty=1.05, temperature=0.7)).repetition_penalty == 1.05
    assert SamplingDefaults.of(GenerationConfig()).repetition_penalty == 1.0


def test_a_requests_repetition_penalty_reaches_its_job():
    from pydantic import ValidationError

    from serve_app.config import ChatModelConfig, RequestLimits
    from serve_app.protocol import ChatCompletionRequest
    from serve_app.translate import chat_job

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": "p"})
    request = ChatCompletionRequest.model_validate({**base, "repetition_penalty": 1.2})
    assert chat_job(request, config, RequestLimits()).repetition_penalty == 1.2
    for bad in (0, 1e-40, 2.5):  # a tiny one would make a seen token's logit infinite
        with pytest.raises(ValidationError, match="repetition_penalty"):
            ChatCompletionRequest.model_validate({**base, "repetition_penalty": bad})


def test_vllms_sampling_extensions_reach_the_job():
    from pydantic import ValidationError

    from serve_app.config import ChatModelConfig, RequestLimits
    from serve_app.errors import InvalidRequest
    from serve_app.protocol import ChatCompletionRequest
    from serve_app.translate import chat_job

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    config = ChatModelConfig.model_validate({"name": "m", "kind": "chat", "path": "p"})

    def job(**extra):
        return chat_job(ChatCompletionRequest.model_validate({**base, **extra}), config, RequestLimits())

    made = job(top_k=20, min_p=0.05, min_tokens=4, ignore_eos=True, max_tokens=8)
    assert (made.top_k, made.min_p, made.min_tokens, made.ignore_eos) == (20, 0.05, 4, True)
    assert job(top_k=-1).top_k == 0 and job().top_k is None  # vLLM's -1: all; omitted: the checkpoint's
    # max_tokens left to the default makes room for min_tokens, within the model's limit.
    assert (job(min_tokens=300).min_tokens, job(min_tokens=300).max_tokens) == (300, 300)
    assert job(min_tokens=config.max_tokens_limit).max_tokens == config.max_tokens_limit
    with pytest.raises(InvalidRequest, match="min_tokens must be at most") as refused:  # never as asked
        job(min_tokens=config.max_tokens_limit + 1)
    assert refused.value.param == "min_tokens"
    assert job(min_tokens=5).max_tokens == config.default_max_tokens
    with pytest.raises(InvalidRequest, match="min_tokens") as refused:
        job(min_tokens=9, max_completion_tokens=8)
    assert refused.value.param == "min_tokens"
    # A function_call that tool_choice replaces is not read, nor checked.
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert job(tools=tools, tool_choice="auto", function_call={"name": "gone"}).tools == tools
    for bad in ({"top_k": -2}, {"min_p": 1.5}, {"min_tokens": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ChatCompletionRequest.model_validate({**base, **bad})


def test_every_bit_of_a_seed_counts():
    """torch's CPU generator keeps 32 bits of its seed: seeds 2**32 apart would draw alike.
    Below 2**32 a seed draws what manual_seed draws; the i-th choice is the first of seed + i."""
    def draws(seed: int, n: int = 1) -> list[list[float]]:
        rows = make_rows(ChatJob(messages=[], max_tokens=1, max_tokens_explicit=True, seed=seed, n=n),
                         SamplingDefaults(), [None] * n)
        return [[row.uniform() for _ in range(4)] for row in rows]

    seeds = [7, 7 + 2**32, 7 + 2**40, 2**63 - 1, -1, 2**32 - 1, -(2**63)]
    assert len({tuple(draws(seed)[0]) for seed in seeds}) == len(seeds)
    assert draws(7) == draws(7) and draws(7)[0] == [1.0 - x for x in torch.rand(4, generator=torch.Generator()
                                                                                 .manual_seed(7), dtype=torch.float64).tolist()]
    assert draws(2**40, n=2)[1] == draws(2**40 + 1)[0] and draws(-1, n=2)[1] == draws(0)[0]


def test_a_draw_rounded_onto_a_masked_token_takes_the_likeliest_instead():
    """A GPU's parallel scan may round the cdf up across tokens of probability zero (masked by
    a grammar or min-p, anywhere in vocabulary order), so searchsorted can land on one; that
    draw takes the row's most likely token instead."""
    from serve_app.sampling import kept_or_likeliest

    probs = torch.tensor([[0.0, 0.4, 0.0, 0.0, 0.6, 0.0],
                          [0.0, 0.0, 0.7, 0.0, 0.3, 0.0]])
    picked = torch.tensor([[3], [1]])  # zero-probability positions, as a rounded cdf could give
    assert kept_or_likeliest(probs, picked).tolist() == [[4], [2]]
    kept = torch.tensor([[1], [4]])
    assert kept_or_likeliest(probs, kept).tolist() == [[1], [4]]  # a kept draw stays
