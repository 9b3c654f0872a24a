"""Real faults in the engine and its model server, without Ray."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine import PROMPTS

# -- the model server's accounting (its class, without Serve: real engine, real Ray metric objects) ----------------


@pytest.fixture
def model_server(tiny_base):
    from strata.serve.model_server import ModelServer

    variant = {"name": "stable", "model": str(tiny_base), "engine": {"torch_threads": torch.get_num_threads()}}
    server = ModelServer.func_or_class("strata-tiny", variant, None)
    yield server
    server.engine.stop()


def generate(server, prompt: str, max_tokens: int) -> list[dict]:
    """All chunks of one completion; an exception raised mid-stream is returned as the last item."""
    from strata.serve.protocol import CompletionRequest
    from strata.serve.router import engine_request

    request = engine_request(CompletionRequest(model="strata-tiny", prompt=prompt, temperature=0), max_tokens)

    async def collect() -> list:
        chunks = []
        try:
            async for chunk in server.generate(request):
                chunks.append(chunk)
        except RuntimeError as err:
            chunks.append(err)
        return chunks

    return asyncio.run(asyncio.wait_for(collect(), timeout=300))  # a request left without an answer fails, not hangs


def test_an_engine_failure_is_counted_as_an_error_not_a_cancellation(model_server, tiny_base):
    """The fault of test_engine's failing-model test, under the model server: the request metric says "error"."""
    finished = generate(model_server, PROMPTS[0], 4)[-1]["finish_reason"]
    layer = model_server.engine.model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.zeros(3, 3))  # the fault: every forward fails from now on
    [failed] = generate(model_server, PROMPTS[0], 4)
    assert failed["status"] == 503 and "generation failed" in failed["error"]
    assert model_server.engine.failure
    assert model_server.finish_reasons == {finished: 1, "error": 1}
