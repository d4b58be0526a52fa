"""Row 4: LitServe serving the same model with its own batching and its OpenAI spec.

LitServe collects up to `max_batch_size` requests (waiting at most
`batch_timeout`), runs them as one left-padded batch through `generate`, and
streams each step's tokens back through its OpenAI spec (which also assembles
the non-streamed answers). It is static batching: a request that arrives while
a batch decodes waits for the whole batch to finish. Every completion runs
exactly `max_tokens` tokens (greedy, `min_new_tokens`), like the other rows.

    python -m bench.litserve_server --model models/bench-llama --port 8001 --max-batch-size 16
"""

from __future__ import annotations

import argparse
import queue
import threading
from typing import Any, Iterator

import litserve as ls
import torch
from litserve.specs.openai import ChatCompletionRequest
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class StepQueue(BaseStreamer):
    """Each decoding step's tokens (one per row) from generate()'s thread; None at the end."""

    def __init__(self) -> None:
        self.steps: queue.Queue[list[int] | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.steps.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (step := self.steps.get()) is not None:
            yield step


class BatchedChatAPI(ls.LitAPI):
    """Batched greedy decoding behind LitServe's OpenAI spec."""

    def setup(self, device: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def decode_request(self, request: ChatCompletionRequest, context: dict[str, Any]) -> dict[str, Any]:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     "".join(part.text for part in m.content if getattr(part, "text", None))}
                    for m in request.messages]
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return {"prompt": prompt, "max_tokens": request.max_tokens or 64}

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(inputs)

    def predict(self, inputs: list[dict[str, Any]]) -> Iterator[list[tuple[str, bool]]]:
        """Yields, per decoding step, one (text delta, still generating) pair per request of the batch."""
        max_tokens = max(item["max_tokens"] for item in inputs)
        encoded = self.tokenizer([item["prompt"] for item in inputs], return_tensors="pt",
                                 padding=True, add_special_tokens=False)
        streamer = StepQueue()
        kwargs = dict(**encoded, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                      pad_token_id=self.pad_id, streamer=streamer)
        worker = threading.Thread(target=self._generate, args=(kwargs, streamer), daemon=True)
        worker.start()
        for step, tokens in enumerate(streamer):
            yield [(self.tokenizer.decode([token]), True) if step < item["max_tokens"] else ("", False)
                   for token, item in zip(tokens, inputs)]
        worker.join()

    def _generate(self, kwargs: dict[str, Any], streamer: StepQueue) -> None:
        try:
            with torch.inference_mode():
                self.model.generate(**kwargs)
        finally:
            streamer.end()

    def unbatch(self, output: Iterator[list[tuple[str, bool]]]) -> Iterator[list[tuple[str, bool]]]:
        return output

    def encode_response(self, outputs: Iterator[list[tuple[str, bool]]],
                        context: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Per step, one message per request. LitServe's spec sums `completion_tokens` over the
        chunks of a non-streamed answer but reports the last chunk's for a stream, so a stream's
        chunks carry the running count and a non-streamed answer's chunks carry 1 each."""
        counts = [0] * len(context)
        for step in outputs:
            messages = []
            for i, ((text, live), ctx) in enumerate(zip(step, context)):
                counts[i] += int(live)
                used = counts[i] if ctx.get("stream") else int(live)
                messages.append({"role": "assistant", "content": text, "completion_tokens": used,
                                 "prompt_tokens": 0, "total_tokens": used})
            yield messages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    args = parser.parse_args()
    api = BatchedChatAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout,
                         spec=ls.OpenAISpec())
    api.model_path = args.model
    # fast_queue: LitServe's ZeroMQ transport for its responses (its default passes each one through a
    # multiprocessing.Manager queue proxy, one message per step per request: slower, and not how a
    # user after throughput would run it).
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=600, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
