"""The serving path alone: an echo "model" that answers a fixed chat completion.

The same handler runs two ways:
- `plain_app`: in plain uvicorn (`uvicorn bench.echo_app:plain_app`), the floor;
- `build_ray_app`: through Ray Serve, a minimal ingress deployment (FastAPI, one
  route) that calls an echo model deployment through a `DeploymentHandle`, the shape
  of serve_app's own path (proxy -> ingress -> model) without serve_app's ingress;
  the benchmark measures it beside serve_app's echo model, so the difference is
  serve_app's own ingress work.

No `from __future__ import annotations` here: FastAPI must see the real
`Request` annotation of the methods of a class defined inside a function.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ANSWER = "echo"


def echo_completion(body: dict[str, Any]) -> dict[str, Any]:
    """A fixed, OpenAI-shaped chat completion (1 completion token)."""
    return {"id": "chatcmpl-echo", "object": "chat.completion", "created": 0, "model": body.get("model", "echo"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


plain_app = FastAPI()


@plain_app.post("/v1/chat/completions")
async def plain_chat(request: Request) -> JSONResponse:
    return JSONResponse(echo_completion(await request.json()))


@plain_app.get("/health")
async def plain_health() -> dict[str, str]:
    return {"status": "ok"}


def build_ray_app(args: dict[str, Any] | None = None):
    """Ingress + echo model deployments; `args` may set `max_ongoing_requests` (default 512)."""
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    limit = int((args or {}).get("max_ongoing_requests", 512))
    api = FastAPI()

    @serve.deployment(max_ongoing_requests=limit, ray_actor_options={"num_cpus": 0.05})
    class EchoModel:
        async def generate(self, body: dict[str, Any]) -> dict[str, Any]:
            return echo_completion(body)

    @serve.deployment(max_ongoing_requests=limit, ray_actor_options={"num_cpus": 0.05})
    @serve.ingress(api)
    class EchoIngress:
        def __init__(self, model: DeploymentHandle) -> None:
            self.model = model

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> JSONResponse:
            return JSONResponse(await self.model.generate.remote(await request.json()))

        @api.get("/health")
        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

    return EchoIngress.bind(EchoModel.bind())


def build_handle_floor_app(args: dict[str, Any] | None = None):
    """Ray's own floor for the model hop: a caller deployment awaiting an echo deployment's
    handle in a loop, no HTTP anywhere. The same objects cross as on serve_app's chat route
    (a `ChatJob` out, a `ChatResult` back) over the same transport (Serve's defaults in the
    environment: gRPC between replicas under RAY_SERVE_THROUGHPUT_OPTIMIZED).

    `GET /run?concurrency=C&seconds=S` runs C concurrent loops for S seconds inside the
    caller replica and answers the wall time and every call's latency (the benchmark
    summarises them like any cell). No serving path through this Serve instance can beat
    this rate: it is the model hop alone.
    """
    import asyncio
    import time

    from ray import serve
    from ray.serve.handle import DeploymentHandle

    from serve_app.jobs import ChatChoiceResult, ChatJob, ChatResult

    limit = int((args or {}).get("max_ongoing_requests", 512))
    api = FastAPI()

    @serve.deployment(max_ongoing_requests=limit, ray_actor_options={"num_cpus": 0.05})
    class FloorEcho:
        async def generate(self, job: ChatJob) -> ChatResult:
            return ChatResult(choices=[ChatChoiceResult(ANSWER, "stop", 1)], prompt_tokens=1)

    @serve.deployment(max_ongoing_requests=limit, ray_actor_options={"num_cpus": 0.05})
    @serve.ingress(api)
    class FloorCaller:
        def __init__(self, echo: DeploymentHandle) -> None:
            self.echo = echo.options(method_name="generate")

        @api.get("/run")
        async def run(self, concurrency: int = 1, seconds: float = 3.0) -> JSONResponse:
            job = ChatJob(messages=[{"role": "user", "content": "ping"}], max_tokens=1, max_tokens_explicit=True)
            latencies: list[float] = []
            end = time.perf_counter() + seconds

            async def loop() -> None:
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    await self.echo.remote(job)
                    latencies.append(time.perf_counter() - started)

            began = time.perf_counter()
            await asyncio.gather(*(loop() for _ in range(concurrency)))
            return JSONResponse({"wall_s": time.perf_counter() - began, "latencies_s": latencies})

        @api.get("/health")
        async def health(self) -> dict[str, str]:
            return {"status": "ok"}

    return FloorCaller.bind(FloorEcho.bind())
