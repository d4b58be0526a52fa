"""In-process reference and prompt screening, run as a subprocess of the benchmark
(so the load generator's process never imports torch).

1. Time to first token of a plain `model.generate` call with a streamer, in the
   same process, at concurrency 1: the floor the servers' TTFT is compared with. Timed
   on the prompts of the c=1 cells (the first `--probes` kept ones, as many as those
   cells send), after a warm-up of several calls and on a settled machine, as the
   servers are measured: one prompt alone (the longest, say) would set another floor.
2. Which candidate prompts run `max_tokens` greedy tokens without meeting EOS:
   the benchmark sends only those, so that a server that honours EOS (ours does;
   it has no ignore-EOS switch) still generates exactly `max_tokens` per request.
   Their first token must also show as text: a special token or part of a
   character shows nothing in serve_app's stream until a later token (the naive
   server and LitServe send its raw bytes), which would time a later token there.

    python -m bench.inprocess --model models/bench-llama --max-tokens 64 --prompts prompts.json
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from bench.loadgen import percentile
from bench.naive_server import ChatModel
from bench.procs import wait_quiet


class FirstTokenClock(BaseStreamer):
    """Notes when generate() hands over its first new token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_at is None:
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def ttft_ms(chat: ChatModel, messages: list[dict[str, Any]], max_tokens: int) -> float:
    """Wall time from the call (prompt encoding included, as a server does it) to the first token."""
    clock = FirstTokenClock()
    started = time.perf_counter()
    chat.generate(chat.encode(messages), max_tokens, seed=0, streamer=clock)
    assert clock.first_at is not None
    return (clock.first_at - started) * 1000.0


def comparable(chat: ChatModel, messages: list[dict[str, Any]], max_tokens: int) -> bool:
    """True when greedy decoding honouring EOS still produces `max_tokens` tokens, the first
    of which shows as text by itself (every server's first streamed text is then that token)."""
    tokens = chat.generate(chat.encode(messages), max_tokens, seed=0, ignore_eos=False)
    first = chat.tokenizer.decode(tokens[:1], skip_special_tokens=True)
    return len(tokens) == max_tokens and bool(first) and "\ufffd" not in first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--prompts", required=True, help="JSON file: a list of message lists")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the probe prompts")
    parser.add_argument("--probes", type=int, default=6, help="how many of the kept prompts to time "
                        "(the c=1 cells' requests cycle through them in this order)")
    args = parser.parse_args()
    candidates: list[list[dict[str, Any]]] = json.loads(open(args.prompts).read())
    chat = ChatModel(args.model)
    keep = [i for i, messages in enumerate(candidates) if comparable(chat, messages, args.max_tokens)]
    kept = [candidates[i] for i in keep] or candidates
    probes = [kept[i % len(kept)] for i in range(args.probes)]
    for messages in probes:  # warm-up: every probe once
        ttft_ms(chat, messages, 4)
    wait_quiet()
    samples = sorted(ttft_ms(chat, messages, 4) for _ in range(args.repeats) for messages in probes)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "keep": keep, "probes": len(probes),
                      "ttft_ms": [round(s, 2) for s in samples],
                      "ttft_p50_ms": round(percentile(samples, 50), 2)}))  # the median the servers' get


if __name__ == "__main__":
    main()
