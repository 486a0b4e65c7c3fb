"""The dynamic batcher and the batch cost model (cloud/batching.py), without a model: a real
queue, an injected clock."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from cicada.cloud.batching import (
    BatchConfigError,
    BatchCost,
    Batcher,
    BatchPolicy,
    Item,
    cut_sequences,
    pad_and_join,
    shape_key,
)


class Clock:
    """Time that moves only when a wait would: a `get(timeout)` that finds nothing advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Source(queue.Queue[tuple[str, tuple[int, ...], float | None]]):
    """A queue whose blocking get with nothing in it advances the clock instead of sleeping."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def get(self, block: bool = True, timeout: float | None = None):
        try:
            return super().get(block=False)
        except queue.Empty:
            if timeout is not None:
                self.clock.now += timeout
            raise


def batcher(policy: BatchPolicy, clock: Clock) -> tuple[Source, Batcher]:
    source = Source(clock)

    def prepare(work: tuple[str, tuple[int, ...], float | None]) -> Item | None:
        name, shape, _deadline = work
        if name.startswith("expired"):
            return None  # answered by prepare: never batched
        key = None if name.startswith("gen") else shape_key([np.zeros(shape, np.int64)])
        return Item(work, key, clock())

    return source, Batcher(source, policy, prepare, deadline_of=lambda w: w[2], clock=clock)


def names(batch: list[Item] | None) -> list[str]:
    assert batch is not None
    return [item.work[0] for item in batch]


def test_compatible_requests_batch_up_to_the_maximum_and_the_rest_wait_in_order() -> None:
    clock = Clock()
    source, b = batcher(BatchPolicy(3, 10.0), clock)
    for work in [("a1", (1, 8), None), ("b1", (1, 4), None), ("a2", (2, 8), None),
                 ("gen", (1, 8), None), ("a3", (1, 8), None), ("a4", (1, 8), None),
                 ("b2", (1, 4), None)]:  # fmt: skip
        source.put(work)
    assert names(b.next(1.0)) == ["a1", "a2", "a3"]  # same trailing dims; rows may differ
    assert names(b.next(1.0)) == ["b1", "b2"]  # the held ones first, then the source
    assert names(b.next(1.0)) == ["gen"]  # runs alone
    assert names(b.next(1.0)) == ["a4"]
    assert b.next(0.5) is None


def test_the_first_request_waits_at_most_the_queue_delay_for_company() -> None:
    clock = Clock()
    source, b = batcher(BatchPolicy(8, 50.0), clock)
    source.put(("a1", (1, 8), None))
    assert names(b.next(1.0)) == ["a1"]
    assert clock.now == pytest.approx(0.05)  # waited out the delay: nobody came


def test_a_preferred_size_goes_at_once_and_a_deadline_caps_the_wait() -> None:
    clock = Clock()
    source, b = batcher(BatchPolicy(8, 10_000.0, (2,)), clock)
    source.put(("a1", (1, 8), None))
    source.put(("a2", (1, 8), None))
    assert names(b.next(1.0)) == ["a1", "a2"] and clock.now == 0.0
    source.put(("a3", (1, 8), 0.25))  # 10 s of delay, but its deadline is 0.25 s away
    assert names(b.next(1.0)) == ["a3"] and clock.now == pytest.approx(0.25)


def test_requests_answered_by_prepare_never_join_a_batch() -> None:
    clock = Clock()
    source, b = batcher(BatchPolicy(4, 0.0), clock)
    for work in [("expired1", (1, 8), None), ("a1", (1, 8), None), ("expired2", (1, 8), None),
                 ("a2", (1, 8), None)]:  # fmt: skip
        source.put(work)
    assert names(b.next(1.0)) == ["a1", "a2"]


def test_without_batching_every_request_runs_alone() -> None:
    clock = Clock()
    source, b = batcher(BatchPolicy(), clock)
    source.put(("a1", (1, 8), None))
    source.put(("a2", (1, 8), None))
    assert names(b.next(1.0)) == ["a1"] and names(b.next(1.0)) == ["a2"]


def test_shape_key_refuses_what_cannot_be_split_by_rows() -> None:
    assert shape_key([np.zeros((2, 3), np.int64)]) == shape_key([np.zeros((5, 3), np.int64)])
    assert shape_key([np.zeros((2, 3), np.int64)]) != shape_key([np.zeros((2, 3), np.int32)])
    assert shape_key([np.zeros((2, 3), np.int64)]) != shape_key([np.zeros((2, 4), np.int64)])
    assert shape_key([np.zeros((), np.int64)]) is None
    assert shape_key([np.zeros((0, 3), np.int64)]) is None
    assert shape_key([np.zeros((2, 3)), np.zeros((3, 3))]) is None  # rows disagree


@pytest.mark.parametrize(
    "policy",
    [dict(max_batch_size=0), dict(max_batch_size=2000), dict(max_queue_delay_ms=-1.0),
     dict(max_queue_delay_ms=float("nan")), dict(max_batch_size=4, preferred_batch_sizes=(8,))],
)  # fmt: skip
def test_batch_policy_refuses_settings_out_of_bounds(policy: dict) -> None:
    with pytest.raises(BatchConfigError):
        BatchPolicy(**policy)


def test_batch_cost_fits_a_line_through_the_sizes_seen() -> None:
    cost = BatchCost()
    assert cost.fit() == (None, None)
    cost.observe(1, 0.10)
    assert cost.fit() == (0.10, None)  # one size: no marginal cost yet
    cost.observe(4, 0.16)
    cost.observe(8, 0.24)
    unit, marginal = cost.fit()
    assert unit == pytest.approx(0.10, abs=1e-9) and marginal == pytest.approx(0.2, abs=1e-9)
    cost.observe(0, 1.0)  # nonsense is ignored
    cost.observe(2, float("inf"))
    assert cost.fit() == (unit, marginal)


@pytest.mark.parametrize(
    "fields",
    [dict(max_batch_size=0), dict(max_batch_size=True), dict(max_queue_delay_ms=-1),
     dict(max_queue_delay_ms=float("inf")), dict(preferred_batch_sizes=[5]),
     dict(preferred_batch_sizes="4"), dict(max_batch_size=4, preferred_batch_sizes=[4, "x"])],
)  # fmt: skip
def test_a_launch_spec_from_the_wire_refuses_batch_settings_out_of_bounds(
    fields: dict[str, object],
) -> None:
    from dataclasses import asdict

    from cicada.common.errors import LaunchError
    from cicada.common.launch import WorkerSpec

    spec = asdict(WorkerSpec("m", "/pkg", "tcp://127.0.0.1:5555", "w", max_batch_size=4))
    assert WorkerSpec.from_wire(spec).max_batch_size == 4
    with pytest.raises(LaunchError, match=r"batch|delay"):
        WorkerSpec.from_wire({**spec, **fields})
    args = WorkerSpec("m", "/p", "tcp://x:1", "w", max_batch_size=8, max_queue_delay_ms=5,
                      preferred_batch_sizes=[4, 8]).cli_args()  # fmt: skip
    assert args[-6:] == ["--max-batch-size", "8", "--max-queue-delay-ms", "5.0",
                         "--preferred-batch-sizes", "4,8"]  # fmt: skip


@pytest.mark.parametrize(
    "doc",
    [[], {"max_batch": 4}, {"max_batch_size": 0}, {"max_batch_size": 2000},
     {"max_batch_size": True}, {"max_batch_size": 4.0}, {"max_queue_delay_ms": -1},
     {"max_queue_delay_ms": float("inf")}, {"max_queue_delay_ms": "5"},
     {"preferred_batch_sizes": 4}, {"max_batch_size": 4, "preferred_batch_sizes": [8]},
     {"preferred_batch_sizes": [0]}, {"pad_sequences": 1}, {"pad_sequences": "yes"},
     {"sequence_outputs": [0]}, {"pad_sequences": True, "sequence_outputs": [64]},
     {"pad_sequences": True, "sequence_outputs": [0, 0]},
     {"pad_sequences": True, "sequence_outputs": 0},
     {"pad_sequences": True, "sequence_outputs": [True]}],
)  # fmt: skip
def test_a_manifests_batching_defaults_are_checked_before_use(doc: object) -> None:
    from cicada.common.errors import PackageFormatError
    from cicada.common.package import parse_batching

    with pytest.raises(PackageFormatError, match="batching"):
        parse_batching(doc, "manifest.json: batching")


def test_a_package_without_batching_defaults_keeps_its_manifest_as_it_was(
    tiny_package: dict[str, object],
) -> None:
    from cicada.common.package import Manifest, parse_batching

    manifest = Manifest.load(str(tiny_package["package"]))
    assert manifest.batching == {} and "batching" not in manifest.to_json()
    ok = {"max_batch_size": 8, "max_queue_delay_ms": 5, "preferred_batch_sizes": [4, 8]}
    assert parse_batching(ok, "x") == ok
    assert BatchPolicy.of(ok) == BatchPolicy(8, 5.0, (4, 8))


def test_padded_keys_leave_the_sequence_out_only_where_the_package_says() -> None:
    short, long = np.zeros((1, 5), np.int64), np.zeros((2, 9), np.int64)
    assert shape_key([short]) != shape_key([long])
    assert shape_key([short], pad=True) == shape_key([long], pad=True)
    assert shape_key([short], pad=True) != shape_key([short])  # never mixed with exact keys
    assert shape_key([short], pad=True) != shape_key([short.astype(np.int32)], pad=True)
    # Inputs whose sequences disagree, or an input without one: exact shapes as before.
    mixed = [np.zeros((1, 5), np.int64), np.zeros((1, 6), np.int64)]
    assert shape_key(mixed, pad=True) == shape_key(mixed)
    flat = [np.zeros((1,), np.float32)]
    assert shape_key(flat, pad=True) == shape_key(flat)


def test_padding_joins_on_the_right_and_cuts_back_each_requests_own_length() -> None:
    a = np.arange(1, 4, dtype=np.int64).reshape(1, 3)
    b = np.arange(10, 20, dtype=np.int64).reshape(2, 5)
    (joined,), lengths = pad_and_join([[a], [b]])
    assert lengths == [3, 5] and joined.shape == (3, 5)
    assert joined[0].tolist() == [1, 2, 3, 0, 0] and np.array_equal(joined[1:], b)
    logits = np.random.default_rng(0).standard_normal((1, 5, 7)).astype(np.float32)
    pooled = np.ones((1, 4), np.float32)
    out = cut_sequences([logits, pooled], 3, 5, [0])
    assert np.array_equal(out[0], logits[:, :3]) and out[0].flags.c_contiguous
    assert out[1] is pooled  # not a sequence output: left whole
    with pytest.raises(ValueError, match="sequence output 1"):
        cut_sequences([logits, pooled], 3, 5, [1])  # (1, 4) is not (rows, 5, ...)
    with pytest.raises(ValueError, match="sequence output 2"):
        cut_sequences([logits, pooled], 3, 5, [2])  # no such output


def test_sequence_outputs_go_with_padding() -> None:
    with pytest.raises(BatchConfigError, match="pad_sequences"):
        BatchPolicy(4, sequence_outputs=(0,))
    policy = BatchPolicy.of({"max_batch_size": 4, "pad_sequences": True, "sequence_outputs": [0]})
    assert policy.pad_sequences and policy.sequence_outputs == (0,)
