"""Streamed generation end to end: real coordinator, edge agent and cloud worker processes.

A generation starts on the edge while no cloud worker exists, a cloud worker is started
mid-stream, and the coordinator moves the generation to it once its weights are resident.
Every token is checked against the model that made it: the edge's against onnxruntime greedy
decoding of the edge model, the cloud's against eager PyTorch continuing the prompt plus the
edge's tokens (so the cloud really recomputed its cache from what it was handed).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cicada.client import AsyncClient, Client, Piece
from cicada.common.generation import GenerationRequest, RecomputeDecoder, generate
from cicada.edge.onnx_model import EdgeModel
from cicada.testing import Stack
from tests.generation_assets import make_generation_assets, sharp_gpt2

PROMPT = np.asarray([[3, 14, 15, 92, 6, 53]], dtype=np.int64)
# Seconds at least between an edge agent's tokens where a generation must still be running on
# the edge when a cloud worker started mid-stream is up: n tokens take n x this on the edge,
# a bound on the cloud's cold start far above what it takes on a busy machine.
EDGE_TOKEN_S = 0.25


def greedy(logits: object, prompt: np.ndarray, n: int) -> list[int]:
    request = GenerationRequest.parse({"max_new_tokens": n}, [prompt])
    return generate(RecomputeDecoder(logits), request, lambda t: None).tokens  # type: ignore[arg-type]


def torch_logits(ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return MODEL(torch.from_numpy(ids)).numpy()


MODEL = sharp_gpt2()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_generation_assets(tmp_path_factory.mktemp("generation"))


def test_generation_streams_from_the_edge_then_continues_on_the_cloud(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    n = 240
    with Stack(tmp_path) as stack:
        stack.coordinator()
        # A slow edge device (250 ms a token): it cannot finish the 240 tokens in under a
        # minute, so the cloud worker started after the third has that long to be up and take
        # over (a bound on waiting, not a race; it takes seconds, then runs the rest fast).
        stack.edge("gpt2", assets["edge"], "edge", "--token-interval", str(EDGE_TOKEN_S))
        stack.wait_workers("edge")
        with Client(stack.address, timeout=120) as client:
            stream = client.stream("gpt2", PROMPT, max_new_tokens=n)
            pieces: list[Piece] = []
            for piece in stream:
                pieces.append(piece)
                if len(pieces) == 3:
                    stack.cloud("gpt2", assets["package"])
            result = stream.result
        assert result is not None
        roles = [p.role for p in pieces]
        tokens = [int(t) for p in pieces for t in p.tokens]
        assert [p.seq for p in pieces] == list(range(n))
        assert result.output.tolist() == tokens and len(tokens) == n
        assert result.token_sources == roles
        k = roles.count("edge")
        assert roles == ["edge"] * k + ["cloud"] * (n - k), "one handoff, edge then cloud"
        assert 3 <= k < n, f"the cloud took over after {k} edge tokens"
        assert [s["role"] for s in result.served_by["segments"]] == ["edge", "cloud"]

        edge_decoder = EdgeModel.load(assets["edge"]).new_decoder()
        assert edge_decoder is not None  # the export wrote the cached step graph
        request = GenerationRequest.parse({"max_new_tokens": k}, [PROMPT])
        assert tokens[:k] == generate(edge_decoder, request, lambda t: None).tokens
        handed = np.concatenate([PROMPT, np.asarray([tokens[:k]], dtype=np.int64)], axis=1)
        assert tokens[k:] == greedy(torch_logits, handed, n - k)

        # Now the cloud is ready: a new generation runs there from the start (async stream).
        async def cloud_stream() -> tuple[list[Piece], list[str]]:
            async with AsyncClient(stack.address, timeout=60) as aclient:
                astream = aclient.stream("gpt2", PROMPT, max_new_tokens=16)
                got = [piece async for piece in astream]
                assert astream.result is not None
                return got, astream.result.token_sources

        got, sources = asyncio.run(cloud_stream())
        assert sources == ["cloud"] * 16
        assert [int(p.tokens[0]) for p in got] == greedy(torch_logits, PROMPT, 16)


def test_leaving_a_stream_early_cancels_the_generation(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    with Stack(tmp_path) as stack:
        stack.coordinator()
        # One slot at 50 ms a token: a generation of 400 left running would hold it for 20 s,
        # longer than the next calls wait (10 s).
        stack.edge("gpt2", assets["edge"], "edge", "--capacity", "1", "--token-interval", "0.05")
        stack.wait_workers("edge")
        with Client(stack.address, timeout=10) as client:
            with client.stream("gpt2", PROMPT, max_new_tokens=400) as stream:
                assert next(stream).role == "edge"
            # The same client calls again at once, and the edge's one slot is free for it.
            result = client.invoke("gpt2", PROMPT, max_new_tokens=3, priority=0)
            assert result.token_sources == ["edge"] * 3

        async def leave_early() -> list[str]:
            async with AsyncClient(stack.address, timeout=10) as aclient:
                async with aclient.stream("gpt2", PROMPT, max_new_tokens=400) as astream:
                    async for piece in astream:
                        assert piece.role == "edge"
                        break
                assert aclient._pending == {}
                again = await aclient.invoke("gpt2", PROMPT, max_new_tokens=3, priority=0)
                return again.token_sources

        assert asyncio.run(leave_early()) == ["edge"] * 3


def test_a_generation_that_cannot_fit_is_a_bad_request(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    from cicada.errors import BadRequest

    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.edge("gpt2", assets["edge"], "edge")
        stack.wait_workers("edge")
        with Client(stack.address, timeout=30) as client:
            with pytest.raises(BadRequest, match="context of 512"):
                client.invoke("gpt2", PROMPT, max_new_tokens=600)
            # ... and the agent keeps serving.
            result = client.invoke("gpt2", PROMPT, max_new_tokens=4, priority=0)
            assert result.token_sources == ["edge"] * 4
        # The command line streams the tokens with the side that made them.
        np.save(tmp_path / "prompt.npy", PROMPT)
        cli = subprocess.run(
            [sys.executable, "-m", "cicada", "invoke", "gpt2", "--input",
             str(tmp_path / "prompt.npy"), "--max-new-tokens", "5", "--address", stack.address],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        expected = " ".join(str(t) for t in result.output.tolist()[:4])
        assert cli.stdout.splitlines()[0].startswith(f"edge: {expected} ")
        assert "served by edge" in cli.stdout


def test_a_cancelled_edge_generation_stops_and_frees_its_slot(assets: dict[str, Path]) -> None:
    """A real edge agent behind a bare ROUTER: after CANCEL it stops generating, sends its
    RESULT with the tokens made so far, and takes the next dispatch."""
    from cicada.common.protocol import Cancel, Dispatch, Partial, Ready, Result, Status
    from cicada.edge.agent import EdgeAgent, EdgeAgentConfig
    from cicada.testing import StandInCoordinator

    # Heartbeats at 1 s: the stand-in heartbeats only while the test reads from it, and a busy
    # machine can stall this process past a shorter liveness (the agent would then rightly
    # register again and abandon the generation under test).
    c = StandInCoordinator(heartbeat=1.0)
    agent = EdgeAgent(EdgeAgentConfig(model_dir=assets["edge"], model_name="gpt2",
                                      coordinator=f"tcp://127.0.0.1:{c.port}", capacity=1,
                                      heartbeat_interval=1.0, token_interval=0.02))  # fmt: skip
    agent.runtime.start()
    try:
        until = time.monotonic() + 60
        c.expect(Ready, until)
        options = {"max_new_tokens": 400}
        c.send(Dispatch(id="long", model="gpt2", inputs=[PROMPT], options=options))
        c.expect(Partial, until, where=lambda m: m.id == "long" and m.seq == 2)
        c.send(Cancel(id="long", reason="test"))
        result = c.expect(Result, until, where=lambda m: m.id == "long")
        assert result.status is Status.OK
        assert 3 <= len(result.outputs[0]) < 400  # stopped early, kept what it made
        c.send(Dispatch(id="next", model="gpt2", inputs=[PROMPT], options={"max_new_tokens": 2}))
        result = c.expect(Result, until, where=lambda m: m.id == "next")
        assert result.status is Status.OK and len(result.outputs[0]) == 2
    finally:
        agent.runtime.drain()
        agent.runtime.join(10)
        c.close()


def test_a_generation_outlives_its_edge_agent(tmp_path: Path, assets: dict[str, Path]) -> None:
    """SIGKILL the edge agent mid-generation: the coordinator continues the generation on the
    cloud worker from the tokens already streamed; the client sees every position once and one
    REPLY, and the cloud's part is the model's own continuation."""
    n = 120
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.cloud("gpt2", assets["package"])
        stack.wait_workers("cloud", state="ready")
        stack.edge("gpt2", assets["edge"], "edge", "--token-interval", "0.05")
        stack.wait_workers("edge")
        with Client(stack.address, timeout=120) as client:
            # Latency-critical: it starts on the (faster) edge; no proactive handoff.
            stream = client.stream("gpt2", PROMPT, max_new_tokens=n, priority=0,
                                   options={"handoff": False})  # fmt: skip
            pieces: list[Piece] = []
            for piece in stream:
                pieces.append(piece)
                if len(pieces) == 5:
                    stack.kill("edge")
            result = stream.result
    assert result is not None
    roles = [p.role for p in pieces]
    tokens = [int(t) for p in pieces for t in p.tokens]
    assert [p.seq for p in pieces] == list(range(n)) and result.output.tolist() == tokens
    k = roles.count("edge")
    assert roles == ["edge"] * k + ["cloud"] * (n - k) and 5 <= k < n
    handed = np.concatenate([PROMPT, np.asarray([tokens[:k]], dtype=np.int64)], axis=1)
    assert tokens[k:] == greedy(torch_logits, handed, n - k)


@pytest.fixture(scope="module")
def hf_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A transformers GPT2LMHeadModel brought as it is: saved by save_pretrained, packed with
    `cicada pack --transformers`, its edge variant made by `cicada export-edge`."""
    transformers = pytest.importorskip("transformers")
    from click.testing import CliRunner

    from cicada.cli import main as cli

    work = tmp_path_factory.mktemp("hf-generation")
    config = transformers.GPT2Config(n_layer=4, n_head=2, n_embd=64, vocab_size=97,
                                     n_positions=512)  # fmt: skip
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.mul_(12.0)
    model.save_pretrained(work / "saved")
    for args in (
        ["pack", "--transformers", str(work / "saved"), "--out", str(work / "pkg")],
        ["export-edge", "--package", str(work / "pkg"), "--out", str(work / "edge")],
    ):
        done = CliRunner().invoke(cli, args)
        assert done.exit_code == 0, done.output
    return {"model": model, "package": work / "pkg", "edge": work / "edge"}


def test_a_transformers_model_generates_across_the_handoff(
    tmp_path: Path, hf_assets: dict[str, object]
) -> None:
    """Bring-your-own-model end to end: the edge serves export-edge's variant of a packed
    transformers model, the cloud the package itself; the generation moves mid-stream and the
    cloud's tokens are the library's own greedy continuation."""
    model: object = hf_assets["model"]
    n = 160
    with Stack(tmp_path) as stack:
        stack.coordinator()
        # Paced so that the edge cannot finish before the cloud is up (40 s at least; at 40 ms
        # a token, a busy machine's cold start outran all 160 tokens).
        stack.edge("hf", hf_assets["edge"], "edge", "--token-interval", str(EDGE_TOKEN_S))  # type: ignore[arg-type]
        stack.wait_workers("edge")
        with Client(stack.address, timeout=120) as client:
            stream = client.stream("hf", PROMPT, max_new_tokens=n)
            pieces: list[Piece] = []
            for piece in stream:
                pieces.append(piece)
                if len(pieces) == 3:
                    stack.cloud("hf", hf_assets["package"])  # type: ignore[arg-type]
            # The edge variant knows its context from the nested transformers config.
            from cicada.errors import BadRequest

            with pytest.raises(BadRequest, match="context of 512"):
                client.invoke("hf", PROMPT, max_new_tokens=600, priority=0)
    roles = [p.role for p in pieces]
    tokens = [int(t) for p in pieces for t in p.tokens]
    k = roles.count("edge")
    assert roles == ["edge"] * k + ["cloud"] * (n - k) and 3 <= k < n
    edge = EdgeModel.load(hf_assets["edge"])  # type: ignore[arg-type]
    assert tokens[:k] == greedy(lambda ids: edge.run([ids])[0], PROMPT, k)
    handed = torch.from_numpy(np.concatenate([PROMPT, [tokens[:k]]], axis=1))
    # (An explicit attention mask: otherwise generate() takes token 0 for padding.)
    generate_greedy = model.generate  # type: ignore[attr-defined]
    with torch.inference_mode():
        expected = generate_greedy(handed, attention_mask=torch.ones_like(handed),
                                   max_new_tokens=n - k, do_sample=False, pad_token_id=0,
                                   eos_token_id=None)[0, handed.shape[1] :]  # fmt: skip
    assert tokens[k:] == expected.tolist()
