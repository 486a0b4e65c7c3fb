"""One stack for the gateway's tests: a coordinator, edge agents for a tiny GPT-2 ("gpt2",
generation; "paced", the same at a token every 0.2 s) and a tiny embedding model ("emb"), and
one `cicada gateway` process in front of them, shared by every test in tests/gateway (started
once: a few seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cicada.testing import Stack
from cicada.testing.gateway import start_gateway
from tests.gateway.assets import gateway_view, write_embedding_model

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("tokenizers")

MAX_BODY_BYTES = 1 << 20  # small, so that the oversized-body test sends little
EDGE_AGENTS = 3


@dataclass
class GatewayStack:
    stack: Stack
    url: str
    edge_dir: Path  # the tiny GPT-2's edge model
    emb_dir: Path  # the embedding model

    @property
    def address(self) -> str:
        return self.stack.address


@pytest.fixture(scope="package")
def gw(
    tmp_path_factory: pytest.TempPathFactory, tiny_package: dict[str, Path]
) -> Iterator[GatewayStack]:
    work = tmp_path_factory.mktemp("gateway")
    emb_dir = write_embedding_model(work / "emb")
    view = gateway_view(tiny_package["edge"], work / "gpt2-view")
    config = work / "cicada.toml"
    # Priority 0 reserved for nobody: a way to see that the gateway's priority reaches the
    # coordinator (it answers BAD_REQUEST for 0).
    config.write_text("[coordinator]\nallow_critical = false\n")
    with Stack(work) as stack:
        stack.coordinator("--config", str(config))
        stack.edge("gpt2", tiny_package["edge"], "edge-gpt2")
        stack.edge("emb", emb_dir, "edge-emb")
        # A slow edge device (a token every 0.2 s): a stream that outlasts its reader.
        stack.edge("paced", tiny_package["edge"], "edge-paced", "--token-interval", "0.2")
        stack.wait_workers("edge", EDGE_AGENTS, state="ready")
        url = start_gateway(
            stack, "--package", f"gpt2={view}", "--package", f"emb={emb_dir}",
            "--max-body-bytes", str(MAX_BODY_BYTES),
        )  # fmt: skip
        yield GatewayStack(stack, url, tiny_package["edge"], emb_dir)
        gateway_proc = stack.procs.get("gateway")
        assert gateway_proc is not None and gateway_proc.poll() is None, stack.log("gateway")
