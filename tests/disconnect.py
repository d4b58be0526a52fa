"""A client that hangs up mid-generation, and what the chat replica did about it.

Shared by the suite's own Serve instance (`test_chat_serving`) and the local
multi-node cluster, which runs the default launch (HAProxy in front, direct
ingress, gRPC between replicas): the cluster is another Ray than the test
process's, so there this module runs as a driver of its own,

    RAY_ADDRESS=127.0.0.1:6390 python -m tests.disconnect --app serve_app --model chat-a --port 8000

and prints its findings as one JSON line, `{"stream": {...}, "json": {...}, "timed_out": [...]}`
(one hang-up of each kind, then clients that time out, through one connection to Ray:
joining it takes seconds).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from typing import Callable

import httpx

from tests.conftest import wait_for

LONG = 1000
"""Tokens asked for: the tiny model's greedy answer to PROMPT runs all of them (no end of sequence)."""
PROMPT = "Tell me a story"


def _body(model: str, stream: bool) -> bytes:
    return json.dumps({"model": model, "stream": stream, "max_tokens": LONG, "temperature": 0, "stop": None,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()


def hang_up_mid_generation(host: str, port: int, model: str, stream: bool,
                           stats: Callable[[], dict]) -> dict:
    """Check that the request runs all LONG tokens when left alone, then send it on a raw
    socket, wait until the replica counts it in flight (`stats`: the chat replica's
    `stats()`), hang up, and measure how long the replica went on.

    Returns the whole answer's finish_reason and completion tokens, the seconds until the
    replica had nothing in flight, the decode steps run between sending and then, and the
    steps run in the half second after that (none are expected)."""
    whole = httpx.post(f"http://{host}:{port}/v1/chat/completions", content=_body(model, False),
                       headers={"Content-Type": "application/json"}, timeout=120).json()
    before = stats()["decode_steps"]
    body = _body(model, stream)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        if stream:
            assert b"200 OK" in sock.recv(4096)
        started = wait_for(lambda: stats()["active_requests"] == 1, timeout=10, interval=0.02)
    left = time.monotonic()
    quiet = wait_for(lambda: stats()["active_requests"] == 0, timeout=10, interval=0.02)
    stopped_after = time.monotonic() - left
    steps = stats()["decode_steps"]
    time.sleep(0.5)
    return {"finish_reason": whole["choices"][0]["finish_reason"], "completion_tokens": whole["usage"]["completion_tokens"],
            "started": started, "quiet": quiet, "stopped_after_s": stopped_after,
            "steps_before_quiet": steps - before, "steps_after_quiet": stats()["decode_steps"] - steps}


TIMED_OUT_TRIES = 6
"""Clients that time out, one after another: behind HAProxy with kernel splicing on, about half
their hang-ups went unseen, so 6 that all stop are no luck (1 in 64)."""


def time_out_waiting(host: str, port: int, model: str, stats: Callable[[], dict]) -> list[int]:
    """What a client with a short timeout does (the OpenAI client's `timeout=`, then a retry):
    send a non-streamed request with httpx, give up after 0.3 s, and close the connection.
    Returns, for each try, the decode steps the replica ran until it had nothing in flight."""
    steps = []
    for _ in range(TIMED_OUT_TRIES):
        before = stats()["decode_steps"]
        try:
            httpx.post(f"http://{host}:{port}/v1/chat/completions", content=_body(model, False),
                       headers={"Content-Type": "application/json"}, timeout=0.3)
        except httpx.TimeoutException:
            pass
        wait_for(lambda: stats()["active_requests"] == 0, timeout=15, interval=0.02)
        steps.append(stats()["decode_steps"] - before)
        time.sleep(0.5)
    return steps


def check_timed_out(steps: list[int]) -> None:
    """Every timed-out request reached the replica and stopped (all LONG tokens take LONG steps;
    0.3 s takes a few dozen)."""
    assert all(0 < ran < LONG // 2 for ran in steps), f"decode steps per timed-out request: {steps}"


def check(found: dict) -> None:
    """The assertions every caller makes of `hang_up_mid_generation`'s findings."""
    # Left alone, the request runs all LONG tokens: stopping it early means something.
    assert found["finish_reason"] == "length" and found["completion_tokens"] == LONG, found
    assert found["started"], f"the request never reached the replica: {found}"
    assert found["quiet"], f"still in flight 10 s after the client left: {found}"
    # The step already running when the client left may still finish; none may start after it.
    assert found["steps_after_quiet"] <= 1, f"still decoding after the client left: {found}"
    assert found["steps_before_quiet"] < LONG // 4, f"generation went on after the client left: {found}"
    # Seconds, where a step takes milliseconds: only a slow, loaded CI machine comes near it.
    assert found["stopped_after_s"] < 5.0, f"generation went on for {found['stopped_after_s']:.2f}s: {found}"


def main() -> None:
    import ray
    from ray import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--app", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ray.init(log_to_driver=False)  # RAY_ADDRESS names the cluster
    replica = serve.get_deployment_handle(f"model_{args.model}", app_name=args.app)
    stats = lambda: replica.stats.remote().result()  # noqa: E731
    found = {mode: hang_up_mid_generation(args.host, args.port, args.model, mode == "stream", stats)
             for mode in ("stream", "json")}
    found["timed_out"] = time_out_waiting(args.host, args.port, args.model, stats)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
