"""Speculative verification (cloud/speculative.py): whatever the drafts, the tokens are the
cloud model's own greedy decode (`cloud/generate.py`, token by token), bit for bit.

The seeded reference GPT-2 mostly predicts its last input token (its residual stream is
dominated by the tied token embedding), so greedy decodes of it repeat one token and any
draft that copies wins. The tests also use `contextual`: the same model with its blocks'
matrices scaled up, whose greedy decode depends on the context (measured: 20 distinct
tokens out of 24 for some prompts), so agreeing drafts have to be the right ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from cicada.cloud import few_rows
from cicada.cloud.generate import decoder_for
from cicada.cloud.models import bert, gpt2
from cicada.cloud.speculative import (
    DEFAULT_MARGIN,
    TAKEOVER_CHUNKS,
    AdaptiveGamma,
    Draft,
    SpeculativeError,
    Verifier,
    speculative_generate,
)
from cicada.common.generation import GenerationRequest, generate

VOCAB = gpt2.tiny_config()["vocab_size"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny forwards gain nothing from a second thread, and on a busy 2-core machine two
    threads spin-wait on each other: one is several times faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def contextual(scale: float = 6.0, **config: int) -> gpt2.GPT:
    model = gpt2.build(**{**gpt2.tiny_config(), **config})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".h." in name and p.dim() == 2:
                p.mul_(scale)
    return model


MODELS = {
    "plain": lambda: gpt2.build(**gpt2.tiny_config()),
    "contextual": contextual,
    "contextual-4-layers": lambda: contextual(4.0, n_layer=4, seed=3),
}


def reference(model: gpt2.GPT, prompt: np.ndarray, n: int, eos: int | None = None) -> list[int]:
    return generate(decoder_for(model), GenerationRequest(prompt, n, eos), lambda t: None).tokens


def prompts(seed: int, count: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, VOCAB, size=int(rng.integers(1, 24)), dtype=np.int64),
         int(rng.integers(1, 36)))
        for _ in range(count)
    ]  # fmt: skip


def drafter(kind: str, ref: list[int], prompt_len: int, other: list[int], seed: int) -> Draft:
    """A draft function of one kind, given the reference tokens it may (mis)quote."""
    rng = np.random.default_rng(seed)

    def draft(seq: list[int], gamma: int) -> list[int]:
        k = len(seq) - prompt_len  # tokens generated so far
        right = ref[k : k + gamma]
        if kind == "right":
            return right
        if kind == "wrong":
            return [(t + 1) % VOCAB for t in right]
        if kind == "right-then-wrong":
            cut = gamma // 2
            return right[:cut] + [(t + 1) % VOCAB for t in right[cut:]]
        if kind == "empty":
            return []
        if kind == "too-long":  # past γ and past the budget: must be trimmed, not trusted
            return right + [int(t) for t in rng.integers(0, VOCAB, size=gamma + 5)]
        if kind == "other-prompt":
            return other[k : k + gamma]
        if kind == "random":
            return [int(t) for t in rng.integers(0, VOCAB, size=gamma)]
        raise AssertionError(kind)

    return draft


KINDS = ["right", "wrong", "right-then-wrong", "empty", "too-long", "other-prompt", "random"]


def use(mode: str) -> None:
    """Rows mode needs MIN_THREADS torch threads (cloud/few_rows.py); the references of a test
    are computed after this, in the same mode (the autouse fixture restores the count)."""
    torch.set_num_threads(few_rows.MIN_THREADS if mode == "rows" else 1)


def verifier_in(mode: str, model: gpt2.GPT, **kwargs: float) -> Verifier:
    """A Verifier whose verify forwards compute each row as the one-token step does
    ("rows", where this machine's oneDNN allows it), or over all rows at once with the margin
    guard replaying near-ties ("guarded", the path for CUDA, for builds without oneDNN and for
    one thread)."""
    verifier = Verifier(model, **kwargs)
    if mode == "rows" and not verifier.rows_exact:
        pytest.skip("oneDNN's row-invariant matmul is not available here")
    verifier.rows_exact = mode == "rows"
    return verifier


MODES = ["rows", "guarded"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_any_draft_gives_the_reference_greedy_decode(name: str, mode: str) -> None:
    use(mode)
    model = MODELS[name]()
    cases = prompts(7, 6)
    refs = [reference(model, p, n) for p, n in cases]
    fired = accepted = 0
    for i, ((prompt, n), ref) in enumerate(zip(cases, refs, strict=True)):
        other = refs[(i + 1) % len(refs)]
        for kind in KINDS:
            verifier = verifier_in(mode, model)
            draft = drafter(kind, ref, len(prompt), other, seed=i)
            got = speculative_generate(verifier, prompt, n, draft, AdaptiveGamma(3))
            assert got.tokens == ref, f"{name} prompt {i} drafts {kind}"
            assert got.stopped == "length"
            assert verifier.generated[: len(ref)] == ref
            fired += got.stats.guard_fired
            accepted += got.stats.accepted
            if kind in ("right", "too-long") and n > 8:  # far fewer forwards than tokens
                assert got.stats.forwards <= n // 2, (kind, got.stats)
            if kind == "wrong":
                assert got.stats.accepted == 0
    assert accepted > 0


def test_eos_stops_after_it_like_the_reference() -> None:
    model = contextual()
    prompt = np.arange(5, dtype=np.int64)
    ref = reference(model, prompt, 30)
    eos = ref[9]
    ref_eos = reference(model, prompt, 30, eos)
    assert ref_eos[-1] == eos and len(ref_eos) <= 10
    got = speculative_generate(
        Verifier(model), prompt, 30, drafter("right", ref, 5, ref, 0), eos_token_id=eos
    )
    assert got.tokens == ref_eos and got.stopped == "eos"


def test_a_multi_token_forward_is_within_rounding_of_the_one_token_path() -> None:
    """The margin guard's premise: the logits a verify forward computes differ from the
    reference's by far less than DEFAULT_MARGIN (measured: ~1e-6)."""
    model = contextual()
    prompt = np.arange(3, 14, dtype=np.int64)
    ref = reference(model, prompt, 16)
    decoder = decoder_for(model)
    decoder.start(prompt)
    one_token = []
    cache = decoder._cache  # type: ignore[attr-defined]
    for pos, token in enumerate([int(prompt[-1]), *ref[:8]], start=len(prompt) - 1):
        if pos == len(prompt) - 1:  # the prefill already fed it: recompute its row
            fresh = model.new_cache()
            with torch.inference_mode():
                row = model.decode(torch.from_numpy(prompt)[None], fresh, 0)[0, -1]
        else:
            with torch.inference_mode():
                row = model.decode(torch.tensor([[token]]), cache, pos)[0, -1]
        one_token.append(row)
    verifier = Verifier(model)
    verifier.prefill(prompt)
    verifier._keep(len(prompt) - 1, [])  # feed the last prompt token again
    with torch.inference_mode():
        feed = torch.tensor([[int(prompt[-1]), *ref[:8]]])
        many = verifier._forward(feed, len(prompt) - 1, rows=False)
    diff = float((many - torch.stack(one_token)).abs().max())
    assert diff < DEFAULT_MARGIN / 20, diff


@pytest.mark.parametrize("width", [1, 2, 5, 9])
def test_a_rows_forward_is_the_one_token_path_bit_for_bit(width: int) -> None:
    """The rows path's premise (cloud/few_rows.py): every row of a verify forward — logits,
    keys and values — equals what the reference's one-token step computes at its position,
    exactly, for any width; so rows mode needs no replay."""
    use("rows")
    model = contextual()
    verifier = verifier_in("rows", model)
    prompt = np.arange(3, 14, dtype=np.int64)
    ref = reference(model, prompt, 12)
    cache = model.new_cache()
    with torch.inference_mode():
        model.decode(torch.from_numpy(prompt)[None], cache, 0)
        steps = [
            model.decode(torch.tensor([[token]]), cache, len(prompt) + i)[0, -1]
            for i, token in enumerate(ref[:width])
        ]
    verifier.prefill(prompt)
    with torch.inference_mode():
        rows = verifier._forward(torch.tensor([ref[:width]]), len(prompt), rows=True)
    for r in range(width):
        assert torch.equal(rows[r], steps[r]), r
    for mine, theirs in zip(verifier.cache, cache, strict=True):
        assert mine.k is not None and theirs.k is not None
        assert torch.equal(mine.k, theirs.k) and torch.equal(mine.v, theirs.v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wrong_at", [None, 0, 3, 7, 8, 9, 20, 47])
def test_a_long_takeover_draft_is_verified_up_to_its_first_rejection(
    mode: str, wrong_at: int | None
) -> None:
    """A takeover's draft (every provisional token of the cold start) is verified chunk after
    chunk (TAKEOVER_CHUNKS) while it stands: the verdict is the one a single forward over all
    of it gives, and the drafts past the first rejection are never computed."""
    use(mode)
    model = contextual(4.0, n_layer=4, seed=3)
    prompt = np.arange(5, 10, dtype=np.int64)
    ref = reference(model, prompt, 56)
    draft = list(ref[:48])
    if wrong_at is not None:
        draft[wrong_at] = (draft[wrong_at] + 1) % VOCAB
    verifier = verifier_in(mode, model)
    verdict = verifier.prefill(prompt, draft)
    stood = 48 if wrong_at is None else wrong_at
    assert verdict.accepted == ref[:stood] and verdict.next_token == ref[stood]
    assert verifier.tokens == [*prompt.tolist(), *ref[: stood + 1]]
    if wrong_at is not None:  # nothing past the chunk that held the rejection was computed
        assert verifier.stats.drafted <= wrong_at + max(TAKEOVER_CHUNKS)
        if wrong_at < TAKEOVER_CHUNKS[0]:
            assert verifier.stats.drafted == TAKEOVER_CHUNKS[0]
    rest = [verifier.decode_one().next_token for _ in range(56 - stood - 1)]
    assert rest == ref[stood + 1 :]


def test_the_cache_after_a_rejection_is_a_fresh_prefills() -> None:
    model = contextual()
    prompt = np.arange(20, 31, dtype=np.int64)
    ref = reference(model, prompt, 12)
    verifier = Verifier(model)
    first = verifier.prefill(prompt, ref[:2])
    assert first.accepted == ref[:2] and first.next_token == ref[2]
    wrong = [ref[3], ref[4], (ref[5] + 1) % VOCAB, ref[6]]  # two right, then wrong
    verdict = verifier.verify(wrong)
    assert verdict.accepted == ref[3:5] and verdict.next_token == ref[5]
    assert verifier.tokens == [*prompt.tolist(), *ref[:6]]
    fresh = model.new_cache()
    with torch.inference_mode():
        model.decode(torch.tensor([verifier.tokens[:-1]]), fresh, 0)
    for mine, theirs in zip(verifier.cache, fresh, strict=True):
        assert mine.k is not None and theirs.k is not None
        assert mine.k.shape == theirs.k.shape == (1, 2, len(verifier.tokens) - 1, 32)
        torch.testing.assert_close(mine.k, theirs.k, rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.v, theirs.v, rtol=0, atol=1e-5)
    # And decoding on from it still gives the reference.
    rest = [verifier.decode_one().next_token for _ in range(6)]
    assert rest == ref[6:12]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("margin", [0.02, 0.1, 1e9])
def test_the_margin_guard_produces_near_ties_by_the_reference_path(
    margin: float, mode: str
) -> None:
    """A wide margin makes the guard fire often (1e9: at every position): each such token
    comes from the one-token path, after the positions a multi-token forward cached are
    replayed that way (guarded mode; in rows mode the cache is already the reference's and
    nothing is replayed), and the output is still the reference's. (This tiny model's top-2
    margins are small: 0.02 fires at ~1 position in 5.)"""
    use(mode)
    model = contextual()
    fired = replayed = 0
    for i, (prompt, n) in enumerate(prompts(11, 6)):
        ref = reference(model, prompt, n)
        verifier = verifier_in(mode, model, margin=margin)
        got = speculative_generate(verifier, prompt, n, drafter("right", ref, len(prompt), ref, i))
        assert got.tokens == ref, f"prompt {i}"
        fired += got.stats.guard_fired
        replayed += got.stats.replayed_positions
        if margin == 1e9:
            assert got.stats.accepted == 0  # every first row is a "tie": nothing to replay
    assert fired > 0
    assert (replayed > 0) == (margin < 1 and mode == "guarded")


def test_gamma_grows_with_acceptance_and_shrinks_on_rejection() -> None:
    gamma = AdaptiveGamma(4, lo=1, hi=8)
    assert gamma.update(4, 4) == 6
    assert gamma.update(6, 6) == 8
    assert gamma.update(8, 8) == 8  # bounded above
    assert gamma.update(8, 3) == 7
    for _ in range(10):
        gamma.update(2, 0)
    assert gamma.value == 1  # bounded below
    assert gamma.update(0, 0) == 1  # a round without drafts says nothing
    assert gamma.history[:4] == [6, 8, 8, 7]
    with pytest.raises(ValueError):
        AdaptiveGamma(9, lo=1, hi=8)


def test_gamma_adapts_in_a_generation() -> None:
    model = contextual()
    prompt = np.arange(4, dtype=np.int64)
    ref = reference(model, prompt, 40)
    right = speculative_generate(Verifier(model), prompt, 40, drafter("right", ref, 4, ref, 0))
    wrong = speculative_generate(Verifier(model), prompt, 40, drafter("wrong", ref, 4, ref, 0))
    assert max(right.gammas) == 8 and min(wrong.gammas) == 1


def test_hostile_drafts_and_misuse_are_refused() -> None:
    model = contextual()
    verifier = Verifier(model)
    with pytest.raises(SpeculativeError, match="prefill"):
        verifier.verify([1])
    with pytest.raises(SpeculativeError, match="empty"):
        verifier.prefill([])
    verifier.prefill([1, 2, 3])
    for bad in ([VOCAB], [-1], [1.5], [[1, 2]], ["a"]):
        with pytest.raises(SpeculativeError, match="token ids"):
            verifier.verify(bad)  # type: ignore[arg-type]
    context = gpt2.tiny_config()["block_size"]
    with pytest.raises(SpeculativeError, match="context"):
        verifier.verify([1] * context)
    assert verifier.tokens[:3] == [1, 2, 3]  # nothing changed by the refusals
    with pytest.raises(SpeculativeError, match="reference GPT-2"):
        Verifier(bert.build(**bert.tiny_config()))
