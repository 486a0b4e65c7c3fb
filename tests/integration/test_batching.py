"""Dynamic batching end to end: a real coordinator and a real cloud worker process
(`--max-batch-size`), requests sent concurrently through the SDK.

Every output is checked against eager PyTorch on the package's own weights at the same batch
composition (the RESULT timings `batch_seq`, `batch_size` and `batch_row` say which requests
ran together and where), bit for bit (torch.equal); and against the request run alone.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cicada.client import AsyncClient, InvokeResult
from cicada.cloud.models import gpt2
from cicada.cloud.packing import pack
from cicada.common.generation import GenerationRequest, RecomputeDecoder, generate
from cicada.common.package import WEIGHTS_NAME, Manifest
from cicada.testing import Stack, tiny_gpt2_config
from tests.cloud import toy_models

ROOT = Path(__file__).resolve().parents[2]
# Bounded waits, not timing: the worker waits this long at most for a batch to fill, and
# preferred sizes send it at once when full.
DELAY_MS = "30000"


def eager_gpt2(package: Path) -> torch.nn.Module:
    model = gpt2.build(**tiny_gpt2_config())
    model.load_state_dict(load_file(package / WEIGHTS_NAME), strict=False)  # ties: constructor
    return model.eval()


async def invoke_all(
    address: str, inputs: list[np.ndarray], model: str = "m", **options: Any
) -> list[InvokeResult]:
    async with AsyncClient(address, timeout=120) as client:
        calls = (client.invoke(model, x, priority=2, **options) for x in inputs)
        return await asyncio.gather(*calls)


def served_in_batches(
    tmp_path: Path, package: Path, inputs: list[np.ndarray], preferred: str
) -> list[InvokeResult]:
    """`inputs` sent at once to a coordinator with one cloud worker batching up to 8."""
    with Stack(tmp_path) as stack:
        stack.coordinator()
        batching = ["--max-batch-size", "8", "--max-queue-delay-ms", DELAY_MS]
        stack.cloud("m", package, "cloud", *batching, "--preferred-batch-sizes", preferred)
        stack.wait_workers("cloud", state="ready")
        return asyncio.run(invoke_all(stack.address, inputs))


def by_batch(results: list[InvokeResult]) -> dict[float, list[tuple[int, InvokeResult]]]:
    """Request index and result, grouped per forward and in row order within it."""
    groups: dict[float, list[tuple[int, InvokeResult]]] = defaultdict(list)
    for i, r in enumerate(results):
        assert r.served_by["role"] == "cloud"
        groups[r.timings["worker_batch_seq"]].append((i, r))
    for members in groups.values():
        members.sort(key=lambda m: m[1].timings["worker_batch_row"])
        assert {m[1].timings["worker_batch_size"] for m in members} == {float(len(members))}
    return groups


def replay(model: Any, inputs: list[np.ndarray], groups: dict[float, list[Any]]) -> None:
    """Each output equals eager torch on the same batch, bit for bit, and running it alone."""
    with torch.inference_mode():
        for members in groups.values():
            batch = torch.from_numpy(np.concatenate([inputs[i] for i, _ in members]))
            eager = model(batch)
            row = 0
            for i, result in members:
                n = inputs[i].shape[0]
                mine = torch.from_numpy(result.output)
                assert torch.equal(mine, eager[row : row + n]), f"request {i}: not the batch's"
                alone = model(torch.from_numpy(inputs[i]))
                # Bit-identical alone too on this CPU (measured: benchmarks/batching.py); the
                # stated tolerance where kernels pick another path for another batch size:
                torch.testing.assert_close(mine, alone, rtol=1e-5, atol=1e-5)
                row += n


def test_concurrent_requests_run_as_one_forward_with_each_output_its_own(
    tmp_path: Path, tiny_package: dict[str, Path]
) -> None:
    package = tiny_package["package"]
    config = tiny_gpt2_config()
    inputs = [gpt2.example_input(config, batch=1 + i % 2, seed=i).numpy() for i in range(8)]
    groups = by_batch(served_in_batches(tmp_path, package, inputs, preferred="8"))
    # One forward: the coordinator dispatched 8 at once, so the READY's capacity was 8.
    assert len(groups) == 1, "the 8 requests (12 rows, two lengths of batch) ran as one forward"
    replay(eager_gpt2(package), inputs, groups)


def test_only_compatible_shapes_batch(tmp_path: Path, tiny_package: dict[str, Path]) -> None:
    package = tiny_package["package"]
    config = tiny_gpt2_config()
    ids = [gpt2.example_input(config, seed=i).numpy() for i in range(8)]
    inputs = [x if i % 2 else x[:, :16] for i, x in enumerate(ids)]  # 32 and 16 tokens
    groups = by_batch(served_in_batches(tmp_path, package, inputs, preferred="4"))
    for members in groups.values():
        assert len({inputs[i].shape for i, _ in members}) == 1, "shapes mixed in one forward"
    assert sorted(len(m) for m in groups.values()) == [4, 4]
    replay(eager_gpt2(package), inputs, groups)


def padded_package(tmp_path: Path, sequence_outputs: str) -> Path:
    """The tiny GPT-2 packed by `cicada pack --pad-sequences --sequence-outputs ...`."""
    package = tmp_path / "padded"
    packed = subprocess.run(
        [sys.executable, "-m", "cicada", "pack", "--model", "gpt2-tiny", "--out", str(package),
         "--pad-sequences", "--sequence-outputs", sequence_outputs],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr[-4000:]
    outputs = [int(i) for i in sequence_outputs.split(",")]
    assert Manifest.load(package).batching == {"pad_sequences": True, "sequence_outputs": outputs}
    return package


def test_pack_refuses_sequence_outputs_without_padding(tmp_path: Path) -> None:
    for args in (["--sequence-outputs", "0"], ["--pad-sequences", "--sequence-outputs", "x"],
                 ["--pad-sequences", "--sequence-outputs", "64"]):  # fmt: skip
        packed = subprocess.run(
            [sys.executable, "-m", "cicada", "pack", "--model", "gpt2-tiny", "--out",
             str(tmp_path / "p"), *args],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert packed.returncode == 2, (args, packed.stderr[-2000:])
        assert "sequence" in packed.stderr, packed.stderr[-2000:]
        assert not (tmp_path / "p").exists()


def test_sequences_of_different_lengths_share_a_forward_padded(tmp_path: Path) -> None:
    """A package that says its model is causal (`pad_sequences`, logits a sequence output):
    token requests of 4 lengths run as one forward, each padded to the longest and its logits
    cut back to its own length; each equals that padded forward run eagerly, bit for bit."""
    package = padded_package(tmp_path, "0")
    config = tiny_gpt2_config()
    lengths = [32, 5, 17, 9, 32, 1, 24, 12]
    inputs = [gpt2.example_input(config, batch=1 + i % 2, seed=i).numpy()[:, :n]
              for i, n in enumerate(lengths)]  # fmt: skip
    groups = by_batch(served_in_batches(tmp_path, package, inputs, preferred="8"))
    assert len(groups) == 1, "the 8 requests of 6 lengths ran as one forward"
    model = eager_gpt2(package)
    with torch.inference_mode():
        for members in groups.values():
            longest = members[0][1].timings["worker_batch_padded_to"]
            assert longest == max(inputs[i].shape[1] for i, _ in members)
            batch = np.concatenate(
                [np.pad(inputs[i], [(0, 0), (0, int(longest) - inputs[i].shape[1])])
                 for i, _ in members]
            )  # fmt: skip
            eager = model(torch.from_numpy(batch))
            row = 0
            for i, result in members:
                rows, n = inputs[i].shape
                mine = torch.from_numpy(result.output)
                assert mine.shape == (rows, n, config["vocab_size"])
                assert torch.equal(mine, eager[row : row + rows, :n]), f"request {i}"
                # Alone: the tolerance same-length batching has (BENCHMARKS.md).
                alone = model(torch.from_numpy(inputs[i]))
                torch.testing.assert_close(mine, alone, rtol=1e-5, atol=1e-5)
                row += rows


def test_a_package_that_names_a_wrong_sequence_output_runs_them_one_by_one(
    tmp_path: Path,
) -> None:
    """`sequence_outputs` names an output the model does not have: the padded batch fails and
    its requests run alone, unpadded; every one is answered with its own exact result."""
    package = padded_package(tmp_path, "1")
    config = tiny_gpt2_config()
    inputs = [gpt2.example_input(config, seed=i).numpy()[:, : 8 + 8 * i] for i in range(4)]
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.cloud("m", package, "cloud", "--max-batch-size", "4", "--max-queue-delay-ms",
                    DELAY_MS, "--preferred-batch-sizes", "4")  # fmt: skip
        stack.wait_workers("cloud", state="ready")
        results = asyncio.run(invoke_all(stack.address, inputs))
        log = stack.log("cloud", 20_000)
    assert "a batch of 4 failed" in log and "sequence output 1" in log
    model = eager_gpt2(package)
    with torch.inference_mode():
        for x, result in zip(inputs, results, strict=True):
            assert torch.equal(torch.from_numpy(result.output), model(torch.from_numpy(x)))
            assert result.timings["worker_batch_size"] == 1.0


def test_a_failed_batch_falls_back_to_one_by_one(tmp_path: Path) -> None:
    """One request the model refuses must not fail the others it was batched with."""
    package = tmp_path / "picky"
    pack("tests.cloud.toy_models:build_picky", package)
    inputs = [toy_models.example_input(batch=1, seed=i).numpy() for i in range(4)]
    inputs[2][0, 0] = toy_models.POISON
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.cloud("m", package, "cloud", "--trust-package-code", "--max-batch-size", "4",
                    "--max-queue-delay-ms", DELAY_MS, "--preferred-batch-sizes", "4")  # fmt: skip
        stack.wait_workers("cloud", state="ready")

        async def run() -> list[Any]:
            async with AsyncClient(stack.address, timeout=120) as client:
                calls = (client.invoke("m", x, priority=2) for x in inputs)
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(run())
        log = stack.log("cloud", 20_000)
    from cicada.errors import BadRequest

    assert isinstance(results[2], BadRequest), results[2]
    assert "refuses" in str(results[2])
    assert "a batch of 4 failed" in log  # the batch was really formed, then split
    model = toy_models.build_picky()
    model.load_state_dict(load_file(package / WEIGHTS_NAME), strict=False)  # pads: no tensors
    with torch.inference_mode():
        for i in (0, 1, 3):
            assert isinstance(results[i], InvokeResult), results[i]
            expected = model(torch.from_numpy(inputs[i]))
            assert torch.equal(torch.from_numpy(results[i].output), expected)
            assert results[i].timings["worker_batch_size"] == 1.0  # run alone, after the split


@pytest.mark.parametrize("option", [["--max-batch-size", "0"], ["--preferred-batch-sizes", "9"],
                                    ["--preferred-batch-sizes", "x"]])  # fmt: skip
def test_the_cli_refuses_bad_batch_settings(
    tmp_path: Path, tiny_package: dict[str, Path], option: list[str]
) -> None:
    with Stack(tmp_path) as stack:
        proc = stack.cloud("m", tiny_package["package"], "cloud", *option)
        assert proc.wait(timeout=60) == 2
        assert "batch" in stack.log("cloud").lower()


def test_the_coordinator_sees_the_batch_capacity_and_cost_the_worker_measured(
    tmp_path: Path, tiny_package: dict[str, Path]
) -> None:
    """READY `capacity` = max_batch_size; once the worker has timed forwards of two batch sizes
    (after its warm-up forward) its HEARTBEAT carries `batch_marginal`, shown in /status.json."""
    import json
    import urllib.request

    package = tiny_package["package"]
    x = gpt2.example_input(tiny_gpt2_config()).numpy()
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.cloud("m", package, "cloud", "--max-batch-size", "4", "--max-queue-delay-ms",
                    "300", "--preferred-batch-sizes", "4")  # fmt: skip
        stack.wait_workers("cloud", state="ready")
        status_url = stack.metrics_url.removesuffix("/metrics") + "/status.json"

        def worker() -> dict[str, Any]:
            with urllib.request.urlopen(status_url, timeout=10) as response:
                (model,) = json.loads(response.read())["models"]
                (w,) = model["workers"]
                return dict(w)

        assert worker()["capacity"] == 4 and worker()["batch_marginal"] is None
        sizes: set[float] = set()  # batch sizes the worker has timed (not its warm-up)
        for _ in range(10):  # bounded: a wave of 4 that arrives split still gives a new size
            for wave in ([x], [x] * 4):
                results = asyncio.run(invoke_all(stack.address, wave))
                sizes |= {
                    r.timings["worker_batch_size"]
                    for r in results
                    if "worker_warmup" not in r.timings
                }
            if len(sizes) >= 2:
                break
        assert len(sizes) >= 2, sizes
        stack.wait_for(  # a heartbeat later
            lambda _: worker()["batch_marginal"] is not None, "the batch cost in a heartbeat"
        )
        marginal = worker()["batch_marginal"]
        assert marginal is not None and 0.0 <= marginal <= 1.0
        assert worker()["compute_s"] is not None


def test_the_package_carries_default_batching_that_options_override(tmp_path: Path) -> None:
    """`cicada pack --max-batch-size ...` writes the defaults into the manifest; a worker
    started without batching options batches by them; its own options win."""
    package = tmp_path / "pkg"
    packed = subprocess.run(
        [sys.executable, "-m", "cicada", "pack", "--model", "gpt2-tiny", "--out", str(package),
         "--max-batch-size", "4", "--max-queue-delay-ms", DELAY_MS,
         "--preferred-batch-sizes", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr[-4000:]
    assert Manifest.load(package).batching == {
        "max_batch_size": 4, "max_queue_delay_ms": float(DELAY_MS), "preferred_batch_sizes": [4]
    }  # fmt: skip
    x = gpt2.example_input(tiny_gpt2_config()).numpy()
    with Stack(tmp_path) as stack:
        stack.coordinator()
        stack.cloud("m", package, "cloud")  # no batching options: the package's
        stack.wait_workers("cloud", state="ready")
        results = asyncio.run(invoke_all(stack.address, [x] * 4))
        assert {r.timings["worker_batch_size"] for r in results} == {4.0}
        # Generations decode together, four (the package's preferred size: they start at
        # once) of different lengths; each gets eager greedy's tokens.
        prompts = [x[:, :n] for n in (3, 4, 5, 6)]
        generated = asyncio.run(invoke_all(stack.address, prompts, max_new_tokens=5))
        model = eager_gpt2(package)
        with torch.inference_mode():
            logits = lambda ids: model(torch.from_numpy(ids)).numpy()  # noqa: E731
            for prompt, result in zip(prompts, generated, strict=True):
                request = GenerationRequest.parse({"max_new_tokens": 5}, [prompt])
                greedy = generate(RecomputeDecoder(logits), request, lambda t: None).tokens
                assert result.output.tolist() == greedy
        stack.cloud("m2", package, "cloud-2", "--max-batch-size", "1")  # the option wins
        stack.wait_workers("cloud", 2, state="ready")
        results = asyncio.run(invoke_all(stack.address, [x] * 2, model="m2"))
        assert all("worker_batch_size" not in r.timings for r in results)
