"""An exact generation decoded with the edge's drafts after the takeover (issue 13; section 12
of docs/PROTOCOL.md, "Drafting after the takeover").

The cloud worker verifies the takeover's draft in one prefill (its verdict), then decodes in
rounds on `cloud/speculative.Verifier`: each round takes the drafts the drafting edge sent for
positions L, L+1, … (at most γ, `AdaptiveGamma`), verifies them in one forward and emits the
accepted tokens plus its own next token. With no draft at L it decodes one token alone. Drafts
are hints: the output is the cloud model's greedy decode whatever arrives (the Verifier only
accepts a draft where the model itself would produce it).

Hardly waiting for drafts. The edge drafts from the tokens the cloud emitted, so after a round
that rejected a draft, the drafts for the next positions are still being made. A round takes
the drafts that are there (at most γ); with none, it waits at most REDRAFT_WAIT of a one-token
step for the first one, then decodes one token alone. Waiting up to twice a round for γ drafts
made the cloud idle behind an edge that had to redraft after every rejection; never waiting
made ~40 % of the rounds one token alone (BENCHMARKS.md, "Edge drafts after the takeover"),
where an edge that redrafts within half a step turns the round into a verify forward (~1.05 ×
a step for 2 rows) that yields ~1.8 tokens. A wait that times out is not repeated until a
round finds drafts without waiting: a dead or stalled edge costs one wait, a slow one costs
one per rejection at most.

Stale drafts. A draft for position p > L was made after the edge's own token at L; when the
cloud's token at L is another one, every draft past L is dead, and the ones already offered
are forgotten (`forget_from`) so that the next round does not verify them in vain. Drafts that
were on their way are overwritten as the edge redrafts those positions (newest wins).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cicada.cloud.speculative import AdaptiveGamma, Verifier
from cicada.common.generation import Generated, GenerationRequest

LOOKAHEAD_GAMMA = 8  # γ's ceiling: the edge drafts at most 2 × this past what stands
REDRAFT_WAIT = 0.5  # the longest wait for a first draft, as a fraction of a one-token step


class DraftSource(Protocol):
    """What the decode reads from its dispatch's stream (common/worker.py `Stream`)."""

    tokens_heard: int

    def tokens_from(self, position: int, n: int, wait_s: float = 0.0) -> list[int]: ...

    def forget_from(self, position: int) -> None: ...

    @property
    def cancelled(self) -> bool: ...


@dataclass
class RedraftWait:
    """How long a round without drafts waits for the edge's first one: REDRAFT_WAIT of the
    last one-token step, not before one was timed, and not after a wait that timed out until
    drafts come without waiting."""

    step_s: float | None = None
    edge_keeping_up: bool = True

    def limit(self) -> float:
        if self.step_s is None or not self.edge_keeping_up:
            return 0.0
        return REDRAFT_WAIT * self.step_s


@dataclass
class DraftStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them accepted
    alone: int = 0  # rounds without a draft (the edge behind, or gone)
    guard_fired: int = 0
    waited: int = 0  # rounds that waited for the edge's first draft and got it
    replayed: int = 0  # one-token forwards the margin guard's replays cost
    rows_exact: bool = False  # verify forwards computed each row as the one-token step

    def timings(self) -> dict[str, float]:
        return {
            "rounds": float(self.rounds),
            "drafted": float(self.drafted),
            "accepted": float(self.accepted),
            "alone": float(self.alone),
            "guard_fired": float(self.guard_fired),
            "waited": float(self.waited),
            "replayed": float(self.replayed),
            "rows_exact": float(self.rows_exact),
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
    redraft = RedraftWait()
    stats = DraftStats(rows_exact=verifier.rows_exact)
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
    proposal: list[int] = list(request.draft or ())
    accepted = len(first.accepted)
    while True:
        # The drafts past the cloud's newest token were made after the edge's own token at its
        # position: dead unless the two agree (a bonus token the edge had drafted too).
        here = len(out) + len(pending) - 1  # the position of pending[-1]
        if accepted < len(proposal) or drafts.tokens_from(here, 1) != pending[-1:]:
            drafts.forget_from(here)
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
        proposal = drafts.tokens_from(len(out), budget) if budget else []
        if proposal:
            redraft.edge_keeping_up = True
        elif budget and redraft.limit() > 0:
            if drafts.tokens_from(len(out), 1, wait_s=redraft.limit()):
                proposal = drafts.tokens_from(len(out), budget)
                stats.waited += 1
            else:
                redraft.edge_keeping_up = False
        # A hint is never trusted: a token outside the vocabulary ends the proposal there.
        ok = [0 <= t < verifier.vocab for t in proposal] + [False]
        proposal = proposal[: ok.index(False)]
        started = time.monotonic()
        result = verifier.verify(proposal) if proposal else verifier.decode_one()
        if not proposal:
            redraft.step_s = time.monotonic() - started
        accepted = len(result.accepted)
        stats.rounds += 1
        stats.drafted += len(proposal)
        stats.accepted += accepted
        stats.alone += not proposal
        stats.guard_fired += result.guarded
        stats.replayed = verifier.stats.replayed_positions
        gamma.update(0 if result.guarded else len(proposal), accepted)
        pending = result.tokens
