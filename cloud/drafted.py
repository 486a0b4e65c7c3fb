"""An exact generation decoded with the edge's drafts after the takeover (issue 13; section 12
of docs/PROTOCOL.md, "Drafting after the takeover").

The cloud worker verifies the takeover's draft in one prefill (its verdict), then decodes in
rounds on `cloud/speculative.Verifier`: each round takes the drafts the drafting edge sent for
positions L, L+1, … (at most γ, `AdaptiveGamma`), verifies them in one forward and emits the
accepted tokens plus its own next token. With no draft at L it decodes one token alone. Drafts
are hints: the output is the cloud model's greedy decode whatever arrives (the Verifier only
accepts a draft where the model itself would produce it).

Waiting for drafts. The edge drafts from the tokens the cloud emitted, so at the start of a
round the drafts for L may still be on their way. The worker waits for γ drafts at most twice
its own measured round time, and only while drafts keep arriving (one came since the previous
round began): a live edge that keeps up is worth that short wait (a round verifying γ drafts
yields up to γ + 1 tokens for one forward), while a dead or stalled edge costs one wait once,
after which the cloud decodes alone at full speed until drafts arrive again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cicada.cloud.speculative import AdaptiveGamma, Verifier
from cicada.common.generation import Generated, GenerationRequest

LOOKAHEAD_GAMMA = 8  # γ's ceiling: the edge drafts at most 2 × this past what stands


class DraftSource(Protocol):
    """What the decode reads from its dispatch's stream (common/worker.py `Stream`)."""

    tokens_heard: int

    def tokens_from(self, position: int, n: int, wait_s: float = 0.0) -> list[int]: ...

    @property
    def cancelled(self) -> bool: ...


@dataclass
class DraftStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them accepted
    alone: int = 0  # rounds without a draft (the edge behind, or gone)
    guard_fired: int = 0

    def timings(self) -> dict[str, float]:
        return {
            "rounds": float(self.rounds),
            "drafted": float(self.drafted),
            "accepted": float(self.accepted),
            "alone": float(self.alone),
            "guard_fired": float(self.guard_fired),
        }


def drafted_generate(
    verifier: Verifier,
    request: GenerationRequest,
    drafts: DraftSource,
    verdict: Callable[[int], None],
    emit: Callable[[int], None],
    deadline: float | None = None,
) -> tuple[Generated, DraftStats]:
    """Verify `request.draft`, report the verdict, then decode with the drafts that arrive.
    The tokens emitted after the verdict are the model's greedy decode from position j."""
    n = request.max_new_tokens
    eos = request.eos_token_id
    gamma = AdaptiveGamma(value=4, lo=1, hi=LOOKAHEAD_GAMMA)
    stats = DraftStats()
    first = verifier.prefill(request.prompt, list(request.draft or ()))
    kept = first.accepted[:n]
    if eos is not None and eos in kept:
        kept = kept[: kept.index(eos) + 1]
    verdict(len(kept))
    out = list(kept)
    if len(out) >= n or (out and out[-1] == eos):
        return Generated([], "length" if len(out) >= n else "eos"), stats
    made: list[int] = []
    pending = [first.next_token]
    step_s: float | None = None
    heard = drafts.tokens_heard
    while True:
        for token in pending:
            out.append(token)
            made.append(token)
            emit(token)
            if token == eos:
                return Generated(made, "eos"), stats
            if len(out) >= n:
                return Generated(made, "length"), stats
        if drafts.cancelled:
            return Generated(made, "cancelled"), stats
        if deadline is not None and time.monotonic() >= deadline:
            return Generated(made, "deadline"), stats
        budget = max(0, min(gamma.value, n - len(out) - 1))
        alive = drafts.tokens_heard != heard
        heard = drafts.tokens_heard
        wait = 2 * step_s if alive and step_s is not None and budget else 0.0
        proposal = drafts.tokens_from(len(out), budget, wait) if budget else []
        # A hint is never trusted: a token outside the vocabulary ends the proposal there.
        ok = [0 <= t < verifier.vocab for t in proposal] + [False]
        proposal = proposal[: ok.index(False)]
        began = time.monotonic()
        result = verifier.verify(proposal) if proposal else verifier.decode_one()
        took = time.monotonic() - began
        step_s = took if step_s is None else 0.8 * step_s + 0.2 * took
        stats.rounds += 1
        stats.drafted += len(proposal)
        stats.accepted += len(result.accepted)
        stats.alone += not proposal
        stats.guard_fired += result.guarded
        gamma.update(0 if result.guarded else len(proposal), len(result.accepted))
        pending = result.tokens
