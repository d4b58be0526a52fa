"""Test-only chat model (`engine: echo`): a fixed answer at once, no torch, no weights.

It lets a benchmark measure the serving path alone (proxy, ingress, handle) with the
same routes and envelopes as a real model. Never part of the default config.
"""

from __future__ import annotations

from typing import AsyncIterator

from ray import serve

from serve_app.config import ChatModelConfig
from serve_app.jobs import ChatChoiceResult, ChatJob, ChatResult, ChatStreamChunk, ChoiceDelta

ANSWER = "echo"


@serve.deployment
class EchoModel:
    def __init__(self, config: ChatModelConfig) -> None:
        self.config = config

    async def generate(self, job: ChatJob) -> ChatResult:
        return ChatResult(choices=[ChatChoiceResult(ANSWER, "stop", 1) for _ in range(job.n)], prompt_tokens=1)

    async def generate_stream(self, job: ChatJob) -> AsyncIterator[ChatStreamChunk]:
        yield ChatStreamChunk([ChoiceDelta(i, ANSWER, "stop") for i in range(job.n)], 1, job.n)
