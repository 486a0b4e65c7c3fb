"""The cloud's rounds with the edge's drafts (cloud/drafted.py): whatever the drafts — right,
wrong, out of the vocabulary, for positions already past, or none at all — the verdict and the
tokens after it are the cloud model's own greedy decode, bit for bit, and the counts say what
was accepted.

The drafts come through a `Drafts` box with the `Stream` surface the cloud worker reads
(`tokens_from`, `tokens_heard`, `cancelled`), filled before each round by a rule of the test's
choosing: the rounds' logic is what is tested, against the reference decode of the same
weights (`tests/generation_assets.sharp_gpt2`: a model whose greedy decode depends on context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from cicada.cloud.drafted import drafted_generate
from cicada.cloud.generate import CachedGPTDecoder
from cicada.cloud.speculative import Verifier
from cicada.common.generation import GenerationRequest, generate
from tests.generation_assets import SHARP_CONFIG, sharp_gpt2

MODEL = sharp_gpt2()
VOCAB = SHARP_CONFIG["vocab_size"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(prompt: np.ndarray, n: int, eos: int | None = None) -> list[int]:
    decoder = CachedGPTDecoder(MODEL.decode, MODEL, "cpu", MODEL.decode)
    return generate(decoder, GenerationRequest(prompt, n, eos), lambda t: None).tokens


class Drafts:
    """What the cloud worker's Stream offers the rounds: drafts by position. `rule(position,
    n)` says what the 'edge' has sent for the next `n` positions when a round asks."""

    def __init__(self, rule: Callable[[int, int], dict[int, int]]) -> None:
        self.rule = rule
        self.tokens_heard = 0
        self.cancelled = False
        self.asked: list[int] = []
        self.forgotten: list[int] = []

    def tokens_from(self, position: int, n: int, wait_s: float = 0.0) -> list[int]:
        self.asked.append(position)
        offered = self.rule(position, n)
        self.tokens_heard += 1
        out: list[int] = []
        while len(out) < n and position + len(out) in offered:
            out.append(offered[position + len(out)])
        return out

    def forget_from(self, position: int) -> None:
        self.forgotten.append(position)


def run(prompt: np.ndarray, n: int, draft: list[int], drafts: Drafts,
        eos: int | None = None) -> tuple[int, list[int], object]:  # fmt: skip
    verdicts: list[int] = []
    emitted: list[int] = []
    request = GenerationRequest(prompt, n, eos, tuple(draft))
    out, stats = drafted_generate(Verifier(MODEL), request, drafts, verdicts.append,
                                  emitted.append)  # fmt: skip
    assert len(verdicts) == 1 and out.tokens == emitted
    return verdicts[0], emitted, stats


PROMPT = np.asarray([3, 14, 15, 92, 6, 53], dtype=np.int64)


def test_right_drafts_are_accepted_and_the_output_is_the_reference() -> None:
    n = 60
    expected = reference(PROMPT, n)
    drafts = Drafts(lambda p, k: {i: expected[i] for i in range(p, min(n, p + k))})
    j, emitted, stats = run(PROMPT, n, expected[:5], drafts)
    assert j == 5 and expected[:j] + emitted == expected
    assert stats.accepted > 0 and stats.accepted <= stats.drafted  # type: ignore[attr-defined]
    assert stats.rounds < n - j - 1, "rounds yield several tokens"  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["wrong", "out_of_vocab", "none", "half", "stale"])
def test_any_drafts_give_the_reference(kind: str) -> None:
    n = 48
    expected = reference(PROMPT, n)
    rng = np.random.default_rng(4)

    def rule(p: int, k: int) -> dict[int, int]:
        if kind == "wrong":
            return {i: (expected[i] + 1) % VOCAB for i in range(p, p + k)}
        if kind == "out_of_vocab":
            return {p: expected[p], p + 1: VOCAB + 5, p + 2: expected[min(p + 2, n - 1)]}
        if kind == "none":
            return {}
        if kind == "half":  # right, then random
            return {i: expected[i] if i < p + k // 2 else int(rng.integers(VOCAB))
                    for i in range(p, min(n, p + k))}  # fmt: skip
        return {i: expected[i] for i in range(max(0, p - 4), p)}  # only positions past

    drafts = Drafts(rule)
    j, emitted, stats = run(PROMPT, n, [(t + 1) % VOCAB for t in expected[:3]], drafts)
    assert j == 0, "a wrong takeover draft keeps nothing"
    assert emitted == expected, "bit for bit the cloud model's greedy decode"
    assert stats.accepted <= stats.drafted  # type: ignore[attr-defined]
    if kind in ("wrong", "none", "stale"):
        assert stats.accepted == 0  # type: ignore[attr-defined]
    if kind == "none" or kind == "stale":
        assert stats.drafted == 0 and stats.alone == stats.rounds  # type: ignore[attr-defined]
    if kind == "wrong":  # every round's token disagrees with the draft at its position
        assert len(drafts.forgotten) == stats.rounds + 1  # type: ignore[attr-defined]
    assert drafts.asked == sorted(drafts.asked), "rounds move forward"


def test_drafts_past_a_rejection_are_forgotten_and_right_ones_kept() -> None:
    """Drafts made after the edge's own token at a position the cloud decided otherwise are
    dead: the rounds forget them (cloud/drafted.py), and only there."""
    n = 40
    expected = reference(PROMPT, n)
    wrong_at = {8, 20}  # positions whose draft is wrong; the rest are right

    def rule(p: int, k: int) -> dict[int, int]:
        return {i: (expected[i] + 1) % VOCAB if i in wrong_at else expected[i]
                for i in range(p, min(n, p + k))}  # fmt: skip

    drafts = Drafts(rule)
    j, emitted, stats = run(PROMPT, n, expected[:3], drafts)
    assert expected[:j] + emitted == expected
    assert set(drafts.forgotten) == wrong_at, drafts.forgotten
    assert stats.accepted > 0  # type: ignore[attr-defined]


def test_the_budget_and_eos_end_it_like_the_reference() -> None:
    expected = reference(PROMPT, 30)
    eos = expected[12]
    first = expected.index(eos)
    want = reference(PROMPT, 30, eos)
    assert want == expected[: first + 1]
    drafts = Drafts(lambda p, k: {i: expected[i] for i in range(p, min(30, p + k))})
    j, emitted, _ = run(PROMPT, 30, expected[:3], drafts, eos=eos)
    assert expected[:j] + emitted == want
    # A takeover draft that already holds the whole budget: the verdict, nothing after.
    j, emitted, _ = run(PROMPT, 4, expected[:4], Drafts(lambda p, k: {}))
    assert (j, emitted) == (4, [])


class RedraftingEdge(Drafts):
    """Right drafts for a position come only once the cloud has waited for them (an edge that
    redrafts after each of the cloud's tokens: `answers`), or never (a dead edge)."""

    def __init__(self, expected: list[int], answers: bool) -> None:
        super().__init__(lambda p, k: {})
        self.expected, self.answers = expected, answers
        self.arrived: set[int] = set()
        self.waits: list[float] = []

    def tokens_from(self, position: int, n: int, wait_s: float = 0.0) -> list[int]:
        if wait_s > 0:
            self.waits.append(wait_s)
            if self.answers:
                self.arrived.add(position)
        self.rule = lambda p, k: (
            {i: self.expected[i] for i in range(p, min(len(self.expected), p + k))}
            if p in self.arrived else {}
        )  # fmt: skip
        return super().tokens_from(position, n)


@pytest.mark.parametrize("answers", [True, False])
def test_a_round_without_drafts_waits_briefly_for_the_edges_redraft_and_only_while_it_comes(
    answers: bool,
) -> None:
    """With no draft at L, a round waits at most REDRAFT_WAIT of a one-token step for the
    first (cloud/drafted.py): drafts that come in that time are verified; a wait that gets
    nothing is not repeated while none comes, so a dead edge costs one wait."""
    from cicada.cloud.drafted import REDRAFT_WAIT

    n = 40
    expected = reference(PROMPT, n)
    edge = RedraftingEdge(expected, answers)
    j, emitted, stats = run(PROMPT, n, expected[:3], edge)
    assert expected[:j] + emitted == expected, "bit for bit the cloud model's greedy decode"
    assert edge.waits and all(0 < w < 60 * REDRAFT_WAIT for w in edge.waits)
    if answers:
        assert stats.waited == len(edge.waits) > 1  # type: ignore[attr-defined]
        assert stats.alone == 1 and stats.accepted > 0  # type: ignore[attr-defined]
    else:
        assert len(edge.waits) == 1 and stats.waited == 0  # type: ignore[attr-defined]
        assert stats.alone == stats.rounds and stats.drafted == 0  # type: ignore[attr-defined]

