"""Edge drafting after an exact takeover, end to end (docs/PROTOCOL.md section 12, "Drafting
after the takeover"): a real coordinator, edge agent and two cloud workers (reference GPT-2,
one generation at a time: both say `drafts: true`).

Several exact generations start on the edge (paced, so that the clouds' cold start ends while
they run); the clouds take them over and the edge keeps drafting at full speed. Whatever the
drafts, every result is the cloud model's own greedy decode, bit for bit, and said exact; the
clouds' RESULT timings (relayed as worker_*) record drafts accepted. While they run, the cloud
that made the first takeover is frozen (SIGSTOP) mid-draft, and later the edge is killed
(SIGKILL) mid-draft: each generation still ends in exactly one REPLY, exact, its tokens the
cloud model's. One stack serves every case, so the clouds cold-start once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np

from cicada.client import AsyncClient, InvokeResult, Piece
from cicada.testing import Stack
from tests.integration.test_exact_generation import assets, prompts, reference

__all__ = ["assets"]  # the module-scoped fixture: the cloud's package and a noisy edge

EDGE_TOKEN_S = 0.25  # the provisional tokens: 100+ of them outlast a cold start (bounded wait)
LENGTHS = (100, 120, 140, 160, 180)


def test_drafted_exact_generations_equal_the_cloud_models_greedy_decode(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    cases = list(zip(prompts(len(LENGTHS), seed=7), LENGTHS, strict=True))
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.edge("gpt2", assets["edge"], "edge", "--token-interval", str(EDGE_TOKEN_S),
                   "--draft-interval", "0", "--capacity", "8")  # fmt: skip
        stack.wait_workers("edge")
        events: dict[str, str] = {}

        async def run() -> list[tuple[list[Piece], InvokeResult]]:
            async with AsyncClient(stack.address, timeout=180) as client:
                first: set[int] = set()
                rewinds: list[str] = []

                async def one(i: int) -> tuple[list[Piece], InvokeResult]:
                    prompt, n = cases[i]
                    got: list[Piece] = []
                    async with client.stream("gpt2", prompt, max_new_tokens=n,
                                             exact=True) as stream:  # fmt: skip
                        async for piece in stream:
                            got.append(piece)
                            first.add(i)
                            if len(first) == len(cases) and "clouds" not in events:
                                events["clouds"] = "started"
                                stack.cloud("gpt2", assets["package"], "cloud-a")
                                stack.cloud("gpt2", assets["package"], "cloud-b")
                            if piece.rewind is not None:
                                rewinds.append(piece.served_by["worker"])
                                if len(rewinds) == 1:  # a cloud frozen mid-draft
                                    events["frozen"] = rewinds[0]
                                    os.killpg(stack.procs[rewinds[0]].pid, signal.SIGSTOP)
                                elif len(rewinds) == 3 and "killed" not in events:
                                    events["killed"] = "edge"  # the edge dies mid-draft
                                    os.killpg(stack.procs["edge"].pid, signal.SIGKILL)
                    assert stream.result is not None
                    return got, stream.result

                return await asyncio.gather(*(one(i) for i in range(len(cases))))

        outcomes = asyncio.run(run())
        assert "frozen" in events and "killed" in events, events
        drafted = accepted = 0
        for (prompt, n), (pieces, result) in zip(cases, outcomes, strict=True):
            expected = reference(prompt, n)
            info = result.generation
            assert info is not None
            assert result.output.tolist() == expected, "bit for bit the cloud model's decode"
            assert info.exact is True
            # The client saw the generation as it stands after each piece end at the result,
            # and no drafted token ever reached it: after the last rewind only cloud tokens.
            last = max(i for i, p in enumerate(pieces) if p.rewind is not None)
            after = pieces[last + 1 :]
            assert all(p.role == "cloud" and not p.provisional for p in after)
            assert [p.position for p in after] == list(range(pieces[last].rewind or 0, n))
            drafted += int(result.timings.get("worker_drafted", 0))
            accepted += int(result.timings.get("worker_accepted", 0))
        assert 0 < accepted <= drafted, (accepted, drafted)
        # The coordinator serves on: the frozen cloud was dropped, the other one answers.
        os.killpg(stack.procs[events["frozen"]].pid, signal.SIGCONT)
        prompt = np.asarray([[3, 1, 4, 1, 5]], dtype=np.int64)

        async def after() -> InvokeResult:
            async with AsyncClient(stack.address, timeout=60) as client:
                return await client.invoke("gpt2", prompt, max_new_tokens=6, exact=True)

        again = asyncio.run(after())
        assert again.output.tolist() == reference(prompt, 6)
