"""Row 3, the baseline: the server a user writes first. One process, FastAPI,
`model.generate` for chat and a diffusers pipeline for images, one request at a
time (an asyncio lock around the model), OpenAI-shaped JSON and SSE.

Two deliberate deviations from the most naive code, both so that the benchmark
stays fair and bounded: a queued request whose client already left is skipped
(otherwise a cut cell would spill minutes of work into the next one), and every
completion generates exactly `max_tokens` tokens (`min_new_tokens`, i.e.
ignore-EOS), like the other systems are asked to.

    python -m bench.naive_server --model models/bench-llama --image-model models/tiny-sd --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


class ChatModel:
    """Tokenizer + causal LM; used by this server and by the in-process TTFT probe."""

    def __init__(self, path: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def encode(self, messages: list[dict[str, Any]]) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

    def generate(self, input_ids: torch.Tensor, max_tokens: int, seed: int | None = None,
                 streamer: BaseStreamer | None = None, stop: threading.Event | None = None,
                 ignore_eos: bool = True) -> torch.Tensor:
        """Greedy decoding of `max_tokens` new tokens (fewer only when `stop` is set or EOS is honoured)."""
        if seed is not None:
            torch.manual_seed(seed)
        criteria = StoppingCriteriaList([_StopOn(stop)]) if stop is not None else None
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                min_new_tokens=max_tokens if ignore_eos else None, do_sample=False, pad_token_id=self.pad_id,
                streamer=streamer, stopping_criteria=criteria)
        return output[0, input_ids.shape[1]:]


class _StopOn(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class AsyncTokenStreamer(BaseStreamer):
    """Each new token id, from generate()'s thread to an asyncio queue; None at the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue, self.prompt_seen = loop, asyncio.Queue(), False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def build_app(chat: ChatModel, image_path: str | None) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()
    pipeline: dict[str, Any] = {}
    if image_path:
        from diffusers import DiffusionPipeline

        pipeline["pipe"] = DiffusionPipeline.from_pretrained(image_path)
        pipeline["pipe"].set_progress_bar_config(disable=True)

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await request.json()
        input_ids = chat.encode(body["messages"])
        max_tokens = int(body.get("max_tokens") or 64)
        if body.get("stream"):
            return StreamingResponse(stream(request, body, input_ids, max_tokens), media_type="text/event-stream")
        async with lock:
            if await request.is_disconnected():
                return Response(status_code=499)
            tokens = await run_in_threadpool(chat.generate, input_ids, max_tokens, body.get("seed"))
        text = chat.tokenizer.decode(tokens, skip_special_tokens=True)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", ""), "usage": usage(input_ids.shape[1], len(tokens)),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}]})

    async def stream(request: Request, body: dict[str, Any], input_ids: torch.Tensor,
                     max_tokens: int) -> AsyncIterator[bytes]:
        chunk = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                 "created": int(time.time()), "model": body.get("model", "")}
        async with lock:
            streamer, stop = AsyncTokenStreamer(asyncio.get_running_loop()), threading.Event()
            run = asyncio.ensure_future(run_in_threadpool(
                chat.generate, input_ids, max_tokens, body.get("seed"), streamer, stop))
            count = 0
            try:
                while (token := await streamer.queue.get()) is not None:
                    delta = {"content": chat.tokenizer.decode([token])} | ({} if count else {"role": "assistant"})
                    count += 1
                    yield _sse(chunk | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                await run
            finally:
                stop.set()  # client gone: stop at the next step, then release the lock
                await asyncio.shield(asyncio.wait([run]))
        yield _sse(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _sse(chunk | {"choices": [], "usage": usage(input_ids.shape[1], count)})
        yield _sse("[DONE]")

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Response:
        body = await request.json()
        width, height = (int(v) for v in str(body.get("size", "64x64")).lower().split("x"))
        async with lock:
            if await request.is_disconnected():
                return Response(status_code=499)
            images = await run_in_threadpool(lambda: pipeline["pipe"](
                prompt=body["prompt"], num_images_per_prompt=int(body.get("n") or 1),
                num_inference_steps=int(body.get("steps") or 2), width=width, height=height,
                generator=torch.Generator().manual_seed(int(body.get("seed") or 0))).images)
        data = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)  # serve_app's png_compress_level: equal work
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode()})
        return JSONResponse({"created": int(time.time()), "data": data})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--image-model")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = build_app(ChatModel(args.model), args.image_model)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
