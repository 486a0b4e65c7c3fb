"""Continuous batching of generations end to end: a real coordinator and a cloud worker
process (`--max-batch-size 4`), six generations sent at once through the SDK.

Each must get exactly the tokens of its own greedy decode alone (eager PyTorch on the
package's weights), and the worker must have decoded them together: its RESULT timings say
with how many streams each was decoded at most in one step (`worker_decode_streams`). The
first four form one batch (preferred size 4, a bounded wait for it, not timing); the other two
join the running streams when room frees up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from cicada.client import AsyncClient, InvokeResult
from cicada.cloud.generate import decoder_for
from cicada.cloud.models import gpt2
from cicada.common.generation import GenerationRequest, generate
from cicada.common.package import WEIGHTS_NAME
from cicada.testing import Stack, tiny_gpt2_config

DELAY_MS = "30000"  # the most the worker waits for the first four to arrive
PLAN = [(3, 12), (8, 5), (14, 20), (5, 9), (1, 16), (11, 7)]  # (prompt length, new tokens)


def prompts() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    vocab = tiny_gpt2_config()["vocab_size"]
    return [rng.integers(0, vocab, size=(1, t), dtype=np.int64) for t, _ in PLAN]


def alone(package: Path, prompt: np.ndarray, n: int) -> list[int]:
    model = gpt2.build(**tiny_gpt2_config())
    model.load_state_dict(load_file(package / WEIGHTS_NAME), strict=False)  # ties: constructor
    request = GenerationRequest.parse({"max_new_tokens": n}, [prompt])
    return generate(decoder_for(model.eval()), request, lambda t: None).tokens


async def generate_all(address: str, inputs: list[np.ndarray]) -> list[InvokeResult]:
    async with AsyncClient(address, timeout=120) as client:
        return await asyncio.gather(
            *(client.invoke("m", x, max_new_tokens=n, priority=2)
              for x, (_, n) in zip(inputs, PLAN, strict=True))
        )  # fmt: skip


def test_concurrent_generations_decode_together_each_with_its_own_tokens(
    tmp_path: Path, tiny_package: dict[str, Path]
) -> None:
    package, inputs = tiny_package["package"], prompts()
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.cloud("m", package, "cloud", "--max-batch-size", "4", "--max-queue-delay-ms",
                    DELAY_MS, "--preferred-batch-sizes", "4")  # fmt: skip
        stack.wait_workers("cloud", state="ready")
        results = asyncio.run(generate_all(stack.address, inputs))
    for i, (result, x, (_, n)) in enumerate(zip(results, inputs, PLAN, strict=True)):
        assert result.output.tolist() == alone(package, x, n), f"generation {i}"
        assert result.token_sources == ["cloud"] * n
    together = [r.timings["worker_decode_streams"] for r in results]
    assert max(together) == 4.0, f"never more than max_batch_size streams: {together}"
    assert together.count(4.0) >= 4, f"the first four decoded as one batch: {together}"
