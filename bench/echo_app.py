"""The serving path alone: an echo "model" that answers a fixed chat completion.

The same handler runs two ways:
- `plain_app`: in plain uvicorn (`uvicorn bench.echo_app:plain_app`), the floor;
- `build_ray_app`: through Ray Serve, an ingress deployment (FastAPI) that calls
  an echo model deployment through a `DeploymentHandle`, the shape of serve_app's
  own path (proxy -> ingress -> model). The benchmark uses this only while
  serve_app has no echo model kind of its own; with one, it measures serve_app.

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
