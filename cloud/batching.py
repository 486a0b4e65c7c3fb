"""Dynamic batching for the cloud worker, after Triton's dynamic batcher.

Per model: `max_batch_size` (dispatches run as one forward, at most), `max_queue_delay_ms` (how
long the first dispatch of a batch may wait for others to join) and `preferred_batch_sizes`
(a batch that reaches one of them goes at once when no more work is waiting, without waiting
out the delay). A batch holds dispatches whose inputs are *compatible*: the same number of
tensors, the same dtypes and the same trailing dimensions, so that they concatenate along the
first (batch) dimension. Generations are not batched here but continuously, a token at a time
(cloud/continuous.py): the batcher only hands them over together, under one key.

Sequences of different lengths (`pad_sequences`, a package's setting: what the model allows,
not a deployment's choice). Requests whose inputs differ only in their second dimension, the
sequence, share a forward where the package says the model allows it: each is padded on the
right with 0 (the pad id of Cicada's tokenizers) to the batch's longest, and each output the
package names in `sequence_outputs` is cut back to the request's own length. That is exact in
two kinds of model: a causal one, where position t depends on positions <= t alone, so no
real position sees the padding (GPT-2; its logits are output 0); and one that masks its pad id
(MiniLM masks 0; its output is pooled, so it has no sequence output). A bidirectional model
without a mask would see the padding: its package must not set it. The result is the same
forward's, bit for bit, as that padded batch run eagerly; against the request run alone the
kernels see other shapes (BENCHMARKS.md, "Batching sequences of different lengths").

Everything here is torch-free and clock-injectable: `Batcher` is tested without a model, and
`BatchCost` is the cost model the worker reports (docs/PROTOCOL.md, READY `batch_marginal`).
"""

from __future__ import annotations

import math
import queue
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from cicada.common.defaults import MAX_BATCH_SIZE, MAX_QUEUE_DELAY_MS

T = TypeVar("T")


class BatchConfigError(ValueError):
    """A batching setting out of bounds (the message names it)."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    pad_sequences: bool = False  # token requests of different lengths may share a forward
    sequence_outputs: tuple[int, ...] = ()  # the outputs cut back to each request's length

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE:
            raise BatchConfigError(
                f"max_batch_size {self.max_batch_size!r} is not in [1, {MAX_BATCH_SIZE}]"
            )
        delay = self.max_queue_delay_ms
        if not (math.isfinite(delay) and 0 <= delay <= MAX_QUEUE_DELAY_MS):
            raise BatchConfigError(
                f"max_queue_delay_ms {delay!r} is not in [0, {MAX_QUEUE_DELAY_MS:g}]"
            )
        if self.sequence_outputs and not self.pad_sequences:
            raise BatchConfigError("sequence_outputs goes with pad_sequences")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise BatchConfigError(
                    f"preferred batch size {size!r} is not in [1, max_batch_size "
                    f"{self.max_batch_size}]"
                )

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> BatchPolicy:
        """From settings as a manifest or a WorkerSpec holds them (absent: the defaults)."""
        return cls(
            int(settings.get("max_batch_size", 1)),
            float(settings.get("max_queue_delay_ms", 0.0)),
            tuple(settings.get("preferred_batch_sizes", ())),
            bool(settings.get("pad_sequences", False)),
            tuple(settings.get("sequence_outputs", ())),
        )

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1


PADDED = "padded"  # the first element of a key under which sequences are padded


def shape_key(arrays: Sequence[np.ndarray], pad: bool = False) -> Hashable | None:
    """What two requests must share to run as one forward: per input, its dtype and trailing
    dimensions. None: the request cannot be batched (a scalar input, or inputs whose first
    dimensions differ, so that the outputs could not be split back by rows). With `pad`
    (BatchPolicy.pad_sequences) the second dimension, the sequence, is left out where every
    input has one and all have the same length: such requests are padded to share a forward."""
    if not arrays or any(a.ndim == 0 for a in arrays):
        return None
    if len({a.shape[0] for a in arrays}) != 1 or arrays[0].shape[0] == 0:
        return None
    if pad and sequence_length(arrays) is not None:
        return (PADDED, *((a.dtype.str, a.shape[2:]) for a in arrays))
    return tuple((a.dtype.str, a.shape[1:]) for a in arrays)


def sequence_length(arrays: Sequence[np.ndarray]) -> int | None:
    """The length every input shares along its second dimension; None if they do not."""
    lengths = {a.shape[1] if a.ndim >= 2 else -1 for a in arrays}
    if len(lengths) != 1 or min(lengths) < 1:
        return None
    return int(next(iter(lengths)))


def pad_and_join(
    requests: Sequence[Sequence[np.ndarray]],
) -> tuple[list[np.ndarray], list[int]]:
    """The inputs of a padded batch: each request's inputs padded on the right with 0 along
    the sequence to the longest, then joined along the rows; and each request's own length."""
    lengths = []
    for arrays in requests:
        n = sequence_length(arrays)
        if n is None:
            raise ValueError("a request of a padded batch has no common sequence length")
        lengths.append(n)
    longest = max(lengths)
    joined = []
    for j in range(len(requests[0])):
        parts = []
        for arrays in requests:
            a = arrays[j]
            widths = [(0, 0)] * a.ndim
            widths[1] = (0, longest - a.shape[1])
            parts.append(np.pad(a, widths) if a.shape[1] < longest else a)
        joined.append(np.concatenate(parts))
    return joined, lengths


def cut_sequences(
    outputs: Sequence[np.ndarray], length: int, longest: int, sequence_outputs: Sequence[int]
) -> list[np.ndarray]:
    """One request's outputs of a padded batch (its rows already taken) cut back to its own
    `length` along the sequence, for the outputs the package names. An output named that
    does not have the batch's `longest` as its second dimension is a ValueError: the package
    says something the model does not do."""
    out = list(outputs)
    for i in sequence_outputs:
        if i >= len(out) or out[i].ndim < 2 or out[i].shape[1] != longest:
            shape = tuple(out[i].shape) if i < len(out) else None
            raise ValueError(
                f"sequence output {i} is not (rows, {longest}, ...) in a batch padded to "
                f"{longest} (its shape: {shape})"
            )
        out[i] = np.ascontiguousarray(out[i][:, :length])
    return out


def rows(arrays: Sequence[np.ndarray]) -> int:
    """The batch rows a request brings (its inputs' shared first dimension)."""
    return int(arrays[0].shape[0])


@dataclass
class Item(Generic[T]):
    """A request ready to run: its work item, its batching key (None: runs alone), when the
    batcher took it, and its input arrays once checked (None: not parsed here)."""

    work: T
    key: Hashable | None
    arrived: float
    inputs: list[np.ndarray] = field(default_factory=list)


class Batcher(Generic[T]):
    """Takes work items off `source` and hands out batches of compatible ones.

    `prepare` turns a raw item into an `Item`, or answers it and returns None (a request that
    expired, or whose inputs are refused, is never run). Items that do not fit the batch being
    formed wait in order for the next one."""

    def __init__(
        self,
        source: queue.Queue[T],
        policy: BatchPolicy,
        prepare: Callable[[T], Item[T] | None],
        deadline_of: Callable[[T], float | None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source, self.policy, self.prepare = source, policy, prepare
        self.deadline_of, self.clock = deadline_of, clock
        self.held: deque[Item[T]] = deque()

    def _pull(self, timeout: float | None) -> Item[T] | None:
        """The next prepared item from the source: waits up to `timeout` (0: only what is
        there; None: forever)."""
        end = None if timeout is None else self.clock() + timeout
        while True:
            left = None if end is None else max(0.0, end - self.clock())
            try:
                raw = self.source.get_nowait() if left == 0 else self.source.get(timeout=left)
            except queue.Empty:
                return None
            item = self.prepare(raw)
            if item is not None:
                return item

    def next(self, timeout: float | None, linger: bool = True) -> list[Item[T]] | None:
        """One batch (at least one item), or None if nothing came within `timeout`. With
        `linger` false the batch is what is already there: no waiting out the queue delay
        (the worker decoding streams must not stall them waiting for company)."""
        first = self.held.popleft() if self.held else self._pull(timeout)
        if first is None:
            return None
        batch = [first]
        policy = self.policy
        if first.key is None or not policy.batching:
            return batch
        for item in list(self.held):  # those held back first, in order
            if len(batch) >= policy.max_batch_size:
                break
            if item.key == first.key:
                self.held.remove(item)
                batch.append(item)
        wait_until = first.arrived + (policy.max_queue_delay_ms / 1000 if linger else 0.0)
        deadlines = [d for d in (self.deadline_of(i.work) for i in batch) if d is not None]
        if deadlines:  # never hold a request past its own deadline waiting for company
            wait_until = min(wait_until, *deadlines)
        while len(batch) < policy.max_batch_size:
            pulled = self._pull(0)
            if pulled is None:
                left = wait_until - self.clock()
                if left <= 0 or len(batch) in policy.preferred_batch_sizes:
                    break
                pulled = self._pull(left)
                if pulled is None:
                    break
            item = pulled
            if item.key == first.key:
                batch.append(item)
                deadline = self.deadline_of(item.work)
                if deadline is not None:
                    wait_until = min(wait_until, deadline)
            else:
                self.held.append(item)
        return batch


@dataclass
class BatchCost:
    """What a forward of k requests costs, fitted from the worker's own forwards:

        seconds(k) = unit_s * (1 + (k - 1) * marginal)

    `unit_s` is a batch of one, `marginal` what each further request adds as a fraction of it
    (0: free, 1: no gain over running them one by one). A least-squares line through the mean
    time of each batch size seen (an exponential average each); with one size seen only,
    `marginal` is unknown (None) and `unit_s` that size's time per forward."""

    alpha: float = 0.2
    _mean: dict[int, float] = field(default_factory=dict)

    def observe(self, size: int, seconds: float) -> None:
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        old = self._mean.get(size)
        self._mean[size] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def fit(self) -> tuple[float | None, float | None]:
        """(unit_s, marginal); (None, None) before any forward."""
        if not self._mean:
            return None, None
        if len(self._mean) == 1:
            (seconds,) = self._mean.values()
            return seconds, None
        xs = [k - 1 for k in self._mean]
        ys = list(self._mean.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        unit = my - slope * mx
        if unit <= 0:  # a noisy fit: fall back to the smallest batch seen
            smallest = min(self._mean)
            unit = self._mean[smallest]
        return unit, min(1.0, max(0.0, slope / unit))
