"""fp32 linear layers whose every row comes out the same whatever the number of rows, on
oneDNN's matmul (issue 13).

Why. Speculative verification checks γ drafts in ONE forward over γ + 1 rows and must give the
tokens the cloud's one-token decode gives, bit for bit. With MKL's sgemm (what `nn.Linear`
calls) a row's result depends on how many rows are multiplied with it (~1e-6 apart), so the
verifier had to stop at near-ties and replay every position since the last exact one, one token
at a time: on the GPT-2-medium-like benchmark model one near-tie in ~100 tokens cost ~90
one-token forwards, more than the drafts saved. oneDNN's fp32 matmul computes each row the same
way for 2 to 17 rows (checked on every shape of GPT-2 medium, 1 and 2 threads; `probe` checks it
again, per weight shape, on the machine it runs on), so a single row is computed beside a copy
of itself: the one-token step and a verify forward then agree bit for bit in every linear.

It is also faster at few rows on this project's CI machine (an AMD EPYC): 24 linears of 1024 ×
4096, 2 threads, medians of 5:

    rows      1      2      3      5      9
    MKL      32     68    107     73     82 ms
    oneDNN   19     26     26     32     35 ms

Reordered weights. oneDNN's kernel on the weights as they lie decodes GPT-2 medium at 6.6
tokens/s on one thread against MKL's 8.7–9.0 (7.6–7.9 against 7.7–8.1 on two).
`reorder_in_background` reorders each layer's weight once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`: the same bits, checked per shape) on a background
thread, so no token waits for it; `row_linear` takes the reordered copy once it is there. A
cloud worker starts it once every stage is resident and a generation has come, and only where
row_linear takes oneDNN's kernel (cloud/service.py: a worker that only runs forwards, or runs
on one thread, never reads the copy). Then the 24 layers' linears and the head of GPT-2 medium cost,
paired row / 9 rows / MKL's one row: 118.5 / 124.1 / 111.4 ms on one thread, 79.6 / 81.6 / 102.9
ms on two, and a whole decode runs 11.5–11.7 tokens/s on two threads against MKL's 7.7–9.0 (7.0
against 8.7–9.0 on one: hence MIN_THREADS). The copy costs the weights' size again in memory
(1.42 GB for GPT-2 medium), as continuous batching's packed weights do, and the reordering ~5 s
of one core for GPT-2 medium, in the background.

Falls back to `nn.Linear` itself where oneDNN is not built in, below MIN_THREADS, for non-fp32
tensors and off the CPU; `probe` then says the rows are not invariant, and the verifier keeps its
margin guard. A cloud worker's `--row-invariant` (`set_row_invariance`) moves the threshold:
`always` takes oneDNN's kernel on one thread too — a one-thread worker then decodes alone ~20 %
slower but verifies drafts without replays, which on the GPT-2-medium-like benchmark model gave
its drafted decode 2× its decode alone (BENCHMARKS.md, "Edge drafts after the takeover") —
and `never` keeps `nn.Linear` everywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import cast

import torch
import torch.nn as nn

from cicada.common.defaults import ROW_INVARIANCE

# A verify forward's widest: a takeover's chunk of 16 drafts (cloud/speculative.py), plus the
# last token (a round's γ ≤ 8 drafts are fewer).
PROBE_ROWS = 17
# On one thread the paired-row kernel decodes GPT-2 medium ~20 % slower than MKL's one-row
# kernel (7.0 against 8.7–9.0 tokens/s, reordered); on two, faster (11.6 against 7.7–9.0):
# below this, row_linear is nn.Linear, and the verifier keeps its margin guard.
MIN_THREADS = 2
REORDERED = "_cicada_reordered"  # on an nn.Linear: ((data_ptr, version) of its weight, copy)


def onednn_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()
        and mkldnn is not None
        and hasattr(mkldnn, "_linear_pointwise")
    )


_ONEDNN = onednn_available()
_row_invariance = "auto"


def set_row_invariance(mode: str) -> None:
    """When `row_linear` runs oneDNN's kernel, for the whole process: one of
    common.defaults.ROW_INVARIANCE (set before the model's first forward: the one-token decode
    and every verify forward must take the same kernel)."""
    global _row_invariance
    if mode not in ROW_INVARIANCE:
        raise ValueError(f"row invariance {mode!r}: one of {', '.join(ROW_INVARIANCE)}")
    _row_invariance = mode


def rows_available(device: str = "cpu") -> bool:
    """Whether `row_linear` runs oneDNN's kernel (not `nn.Linear`) on `device` now."""
    if not _ONEDNN or torch.device(device).type != "cpu" or _row_invariance == "never":
        return False
    return _row_invariance == "always" or torch.get_num_threads() >= MIN_THREADS


def _applies(layer: nn.Linear, x: torch.Tensor) -> bool:
    weight = layer.weight
    return (
        rows_available(x.device.type)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
    )


def row_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` (x (..., C_in)), each row computed as in any other number of rows."""
    if not _applies(layer, x):
        return cast(torch.Tensor, layer(x))
    # The module is not called, so its forward pre-hooks are run here: a loading worker's
    # (cloud/pipeline.py) wait until the layer's weights are resident.
    for hook in list(layer._forward_pre_hooks.values()):
        hook(layer, (x,))
    rows = x.reshape(-1, x.size(-1))
    n = rows.size(0)
    if n == 1:  # oneDNN's one-row kernel sums in another order: pair the row with itself
        rows = rows.expand(2, -1).contiguous()
    weight = layer.weight
    reordered = layer.__dict__.get(REORDERED)
    if reordered is not None and reordered[0] == (weight.data_ptr(), weight_version(weight)):
        weight = reordered[1]
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, layer.bias, "none", [], "")
    return cast(torch.Tensor, y[:n].reshape(*x.shape[:-1], y.size(-1)))


_probed: dict[tuple[int, int, bool, int, str], bool] = {}
_same_reordered: dict[tuple[int, int, int], bool] = {}
_probe_lock = threading.Lock()


def probe(layers: list[nn.Linear]) -> bool:
    """Whether `row_linear` gives every row of a PROBE_ROWS-row product exactly as it gives it
    alone, for the weight shape of each of `layers` (each shape checked once per process and
    thread count, on the layer's own weights)."""
    for layer in layers:
        weight = layer.weight
        key = (int(weight.shape[0]), int(weight.shape[1]), layer.bias is not None,
               torch.get_num_threads(), _row_invariance)  # fmt: skip
        with _probe_lock:
            known = _probed.get(key)
        if known is None:
            x = torch.randn(PROBE_ROWS, key[1], generator=torch.Generator().manual_seed(0))
            if not _applies(layer, x):
                known = False
            else:
                with torch.inference_mode():
                    together = row_linear(layer, x)
                    known = all(
                        torch.equal(row_linear(layer, x[r : r + 1])[0], together[r])
                        for r in (0, PROBE_ROWS // 2, PROBE_ROWS - 1)
                    )
            with _probe_lock:
                _probed[key] = known
        if not known:
            return False
    return True


def weight_version(weight: torch.Tensor) -> int:
    """The in-place version of `weight`, to tell a stale derived copy (-1 for an inference
    tensor, which has no version counter: its data pointer has to do)."""
    return -1 if weight.is_inference() else int(weight._version)


def _reorder(layer: nn.Linear) -> bool:
    """Give `layer` a copy of its weight in oneDNN's blocked layout, if that gives the same
    bits as the weight itself (checked once per shape); returns whether it did."""
    weight = layer.weight
    if not _applies(layer, weight[:1]):
        return False
    with torch.no_grad():
        reordered = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 2)
        key = (int(weight.shape[0]), int(weight.shape[1]), torch.get_num_threads())
        with _probe_lock:
            same = _same_reordered.get(key)
        if same is None:
            x = torch.randn(2, int(weight.shape[1]), generator=torch.Generator().manual_seed(1))
            plain = torch.ops.mkldnn._linear_pointwise(x, weight.detach(), None, "none", [], "")
            blocked = torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], "")
            same = bool(torch.equal(plain, blocked))
            with _probe_lock:
                _same_reordered[key] = same
    if same:
        layer.__dict__[REORDERED] = ((weight.data_ptr(), weight_version(weight)), reordered)
    return bool(same)


def reorder_in_background(model: nn.Module) -> threading.Thread | None:
    """Reorder every fp32 CPU `nn.Linear` weight of `model` on a daemon thread (see the module
    docstring); None when oneDNN is not there. `row_linear` uses each copy once it is made."""
    if not _ONEDNN:
        return None
    with _probe_lock:  # callers on two threads (a worker's loader and its main) start one
        running = model.__dict__.get("_cicada_reordering")
        if isinstance(running, threading.Thread):  # one reordering per model
            return running
        thread = threading.Thread(target=_reorder_all, args=(model,), name="cicada-reorder",
                                  daemon=True)  # fmt: skip
        model.__dict__["_cicada_reordering"] = thread
        _reordering.append(thread)
    thread.start()
    return thread


def _reorder_all(model: nn.Module) -> None:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen: set[int] = set()  # a tied weight (GPT-2's head and embedding) is reordered once
    # Below the serving threads (Linux: nice is per thread, and the OpenMP threads this one
    # starts inherit it): with one core, a first token waited for the whole reordering.
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    for layer in layers:
        if _exiting.is_set():
            return
        if id(layer.weight) in seen or REORDERED in layer.__dict__:
            continue
        seen.add(id(layer.weight))
        try:
            _reorder(layer)
        except RuntimeError:  # a shape oneDNN will not reorder: that layer stays as it is
            continue


# A process must not exit while a reordering thread is inside a native op: the C++ runtime's
# teardown under a running thread aborts the process ("terminate called without an active
# exception"; a cloud worker stopped by SIGTERM right after its load exited -6). At exit, the
# threads stop after the layer they are on, and are waited for.
_exiting = threading.Event()
_reordering: list[threading.Thread] = []


@atexit.register
def _stop_reordering() -> None:
    _exiting.set()
    with _probe_lock:
        threads = list(_reordering)
    for thread in threads:
        thread.join(timeout=30)
