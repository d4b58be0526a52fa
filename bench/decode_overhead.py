"""What a decode step costs besides the forward pass, with incremental vs full detokenization.

In-process, no server: one `DecodeBatch` of `--rows` greedy rows runs `--tokens`
steps on the chosen model, once with the engine's incremental detokenizer
(`tokenizers`' `DecodeStream`) and once decoding each row's whole text again
at every step (the engine's fallback for slow tokenizers, and what it did for
every tokenizer before). The time outside the forward passes is the per-step
overhead that a GPU does not hide: it runs on the replica's one worker thread
between passes.

A third run measures the forward passes with the KV cache copied at every step
(`kv_room_tokens=0`, what transformers' `torch.cat`-grown `DynamicLayer` does) against
the engine's cache with room reserved ahead (`serve_app/kv_cache.py`).

    .venv/bin/python bench/decode_overhead.py --model models/bench-llama --rows 32 --tokens 512
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app import kv_cache
from serve_app.chat_engine import DecodeBatch, Slot
from serve_app.decoding import ChoiceDecoder
from serve_app.sampling import SamplingDefaults, make_rows
from serve_app.jobs import ChatJob


def overhead_per_step(model, tokenizer, decode_with, rows: int, tokens: int,
                      temperature: float = 0.0, top_p: float = 1.0, frequency_penalty: float = 0.0,
                      logit_bias: dict[int, float] | None = None,
                      kv_room_tokens: int = kv_cache.ROOM_TOKENS) -> tuple[float, float]:
    """(ms per step outside the forward pass, ms per step in it) for one batch run to `tokens`."""
    forward_s = 0.0
    batch = DecodeBatch(model, tokenizer.pad_token_id, torch.device("cpu"), kv_room_tokens=kv_room_tokens)
    plain_forward = batch._forward

    def timed_forward(*args):
        nonlocal forward_s
        started = time.perf_counter()
        try:
            return plain_forward(*args)
        finally:
            forward_s += time.perf_counter() - started

    batch._forward = timed_forward
    slots = []
    for i in range(rows):
        job = ChatJob(messages=[{"role": "user", "content": f"Tell a story, number {i}."}], max_tokens=tokens,
                      max_tokens_explicit=True, temperature=temperature, top_p=top_p, seed=i,
                      frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        prompt = tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        decoder = ChoiceDecoder(decode_with, set(), [], tokens)  # no EOS: every row runs `tokens` steps
        slots.append(Slot(prompt_ids=ids, rows=make_rows(job, SamplingDefaults.of(model.generation_config), [decoder])))
    batch.tick(slots)  # the prefill: not a decode step, so not in the per-step figures
    forward_s = 0.0
    started, steps = time.perf_counter(), 0
    while not batch.done:
        if batch.tick([]):  # the last tick only lets the finished rows go: no forward pass
            steps += 1
    total_s = time.perf_counter() - started
    return (total_s - forward_s) / steps * 1000, forward_s / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-llama")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--logit-bias", type=int, default=0, metavar="N", help="bias N token ids of every row")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    full_decode = SimpleNamespace(decode=tokenizer.decode, is_fast=False)
    overhead_per_step(model, tokenizer, tokenizer, 4, 8)  # warm-up
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "frequency_penalty": args.frequency_penalty,
                "logit_bias": {token: 1.0 for token in range(args.logit_bias)}}
    incremental, forward = overhead_per_step(model, tokenizer, tokenizer, args.rows, args.tokens, **sampling)
    redecoded, _ = overhead_per_step(model, tokenizer, full_decode, args.rows, args.tokens, **sampling)
    _, copied_forward = overhead_per_step(model, tokenizer, tokenizer, args.rows, args.tokens, **sampling,
                                          kv_room_tokens=0)
    print(f"{args.model}, {args.rows} rows x {args.tokens} tokens, {sampling}; on this CPU:")
    print(f"  forward pass, KV cache with room ahead:                 {forward:.2f} ms/step")
    print(f"  forward pass, KV cache copied every step (torch.cat):   {copied_forward:.2f} ms/step "
          f"({copied_forward / forward:.2f}x)")
    print(f"  outside the forward pass, incremental detokenization: {incremental:.2f} ms/step")
    print(f"  outside the forward pass, full decode every step:      {redecoded:.2f} ms/step "
          f"({redecoded / incremental:.1f}x)")


if __name__ == "__main__":
    main()
