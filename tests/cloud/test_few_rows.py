"""cloud/few_rows.py: a row's linear result does not depend on how many rows it is computed
with, before and after its weight is reordered, and a stale reordered copy is never used."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn as nn

from cicada.cloud import few_rows
from cicada.cloud.few_rows import REORDERED, probe, reorder_in_background, row_linear
from cicada.cloud.models import gpt2

pytestmark = pytest.mark.skipif(not few_rows.onednn_available(), reason="needs oneDNN")


@pytest.fixture(autouse=True)
def enough_threads() -> Iterator[None]:
    """row_linear is oneDNN's from MIN_THREADS torch threads on (below, nn.Linear's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(few_rows.MIN_THREADS)
    yield
    torch.set_num_threads(threads)


def test_below_min_threads_it_is_nn_linear() -> None:
    lin = layer(64, 32)
    x = torch.randn(3, 64)
    torch.set_num_threads(1)
    assert torch.equal(row_linear(lin, x), lin(x))
    assert not probe([lin])


def test_row_invariance_always_takes_onednn_on_one_thread_and_never_takes_none() -> None:
    """A worker's --row-invariant (common.defaults.ROW_INVARIANCE), set for the process."""
    lin = layer(64, 96, seed=2)
    x = torch.randn(few_rows.PROBE_ROWS, 64)
    try:
        torch.set_num_threads(1)
        few_rows.set_row_invariance("always")
        assert few_rows.rows_available("cpu") and not few_rows.rows_available("meta")
        together = row_linear(lin, x)
        assert all(torch.equal(row_linear(lin, x[r : r + 1])[0], together[r]) for r in range(5))
        assert probe([lin])
        torch.set_num_threads(few_rows.MIN_THREADS)
        few_rows.set_row_invariance("never")
        assert not few_rows.rows_available("cpu")
        assert torch.equal(row_linear(lin, x), lin(x)) and not probe([lin])
        with pytest.raises(ValueError, match="one of auto, always, never"):
            few_rows.set_row_invariance("sometimes")
    finally:
        few_rows.set_row_invariance("auto")
    assert few_rows.rows_available("cpu") and probe([lin])


def layer(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("shape", [(64, 192), (256, 64), (128, 1000)])
def test_each_row_comes_out_the_same_alone_or_with_others(shape: tuple[int, int]) -> None:
    lin = layer(*shape)
    x = torch.randn(few_rows.PROBE_ROWS, shape[0])
    together = row_linear(lin, x)
    for r in range(few_rows.PROBE_ROWS):
        assert torch.equal(row_linear(lin, x[r : r + 1])[0], together[r]), r
        assert torch.equal(row_linear(lin, x[: r + 1])[r], together[r]), r
    torch.testing.assert_close(together, lin(x), rtol=1e-5, atol=1e-5)  # the same product
    assert probe([lin])


def test_a_reordered_weight_gives_the_same_bits_and_a_changed_weight_drops_it() -> None:
    lin = layer(128, 384, seed=1)
    x = torch.randn(5, 128)
    before = [row_linear(lin, x[r : r + 1])[0] for r in range(5)]
    thread = reorder_in_background(nn.Sequential(lin))
    assert thread is not None
    thread.join(timeout=60)
    assert REORDERED in lin.__dict__
    after = row_linear(lin, x)
    for r in range(5):
        assert torch.equal(after[r], before[r]), r
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place change: the reordered copy is stale now
    doubled = row_linear(lin, x)
    torch.testing.assert_close(doubled, lin(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(doubled, after)


def test_forward_pre_hooks_run_though_the_module_is_not_called() -> None:
    lin = layer(32, 16)
    calls: list[tuple[int, ...]] = []
    lin.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    row_linear(lin, torch.randn(1, 1, 32))
    assert calls == [(1, 1, 32)]


def test_gpt2_decodes_the_same_tokens_after_its_weights_are_reordered() -> None:
    from cicada.cloud.generate import decoder_for
    from cicada.common.generation import GenerationRequest, generate

    model = gpt2.build(**gpt2.tiny_config()).eval()
    prompt = np.arange(3, 12, dtype=np.int64)

    def logits_of_steps() -> list[torch.Tensor]:
        cache = model.new_cache()
        with torch.inference_mode():
            model.decode(torch.from_numpy(prompt)[None], cache, 0)
            return [model.decode(torch.tensor([[t]]), cache, len(prompt) + i)[0, -1]
                    for i, t in enumerate([5, 9, 2, 7])]  # fmt: skip

    tokens = generate(decoder_for(model), GenerationRequest(prompt, 12), lambda t: None).tokens
    steps = logits_of_steps()
    thread = reorder_in_background(model)
    assert thread is not None
    thread.join(timeout=60)
    assert REORDERED in model.lm_head.__dict__
    again = generate(decoder_for(model), GenerationRequest(prompt, 12), lambda t: None).tokens
    assert again == tokens
    for a, b in zip(logits_of_steps(), steps, strict=True):
        assert torch.equal(a, b)


def test_inference_tensor_weights_are_reordered_and_give_the_same_bits() -> None:
    with torch.inference_mode():
        lin = layer(96, 200, seed=3)
        x = torch.randn(4, 96)
        before = row_linear(lin, x)
    assert lin.weight.is_inference()
    thread = reorder_in_background(nn.Sequential(lin))
    assert thread is not None
    thread.join(timeout=60)
    assert REORDERED in lin.__dict__
    with torch.inference_mode():
        assert torch.equal(row_linear(lin, x), before)


EXIT_WHILE_REORDERING = """
import sys, torch, torch.nn as nn
torch.set_num_threads(2)
from cicada.cloud.few_rows import reorder_in_background
model = nn.Sequential(*[nn.Linear(1024, 4096) for _ in range(12)]).requires_grad_(False)
assert reorder_in_background(model) is not None
sys.exit(0)  # at once: the reordering thread is inside a native op
"""


def test_a_process_exiting_while_reordering_exits_cleanly() -> None:
    """Exiting while the background thread is inside oneDNN's reorder used to abort the
    process (C++ teardown under a running thread: "terminate called without an active
    exception", exit -6; a cloud worker stopped right after its load did). The thread now
    stops after its current layer and is waited for at exit."""
    proc = subprocess.run([sys.executable, "-c", EXIT_WHILE_REORDERING],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
