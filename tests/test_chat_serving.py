"""Chat serving under concurrency: batching keeps each request's own result; disconnects stop work."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from ray import serve

from tests import disconnect
from tests.test_server import CHAT, SEED_CHAT


def chat_stats() -> dict:
    handle = serve.get_deployment_handle("model_Llama3-8B", app_name="serve_app")
    return handle.stats.remote().result()


def test_seed_gives_the_same_output_alone_and_under_load(server):
    request = {**SEED_CHAT, "max_tokens": 24, "temperature": 1.0, "seed": 1234}

    async def run() -> tuple[str, list[str]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            alone = (await client.post("/v1/chat/completions", json=request)).json()
            others = [client.post("/v1/chat/completions", json={
                **SEED_CHAT, "max_tokens": 5 + i, "temperature": 0.7, "seed": i,
                "messages": [{"role": "user", "content": "Different " * (i + 1)}]}) for i in range(8)]
            same = [client.post("/v1/chat/completions", json=request) for _ in range(3)]
            answers = await asyncio.gather(*others, *same)
            return alone["choices"][0]["message"]["content"], [a.json()["choices"][0]["message"]["content"]
                                                                for a in answers[-3:]]

    alone, under_load = asyncio.run(run())
    assert under_load == [alone] * 3


def test_concurrent_requests_share_decode_steps(server):
    before = chat_stats()["decode_steps"]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            calls = [client.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": 20, "temperature": 0,
                                                               "stop": None}) for _ in range(8)]
            return [r.json() for r in await asyncio.gather(*calls)]

    bodies = asyncio.run(run())
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    steps = chat_stats()["decode_steps"] - before
    assert tokens >= 8 * 10
    # Alone, every token is a step of its own; together the 8 share steps (about 7.5 tokens a
    # step here). Three a step on average leaves room for slow arrivals on a busy machine.
    assert 3 * steps <= tokens, f"{steps} decode steps for {tokens} tokens: too little batching"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_disconnect_stops_generation(server, stream):
    host, port = server.removeprefix("http://").split(":")
    disconnect.check(disconnect.hang_up_mid_generation(host, int(port), CHAT, stream, chat_stats))


def test_late_request_joins_the_running_batch(server):
    """Continuous batching: a request arriving mid-generation decodes in the same steps as the
    running one (a static batch would make it wait, or run a second batch with its own steps)."""

    async def run() -> tuple[int, dict]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            long_body = {**SEED_CHAT, "stream": True, "max_tokens": 600, "temperature": 0, "stop": None}
            async with client.stream("POST", "/v1/chat/completions", json=long_body) as stream:
                lines = stream.aiter_lines()
                while "content" not in await anext(lines):
                    pass
                before = await asyncio.to_thread(chat_stats)
                short = await client.post("/v1/chat/completions", json={
                    **SEED_CHAT, "max_tokens": 100, "temperature": 0, "stop": None})
                after = await asyncio.to_thread(chat_stats)
                return ((after["decode_steps"] - before["decode_steps"],
                         after["decoded_tokens"] - before["decoded_tokens"]), short.json())

    (steps, decoded), short = asyncio.run(run())
    tokens = short["usage"]["completion_tokens"]
    assert tokens == 100
    # Two requests at most were decoding, so every step beyond one token is a step the two
    # shared: all of the short one's, if it joined the running batch (however long the window
    # around it); none, if it ran in a batch of its own.
    assert decoded - steps >= tokens - 1, f"{decoded} tokens in {steps} steps: the {tokens}-token request " \
                                          "did not decode beside the running one"


def test_torch_threads_from_config_override_rays_one_thread_default(cluster, server):
    """Ray gives a replica with `num_cpus` below 2 OMP_NUM_THREADS=1; `torch_threads` sets the real count."""
    import os

    args = cluster.args(route_prefix="/threads")
    chat = next(m for m in args["models"] if m["kind"] == "chat")
    args["models"] = [{**chat, "name": "chat-threads", "torch_threads": 3,
                       "deployment": {**chat["deployment"], "num_cpus": 0.25}}]
    try:
        base = cluster.deploy(args, name="threads_app", route_prefix="/threads")
        threads = serve.get_deployment_handle("model_chat-threads", app_name="threads_app").torch_threads
        assert threads.remote().result() == 3
        answer = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "chat-threads", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        serve.delete("threads_app")
    # The default app's models keep Ray's rule: 1, or the OMP_NUM_THREADS the shell exports (which Ray keeps).
    default = serve.get_deployment_handle("model_Llama3-8B", app_name="serve_app").torch_threads
    assert default.remote().result() == int(os.environ.get("OMP_NUM_THREADS", "1"))
