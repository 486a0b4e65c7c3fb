"""A worker survives its model's errors: the attacker's requests against real processes.

`python -m cicada coordinator|cloud|edge` processes on loopback (cicada.testing.Stack), fed inputs a
model cannot take and a model that fails on purpose (tests/security/faulty_model.py). The
promises checked, call by call:

* inputs outside the package's limits (a sequence longer than the context, the wrong dtype or
  rank, ids outside the vocabulary, ...) are BAD_REQUEST from the worker, naming the limit,
  and never reach the model;
* a model that raises ends that request FAILED, and the worker serves on: the very next
  valid request on the same worker is OK with the right output;
* a worker whose serving loop dies anyway says so and exits non-zero: it does not stay
  registered as `ready`; SIGTERM stops a worker, also after its model failed;
* every request sent ends in exactly one outcome, and the coordinator answered each once.

Waits are bounded (a hung worker ends the test with a TIMEOUT, not a hang); nothing here
asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cicada.client import Client, InvokeResult
from cicada.cloud.models import gpt2
from cicada.cloud.service import EXIT_SERVING_FAILED
from cicada.errors import BadRequest, ClientError, Failed
from cicada.testing import Stack, make_assets, tiny_gpt2_config
from tests.security import faulty_model

MODEL = "gpt2"
CONFIG = tiny_gpt2_config()
CONTEXT: int = CONFIG["block_size"]
VOCAB: int = CONFIG["vocab_size"]
DEADLINE = 30.0  # a bound on each request: with a stuck worker it ends TIMEOUT and fails
READY_WITHIN = 120.0  # a bound on the cold start (torch import) on a busy machine


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny GPT-2 package and its edge model; the same GPT-2 as a model that fails on
    marker tokens, packed with the factory tests.security.faulty_model:build."""
    from cicada.cloud.packing import pack

    work = tmp_path_factory.mktemp("worker-errors")
    paths = make_assets(work)
    paths["faulty"] = work / "pkg-faulty"
    pack("tests.security.faulty_model:build", paths["faulty"], config=CONFIG)
    return paths


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path) as s:  # kills every process it started
        yield s


def ids(first: int, length: int = CONTEXT // 2) -> np.ndarray:
    """Valid token ids (1, length), starting with `first`, never a marker after it."""
    rest = (np.arange(1, length) * 7 + first) % 90
    return np.concatenate([[first], rest]).astype(np.int64)[None]


def reference(x: np.ndarray) -> np.ndarray:
    """Eager PyTorch: what the packed GPT-2 (and the faulty one, off its markers) answers."""
    with torch.inference_mode():
        return REFERENCE(torch.from_numpy(x)).numpy()


REFERENCE = gpt2.build(**CONFIG)


class Ledger:
    """One client; every call sent is counted, and its one outcome recorded."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, timeout=DEADLINE + 30.0)
        self.sent = 0
        self.outcomes: list[InvokeResult | ClientError] = []

    def call(self, inputs: Any = None, **kwargs: Any) -> InvokeResult | ClientError:
        """Priority 2 (quality-seeking): the cloud serves it as soon as it is ready."""
        self.sent += 1
        try:
            outcome: InvokeResult | ClientError = self.client.invoke(
                MODEL, inputs, priority=2, deadline=DEADLINE, **kwargs
            )
        except ClientError as exc:
            outcome = exc
        self.outcomes.append(outcome)
        return outcome

    def expect_ok(self, x: np.ndarray, role: str) -> None:
        out = self.call(x)
        assert isinstance(out, InvokeResult), f"{out!r}"
        assert out.served_by["role"] == role
        np.testing.assert_allclose(out.output, reference(x), rtol=1e-4, atol=1e-4)

    def expect(self, error: type[ClientError], *args: Any, **kwargs: Any) -> ClientError:
        out = self.call(*args, **kwargs)
        assert isinstance(out, error), f"expected {error.__name__}, got {out!r}"
        return out

    def close(self, s: Stack) -> None:
        """Exactly one outcome per request sent, and the coordinator answered each once."""
        self.client.close()
        assert len(self.outcomes) == self.sent
        s.wait_for(lambda st: answered(st) >= self.sent, what=f"{self.sent} requests answered")
        assert answered(s.status()) == self.sent


def answered(status: dict[str, Any]) -> int:
    return sum(r["count"] for r in status["requests"])


def served_by_cloud(error: ClientError) -> bool:
    return (error.served_by or {}).get("role") == "cloud"


def start_cloud(s: Stack, package: Path) -> None:
    s.coordinator()
    # The faulty model's factory (tests.security.faulty_model) is not one of Cicada's own:
    # these tests trust its code on purpose (docs/PACKAGE.md, threat model).
    s.cloud(MODEL, package, "cloud", "--trust-package-code")
    s.wait_workers("cloud", 1, state="ready", timeout=READY_WITHIN)


# -- inputs outside the package's limits -----------------------------------------------------------


def test_overlong_and_malformed_inputs_are_bad_request_and_the_cloud_serves_on(
    stack: Stack, assets: dict[str, Path]
) -> None:
    s = stack
    start_cloud(s, assets["package"])  # the only worker: every request goes to the cloud
    ledger = Ledger(s.address)
    good = [ids(first) for first in (1, 2, 3, 4, 5, 6, 7, 8)]

    # The request: (1, CONTEXT + 1) ids. Refused before the forward, naming the limit.
    overlong = np.ones((1, CONTEXT + 1), dtype=np.int64)
    error = ledger.expect(BadRequest, overlong)
    assert f"context of {CONTEXT} tokens" in str(error) and served_by_cloud(error), error
    ledger.expect_ok(good[0], "cloud")  # the very next request, same worker

    wrong: list[tuple[Any, str]] = [
        (overlong.astype(np.int32), "expected dtype int64"),
        (overlong[None], "expected rank 2"),
        (np.full((1, 8), VOCAB, dtype=np.int64), f"0..{VOCAB - 1}"),
        (np.full((1, 8), -1, dtype=np.int64), f"0..{VOCAB - 1}"),
        ([good[0], good[0]], "takes 1 input"),
        (np.zeros((1, 8), dtype=np.float32), "expected dtype int64"),
        (np.ones((4, CONTEXT * 8), dtype=np.int64), f"context of {CONTEXT} tokens"),
    ]
    for (bad, says), x in zip(wrong, good[1:], strict=True):
        error = ledger.expect(BadRequest, bad)
        assert says in str(error) and served_by_cloud(error), error
        ledger.expect_ok(x, "cloud")

    # Text to a model that ships no tokenizer; a generation that would outgrow the context.
    ledger.expect(BadRequest, text=["no tokenizer here"])
    error = ledger.expect(BadRequest, ids(1, CONTEXT - 4), max_new_tokens=8)
    assert f"context of {CONTEXT} tokens" in str(error), error
    ledger.expect_ok(good[0], "cloud")

    assert s.workers("cloud", "ready") == 1 and s.procs["cloud"].poll() is None
    ledger.close(s)


def test_the_edge_refuses_an_overlong_input_with_the_same_check(
    stack: Stack, assets: dict[str, Path]
) -> None:
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"])
    s.wait_workers("edge", 1)
    ledger = Ledger(s.address)
    error = ledger.expect(BadRequest, np.ones((1, CONTEXT + 1), dtype=np.int64))
    assert f"context of {CONTEXT} tokens" in str(error), error
    assert (error.served_by or {}).get("role") == "edge", error
    out = ledger.call(ids(1))
    assert isinstance(out, InvokeResult) and out.output.shape == (1, CONTEXT // 2, VOCAB), out
    ledger.close(s)


# -- a model that raises ---------------------------------------------------------------------------


def test_a_model_that_raises_ends_failed_and_the_worker_serves_on(
    stack: Stack, assets: dict[str, Path]
) -> None:
    s = stack
    start_cloud(s, assets["faulty"])
    ledger = Ledger(s.address)
    ledger.expect_ok(ids(1), "cloud")  # off its markers, it is the plain GPT-2
    for first in (2, 3, 4):
        error = ledger.expect(Failed, ids(faulty_model.RAISE))
        assert "AssertionError" in str(error) and served_by_cloud(error), error
        ledger.expect_ok(ids(first), "cloud")
    assert s.workers("cloud", "ready") == 1
    ledger.close(s)

    s.kill("cloud", signal.SIGTERM)  # drains and stops (bounded wait inside)
    assert s.procs["cloud"].returncode == 0, s.log("cloud")


def test_a_worker_whose_serving_loop_dies_exits_and_is_not_left_ready(
    stack: Stack, assets: dict[str, Path]
) -> None:
    s = stack
    start_cloud(s, assets["faulty"])
    ledger = Ledger(s.address)
    ledger.expect_ok(ids(1), "cloud")
    error = ledger.expect(Failed, ids(faulty_model.EXIT))  # answered, then the loop ends
    assert "SystemExit" in str(error) and served_by_cloud(error), error
    assert s.procs["cloud"].wait(60) == EXIT_SERVING_FAILED, s.log("cloud")
    s.wait_for(lambda st: s.workers("cloud") == 0, what="the failed worker gone", timeout=30)
    ledger.close(s)


def test_sigterm_stops_a_cloud_worker_while_it_loads(stack: Stack, assets: dict[str, Path]) -> None:
    s = stack
    s.coordinator()
    s.cloud(MODEL, assets["package"])
    s.wait_workers("cloud", 1)  # registered: cold, loading or (on a fast machine) ready
    s.kill("cloud", signal.SIGTERM)
    assert s.procs["cloud"].returncode == 0, s.log("cloud")


def test_sigterm_stops_a_cloud_worker_whose_load_stalled(
    stack: Stack, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A build that never returns (the faulty model, told so by its environment): the worker
    registers, never becomes ready, and SIGTERM still ends it, without a kill."""
    s = stack
    s.coordinator()
    monkeypatch.setenv(faulty_model.GATE_ENV, str(tmp_path / "never-opened"))
    s.cloud(MODEL, assets["faulty"], "cloud", "--trust-package-code")
    s.wait_workers("cloud", 1)
    assert s.workers("cloud", "ready") == 0
    s.kill("cloud", signal.SIGTERM)  # waits for the exit (bounded), never escalates
    assert s.procs["cloud"].returncode == 0, s.log("cloud")
    s.wait_for(lambda st: s.workers("cloud") == 0, what="the stopped worker gone", timeout=30)


def test_a_burst_of_sigterms_stops_every_role(stack: Stack, assets: dict[str, Path]) -> None:
    """Signals that arrive while the previous one's handler runs (a lifecycle's SIGTERM, then
    the parent-death signal): a handler that took a lock deadlocked a cloud worker for good.
    Every role gets a burst of SIGTERMs and exits 0."""
    s = stack
    s.coordinator()
    s.edge(MODEL, assets["edge"])
    s.cloud(MODEL, assets["package"])
    s.wait_workers("edge", 1)
    s.wait_workers("cloud", 1, state="ready", timeout=READY_WITHIN)
    for name in ("cloud", "edge", "coordinator"):
        proc = s.procs[name]
        for _ in range(200):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(60)  # a bound on the drain, never a latency claim
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{name} hung after a burst of SIGTERMs: {s.log(name)}") from None
        assert code == 0, s.log(name)
