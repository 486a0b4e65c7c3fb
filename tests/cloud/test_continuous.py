"""Continuous batching (cloud/continuous.py): streams that join and leave at different steps
each get exactly the tokens of their own greedy decode alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cicada.cloud import few_rows
from cicada.cloud.continuous import DecodeStream, Streams, batchable
from cicada.cloud.generate import CachedGPTDecoder, decoder_for
from cicada.cloud.models import gpt2
from cicada.common.generation import GenerationRequest, generate
from cicada.testing import tiny_gpt2_config


def model() -> gpt2.GPT:
    return gpt2.build(**tiny_gpt2_config())


def alone(m: gpt2.GPT, request: GenerationRequest) -> list[int]:
    return generate(decoder_for(m), request, lambda t: None).tokens


def request(seed: int, length: int, n: int, eos: int | None = None) -> GenerationRequest:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, tiny_gpt2_config()["vocab_size"], size=length, dtype=np.int64)
    return GenerationRequest(prompt, n, eos)


def assert_batched_step_matches_alone(m: Any, streams: Streams, count: int) -> None:
    """The next step's logits of the `count` active streams, decoded together, within 1e-5 of
    each stream's prompt prefilled and its last token decoded alone."""
    assert len(streams.active) == count
    with torch.inference_mode():
        batched, _ = streams._forward(streams.active)
    for j, stream in enumerate(streams.active):
        prompt = stream.request.prompt
        dec = CachedGPTDecoder(m.decode, m, "cpu", m.decode)
        dec.start(prompt)
        with torch.inference_mode():
            ids = torch.tensor([[stream.tokens[-1]]])
            solo = m.decode(ids, dec._cache, prompt.size)[0, -1]
        torch.testing.assert_close(batched[j], solo, rtol=1e-5, atol=1e-5)


def test_streams_joining_and_leaving_get_their_own_greedy_tokens() -> None:
    m = model()
    # (prompt length, max_new_tokens, the step it joins at)
    plan = [(3, 10, 0), (7, 4, 0), (1, 15, 2), (12, 8, 3), (5, 6, 6), (20, 12, 6), (9, 1, 7)]
    requests = [request(i, t, n) for i, (t, n, _) in enumerate(plan)]
    streams = Streams(m, limit=8)
    emitted: dict[int, list[int]] = {i: [] for i in range(len(plan))}
    made: dict[int, DecodeStream] = {}
    widest = 0
    for step in range(40):
        for i, (_t, _n, at) in enumerate(plan):
            if at == step:
                made[i] = DecodeStream(requests[i], emitted[i].append, owner=i)
                streams.start(made[i])
        widest = max(widest, len(streams.active))
        streams.step()
    assert not streams.active and widest >= 4
    for i, r in enumerate(requests):
        expected = alone(m, r)
        assert made[i].tokens == expected == emitted[i], f"stream {i}"
        assert made[i].stopped == "length"
    assert max(s.peak for s in made.values()) >= 4


def test_eos_cancel_and_deadline_stop_one_stream_only() -> None:
    m = model()
    base = request(1, 6, 12)
    first = alone(m, base)
    eos = GenerationRequest(base.prompt, 12, first[3])
    cancelled = {"now": False}
    s_eos = DecodeStream(eos, lambda t: None)
    s_cancel = DecodeStream(request(2, 4, 12), lambda t: None, lambda: cancelled["now"])
    s_deadline = DecodeStream(request(3, 5, 12), lambda t: None, deadline=0.0)
    s_full = DecodeStream(request(4, 8, 12), lambda t: None)
    streams = Streams(m)
    for s in (s_eos, s_cancel, s_full):
        streams.start(s)
    streams.start(s_deadline)  # stops at its first token: never active
    assert s_deadline.stopped == "deadline" and len(s_deadline.tokens) == 1
    streams.step()
    cancelled["now"] = True
    while streams.active:
        streams.step()
    assert s_eos.stopped == "eos" and s_eos.tokens == first[: first.index(first[3]) + 1]
    assert s_cancel.stopped == "cancelled" and len(s_cancel.tokens) == 3  # checked after
    assert s_full.stopped == "length" and s_full.tokens == alone(m, s_full.request)


def test_a_batched_step_matches_the_step_alone() -> None:
    """Logits of a stream's step batched with others vs. decoding alone: equal to float
    rounding, not bit for bit on this CPU (BLAS sums a (B, C) @ (C, N) matmul in another order
    than a (1, C) one), which is why the requirement is equal tokens, not equal state."""
    m = model()
    reqs = [request(i, 4 + 3 * i, 5) for i in range(4)]
    streams = Streams(m)
    for r in reqs:
        streams.start(DecodeStream(r, lambda t: None))
    assert_batched_step_matches_alone(m, streams, len(reqs))


def test_in_rows_mode_a_batched_step_is_the_step_alone_bit_for_bit() -> None:
    """With oneDNN and 2+ threads (cloud/few_rows.py) every linear computes each row as the
    solo step does, so a stream's logits do not depend on its company at all, reordered
    weights or not, and its tokens are its own greedy decode's by construction."""
    threads = torch.get_num_threads()
    torch.set_num_threads(few_rows.MIN_THREADS)
    try:
        if not few_rows.rows_available("cpu"):
            pytest.skip("oneDNN's row-invariant matmul is not available here")
        m = model()
        reqs = [request(30 + i, 3 + 2 * i, 6) for i in range(5)]
        for reordered in (False, True):
            if reordered:
                thread = few_rows.reorder_in_background(m)
                assert thread is not None
                thread.join(timeout=60)
            streams = Streams(m)
            for r in reqs:
                streams.start(DecodeStream(r, lambda t: None))
            with torch.inference_mode():
                batched, _ = streams._forward(streams.active)
            for j, stream in enumerate(streams.active):
                dec = CachedGPTDecoder(m.decode, m, "cpu", m.decode)
                dec.start(stream.request.prompt)
                with torch.inference_mode():
                    ids = torch.tensor([[stream.tokens[-1]]])
                    solo = m.decode(ids, dec._cache, stream.request.prompt.size)[0, -1]
                assert torch.equal(batched[j], solo), (reordered, j)
    finally:
        torch.set_num_threads(threads)


def test_only_the_reference_gpt2_is_batched() -> None:
    assert batchable(model())
    assert not batchable(torch.nn.Linear(2, 2))


def test_packed_linears_match_torch_and_follow_a_changed_weight() -> None:
    """Steps of two or more streams run the linear layers on weights packed once (MKL's
    packed GEMM): logits within 1e-5 of decoding alone, and a weight changed in place after
    the packing is packed again, not served stale."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # below few_rows.MIN_THREADS: the MKL path
    try:
        check_packed_linears()
    finally:
        torch.set_num_threads(threads)


def check_packed_linears() -> None:
    m = model()
    streams = Streams(m)
    assert streams.packed is not None  # this CPU build of torch has MKL
    reqs = [request(10 + i, 5 + i, 6) for i in range(3)]
    for r in reqs:
        streams.start(DecodeStream(r, lambda t: None))
    streams.step()  # packs every linear weight
    with torch.no_grad():
        m.lm_head.weight.mul_(1.5)  # tied: the token embedding changes with it
        m.transformer["h"][0].mlp.c_fc.weight.add_(0.01)
    # What is decoded so far ran on the old weights: the same requests start again.
    fresh = [DecodeStream(r, lambda t: None) for r in reqs]
    streams.active = []
    for s in fresh:
        streams.start(s)
    assert_batched_step_matches_alone(m, streams, len(reqs))
    while streams.active:
        streams.step()
    assert [s.tokens for s in fresh] == [alone(m, r) for r in reqs]


def test_a_stream_alone_is_not_packed_and_matches_the_cached_decoder() -> None:
    """One stream keeps torch's own matmul (a matrix-vector product): its logits and its
    cache equal CachedGPTDecoder's, which concatenates its cache every step."""
    m = model()
    r = request(20, 6, 12)
    streams = Streams(m)
    s = DecodeStream(r, lambda t: None)
    streams.start(s)
    dec = CachedGPTDecoder(m.decode, m, "cpu", m.decode)
    token = dec.start(r.prompt)
    for _ in range(10):
        with torch.inference_mode():
            logits, _ = streams._forward([s])
        streams.step()
        token = dec.advance(token)
        assert s.tokens[-1] == token
    assert streams.packed is not None and not streams.packed._packed  # never packed
    assert len(s.cache) == len(dec._cache) == m.config.n_layer
    for (k, v), layer in zip(s.cache, dec._cache, strict=True):
        assert k.shape == layer.k.shape == (1, m.config.n_head, 6 + 10, 32)
        torch.testing.assert_close(k, layer.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, layer.v, rtol=1e-5, atol=1e-5)
    del logits


def test_caches_grow_in_place_and_a_replaced_cache_is_taken_as_it_is() -> None:
    """A stream's cache lives in a buffer with room to grow (doubling): a long generation
    from a short prompt outgrows it several times and still gets its own tokens. A cache that
    someone replaced between steps (here: rolled back two tokens and given another last
    token, as a speculative verifier does) is copied into a new buffer, and the views handed
    out before are never written to."""
    m = model()
    long = request(30, 2, 40)  # room for 18, then 36, then 41 positions
    short = request(31, 9, 14)
    streams = Streams(m)
    s_long, s_short = DecodeStream(long, lambda t: None), DecodeStream(short, lambda t: None)
    streams.start(s_long)
    streams.start(s_short)
    rooms = set()
    for _ in range(5):
        streams.step()
        assert s_long.room is not None
        rooms.add(s_long.room.capacity)
    held = [(k.clone(), v.clone(), k, v) for k, v in s_short.cache]
    s_short.tokens = s_short.tokens[:-2]
    s_short.tokens[-1] = (s_short.tokens[-1] + 1) % m.config.vocab_size
    s_short.cache = [(k[:, :, :-2], v[:, :, :-2]) for k, v in s_short.cache]
    kept = list(s_short.tokens)
    while streams.active:
        streams.step()
        assert s_long.room is not None
        rooms.add(s_long.room.capacity)
    for before_k, before_v, k, v in held:
        assert torch.equal(k, before_k) and torch.equal(v, before_v)
    assert rooms == {18, 36, 41}  # it grew, twice doubling, then to what it can still need
    assert s_long.tokens == alone(m, long)
    assert s_long.cache[0][0].size(2) == 2 + 40 - 1  # every position but the last token's
    # The short stream went on from its prompt and the tokens it was left with.
    rest = GenerationRequest(np.concatenate([short.prompt, kept]), 14 - len(kept))
    assert s_short.tokens == kept + alone(m, rest)
    assert s_short.cache[0][0].size(2) == 9 + 14 - 1
    dec = CachedGPTDecoder(m.decode, m, "cpu", m.decode)
    dec.start(np.concatenate([short.prompt, s_short.tokens[:-1]]))
    for (k, v), layer in zip(s_short.cache, dec._cache, strict=True):
        torch.testing.assert_close(k, layer.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, layer.v, rtol=1e-5, atol=1e-5)


def test_weights_that_are_inference_tensors_are_packed_too() -> None:
    """A model built under torch.inference_mode has weights without a version counter (the
    MKL path: one thread, below few_rows.MIN_THREADS; rows mode for them:
    tests/cloud/test_few_rows.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_inference_tensor_weights()
    finally:
        torch.set_num_threads(threads)


def check_inference_tensor_weights() -> None:
    with torch.inference_mode():
        m = model()
    assert m.lm_head.weight.is_inference()
    reqs = [request(40 + i, 3 + 2 * i, 5) for i in range(3)]
    streams = Streams(m)
    made = [DecodeStream(r, lambda t: None) for r in reqs]
    for s in made:
        streams.start(s)
    while streams.active:
        streams.step()
    assert streams.packed is not None and streams.packed._packed
    assert [s.tokens for s in made] == [alone(m, r) for r in reqs]
