"""Exact generations end to end (docs/PROTOCOL.md section 12): real coordinator, edge agent and
cloud worker processes.

With `exact=True` the final tokens must be the cloud model's own greedy decode of the prompt,
bit for bit, whenever the cloud takes over: at once (no provisional token), mid-way (the
edge's tokens streamed provisional, then one rewind to exactly the first position where they
disagree with the cloud's decode), or never (the edge finished first: the result says it is
not exact). The reference is what the same cloud worker answers with `exact` off, and eager
PyTorch greedy decoding of the same weights.

One stack serves every case in turn (never, mid-way, at once, a cloud lost after the
takeover), so that its cloud workers cold-start once.

The edge serves a full-depth export of the cloud model's weights plus noise: it agrees with the
cloud for a few tokens and then drifts, so rewinds land at varied positions, not always at 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cicada.client import AsyncClient, Client, InvokeResult, Piece, TokenSequence
from cicada.common.generation import GenerationRequest, generate
from cicada.edge.onnx_model import EdgeModel
from cicada.errors import BadRequest
from cicada.testing import Stack
from tests.generation_assets import SHARP_CONFIG, make_generation_assets, sharp_gpt2

# Seconds between an edge agent's tokens: the mid-way generations (>= 80 tokens) cannot end
# on the edge before a cloud worker started after their first tokens is up (20 s at least, a
# bound on waiting, not a race).
EDGE_TOKEN_S = 0.25
MODEL = sharp_gpt2()
PROMPT = np.asarray([[3, 14, 15, 92, 6, 53]], dtype=np.int64)


def reference(prompt: np.ndarray, n: int) -> list[int]:
    """Eager PyTorch greedy decoding of the cloud's weights, with a KV cache."""
    from cicada.cloud.generate import CachedGPTDecoder

    decoder = CachedGPTDecoder(MODEL.decode, MODEL, "cpu", MODEL.decode)
    request = GenerationRequest(np.asarray(prompt, dtype=np.int64).reshape(-1), n)
    return generate(decoder, request, lambda t: None).tokens


def edge_decode(edge_dir: Path, prompt: np.ndarray, n: int) -> list[int]:
    decoder = EdgeModel.load(edge_dir).new_decoder()
    assert decoder is not None
    request = GenerationRequest(np.asarray(prompt, dtype=np.int64).reshape(-1), n)
    return generate(decoder, request, lambda t: None).tokens


def agreeing(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of `a` and `b`."""
    j = 0
    while j < min(len(a), len(b)) and a[j] == b[j]:
        j += 1
    return j


def prompts(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = SHARP_CONFIG["vocab_size"]
    return [rng.integers(0, vocab, size=(1, int(rng.integers(1, 16)))) for _ in range(count)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cloud's package, and an edge model of the same depth whose weights are the cloud's
    with 2 % noise (a stand-in for a distilled or quantized edge model): its greedy tokens
    agree with the cloud's for a few positions, then drift."""
    import torch
    from safetensors.torch import save_model

    from cicada.cloud.export_edge import export_edge
    from cicada.cloud.packing import pack

    work = tmp_path_factory.mktemp("exact")
    made = make_generation_assets(work)
    noisy = sharp_gpt2()
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * p.std() * 0.02)
    save_model(noisy, str(work / "noisy.safetensors"))
    pack("cicada.cloud.models.gpt2:build", work / "noisy-pkg", config=SHARP_CONFIG,
         weights=work / "noisy.safetensors")  # fmt: skip
    made["edge"] = work / "noisy-edge"
    export_edge(work / "noisy-pkg", made["edge"], shrink={"n_layer": SHARP_CONFIG["n_layer"]})
    return made


def check_taken_over(pieces: list[Piece], result: InvokeResult, prompt: np.ndarray, n: int,
                     edge_dir: Path) -> int:  # fmt: skip
    """The pieces of one exact generation, checked: the edge's provisional tokens from
    position 0, then (if a cloud took over) one rewind to the first position where they
    disagree with the cloud model's decode, then the cloud's tokens. Returns k, the number of
    provisional tokens."""
    expected = reference(prompt, n)
    provisional = [p for p in pieces if p.provisional]
    k = len(provisional)
    assert pieces[:k] == provisional, "provisional tokens come first"
    assert [p.position for p in provisional] == list(range(k))
    assert all(p.role == "edge" for p in provisional)
    drafted = [int(p.tokens[0]) for p in provisional]
    assert not k or drafted == edge_decode(edge_dir, prompt, k), "the edge's own tokens"
    info = result.generation
    assert info is not None
    tokens = result.output.tolist()
    assert [p.seq for p in pieces] == list(range(len(pieces)))
    if k == n and len(pieces) == n:  # the edge finished first: nothing verified
        assert tokens == drafted
        assert (info.exact, info.kept, info.rewound) == (False, n, 0)
        return k
    rewinds = [p for p in pieces if p.rewind is not None]
    j = agreeing(drafted, expected)
    if k:
        assert len(rewinds) == 1 and pieces[k] is rewinds[0], "one rewind, at the takeover"
        assert rewinds[0].rewind == j, f"rewound to {rewinds[0].rewind}, they disagree at {j}"
        assert rewinds[0].tokens.size == 0
    else:
        assert not rewinds
    rest = pieces[k + len(rewinds) :]
    assert all(p.role == "cloud" and not p.provisional for p in rest)
    assert [p.position for p in rest] == list(range(j, n))
    assert tokens == expected, "bit for bit the cloud model's greedy decode"
    assert (info.exact, info.kept, info.rewound) == (True, j, k - j)
    segments = result.served_by["segments"]
    if j:
        assert segments[0]["role"] == "edge" and segments[0]["tokens"] == j
        assert segments[0]["verified_by"] == segments[-1]["worker"]
    assert segments[-1]["role"] == "cloud" and sum(s["tokens"] for s in segments) == n
    sequence = TokenSequence()
    for piece in pieces:  # the SDK's view after every piece ends at the result
        sequence.apply(piece)
    assert sequence.tokens == tokens and sequence.stable == n
    return k


def test_exact_generations_equal_the_cloud_models_greedy_decode(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.edge("gpt2", assets["edge"], "edge", "--token-interval", str(EDGE_TOKEN_S),
                   "--capacity", "8")  # fmt: skip
        stack.wait_workers("edge")

        with Client(stack.address, timeout=60) as client:
            # Never: no cloud exists; the edge's tokens are the answer, said not to be exact.
            with client.stream("gpt2", PROMPT, max_new_tokens=4, exact=True) as stream:
                pieces = list(stream)
                assert stream.tokens == stream.result.output.tolist()  # type: ignore[union-attr]
                assert stream.stable == 0
            result = stream.result
            assert result is not None and result.generation is not None
            assert result.generation.exact is False
            assert all(p.provisional for p in pieces)
            check_taken_over(pieces, result, PROMPT, 4, assets["edge"])
            # Not exact: today's pieces, no provisional flag, no generation info.
            plain = client.invoke("gpt2", PROMPT, max_new_tokens=3)
            assert plain.generation is None
            with pytest.raises(BadRequest, match="max_new_tokens"):
                client.invoke("gpt2", PROMPT, options={"exact": True})
            with pytest.raises(BadRequest, match="draft"):
                client.invoke("gpt2", PROMPT, max_new_tokens=3,
                              options={"exact": True, "draft": [1, 2]})  # fmt: skip
        # The command line marks the edge's tokens provisional and says the result is not exact.
        np.save(tmp_path / "prompt.npy", PROMPT)
        cli = subprocess.run(
            [sys.executable, "-m", "cicada", "invoke", "gpt2", "--input",
             str(tmp_path / "prompt.npy"), "--max-new-tokens", "3", "--exact",
             "--address", stack.address],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        shown = " ".join(str(t) for t in edge_decode(assets["edge"], PROMPT, 3))
        assert cli.stdout.splitlines()[0] == f"edge (provisional): {shown}"
        assert "exact: no" in cli.stdout and "3 edge tokens kept, 0 rewound" in cli.stdout

        # Mid-way: several exact generations start on the edge; a cloud worker (continuous
        # batching) is started once each has streamed a token, and takes them over.
        cases = [(p, n) for p, n in zip(prompts(5, seed=1), (80, 96, 120, 88, 104), strict=True)]

        async def midway() -> list[tuple[list[Piece], InvokeResult]]:
            async with AsyncClient(stack.address, timeout=120) as aclient:
                started = asyncio.Event()
                first: set[int] = set()

                async def one(i: int) -> tuple[list[Piece], InvokeResult]:
                    prompt, n = cases[i]
                    got: list[Piece] = []
                    async with aclient.stream("gpt2", prompt, max_new_tokens=n, exact=True,
                                              priority=2) as astream:  # fmt: skip
                        async for piece in astream:
                            got.append(piece)
                            first.add(i)
                            if len(first) == len(cases) and not started.is_set():
                                started.set()
                                # Two: one batches generations continuously, one runs
                                # them one at a time (both of the worker's paths).
                                stack.cloud("gpt2", assets["package"], "cloud",
                                            "--max-batch-size", "4")  # fmt: skip
                                stack.cloud("gpt2", assets["package"], "cloud-b")
                            # What a terminal would render after each piece: never longer
                            # than the generation, and a rewind never leaves stale tokens.
                            assert len(astream.tokens) <= n
                    assert astream.result is not None
                    assert astream.tokens == astream.result.output.tolist()
                    return got, astream.result

                return await asyncio.gather(*(one(i) for i in range(len(cases))))

        taken = 0
        for (prompt, n), (pieces, result) in zip(cases, asyncio.run(midway()), strict=True):
            k = check_taken_over(pieces, result, prompt, n, assets["edge"])
            taken += 0 < k < n
        assert taken >= 1, "a cloud worker took over"

        # At once: the cloud is ready; exact generations run there from the start, and equal
        # what the same worker answers without `exact` (and eager PyTorch), for many prompts
        # and lengths.
        stack.wait_workers("cloud", count=2, state="ready", timeout=120)
        with Client(stack.address, timeout=60) as client:
            for prompt, n in zip(prompts(12, seed=2), (1, 2, 3, 5, 8, 13, 21, 34, 7, 40, 17, 64),
                                 strict=True):  # fmt: skip
                stream = client.stream("gpt2", prompt, max_new_tokens=n, exact=True, priority=2)
                pieces = list(stream)
                result = stream.result
                assert result is not None
                assert not any(p.provisional or p.rewind is not None for p in pieces)
                check_taken_over(pieces, result, prompt, n, assets["edge"])
                plain = client.invoke("gpt2", prompt, max_new_tokens=n, priority=2)
                assert plain.token_sources == ["cloud"] * n
                assert result.output.tolist() == plain.output.tolist()

        # Lost: a cloud worker stops after the takeover; exactly one outcome, still exact.
        lose_a_cloud_mid_generation(stack)


def lose_a_cloud_mid_generation(stack: Stack) -> None:
    """Two cloud workers are ready; the one running an exact generation is frozen mid-way
    (SIGSTOP: its connection stays, it just stops), the coordinator drops it as silent and
    re-routes the generation to the other with the verified tokens as a draft: all stand, and
    the result is still the cloud model's own decode, in one REPLY."""
    n = 400
    frozen: list[str] = []
    with Client(stack.address, timeout=120) as client:
        stream = client.stream("gpt2", PROMPT, max_new_tokens=n, exact=True, priority=2)
        pieces: list[Piece] = []
        for piece in stream:
            pieces.append(piece)
            if not frozen:
                frozen.append(piece.served_by["worker"])
                os.killpg(stack.procs[frozen[0]].pid, signal.SIGSTOP)
        result = stream.result
        assert result is not None and result.generation is not None
        # ... and the coordinator serves on.
        again = client.invoke("gpt2", PROMPT, max_new_tokens=2, priority=2)
    assert again.output.tolist() == reference(PROMPT, 2)
    assert result.output.tolist() == reference(PROMPT, n), "bit for bit, across two workers"
    assert (result.generation.exact, result.generation.kept) == (True, 0)
    assert [p.position for p in pieces if p.rewind is None] == list(range(n))
    assert not any(p.provisional for p in pieces)
    workers = [s["worker"] for s in result.served_by["segments"]]
    if len(workers) == 2:  # (the frozen worker may have sent all n before it stopped)
        assert workers[0] == frozen[0] and workers[1] != frozen[0]
        # The re-route's draft was all verified: nothing provisional, nothing to rewind.
        assert not any(p.rewind is not None for p in pieces)
        assert result.generation.rewound == 0
