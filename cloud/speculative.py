"""Greedy speculative verification on the cloud model, with its KV cache (issue 13).

An edge agent drafts γ tokens with its small model; the cloud model checks them all in ONE
forward over [last token, d0 … dγ-1] with its cache, accepts the longest prefix where its own
greedy choice equals the draft, and adds its own next token (the "bonus": the token after the
accepted prefix, which the same forward already computed). Every round therefore yields
between 1 and γ+1 tokens for one cloud forward, and the output is the cloud model's own
greedy decode: a draft can only be accepted where the cloud model would have produced it.

Bit-identity. The reference is the cloud worker's greedy decode (`cloud/generate.py`
`CachedGPTDecoder`: the prompt in one forward, then one token per forward). Two modes:

* rows (`rows_exact`; CPU, oneDNN, 2+ torch threads): the reference's one-token step and the
  verify forward (`_forward` over rows) compute every linear with `cloud/few_rows.row_linear`, which
  gives each row the same bits whatever the number of rows, and attention one query row at a
  time with the step's own call; so a verify forward's logits, keys and values are the
  reference's bit for bit (tests/cloud/test_speculative.py), the cache stays exact, and a
  near-tie costs one step, never a replay.
* guarded (CUDA, no oneDNN, one thread): a forward over several new tokens runs the linears on
  more rows and BLAS sums in another order, so its logits differ from the one-token path's in
  the last bits (~1e-6 on the tiny model; 2.3e-6 on GPT-2-medium-like, BENCHMARKS.md) and so do
  the keys and values it caches. A token can only flip where its top two logits are that close.

In both, the margin guard stops accepting at any position whose top-2 logit margin is below
`margin` × max(1, |top logit|) (default `common.generation.NEAR_TIE`, 1e-4: the rule the
takeover's verify prefill and continuous batching apply, ~40 × the measured error) and
produces that one token by the reference's own path: in guarded mode the cache is first
rebuilt as the reference would have built it (the prompt alone, then one token per forward,
from the first position a multi-token forward made; `model.decode`, the very code the reference
runs), so the token at a near-tie is the reference's bit for bit. `guard_fired` counts how
often, `replayed_positions` what the rebuilds cost: on the seeded GPT-2-medium-like model two
near-ties in 128 tokens replayed 117 positions in guarded mode, more than the drafts saved, and
none in rows mode (BENCHMARKS.md). A step without a draft (`decode_one`) is the reference's
one-token step itself.

The cache is Cicada's `LayerCache` list (what `GPT.decode` reads and writes), rolled back
after each round by slicing to what stands: the positions of the tokens accepted so far.
The multi-token forward below is `GPT.step`'s per-block arithmetic written over that cache
(no stacking of the whole cache each round); `cloud/continuous.py` is left as it is.

Only Cicada's reference GPT-2 is understood. A transformers causal LM is refused
(`SpeculativeError`): rolling its `past_key_values` back depends on the transformers version's
cache classes, which this module does not take on.

γ adapts to the acceptance (`AdaptiveGamma`): +2 after a round whose drafts were all
accepted, −1 after a rejection, within [lo, hi] (default 1..8), the schedule transformers uses
for its assisted generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cicada.cloud.few_rows import PROBE_ROWS, probe, row_linear
from cicada.common.errors import GenerationError
from cicada.common.generation import NEAR_TIE

DEFAULT_MARGIN = NEAR_TIE
# A takeover's draft is verified this many tokens at a time (then the last size on): in rows
# mode every chunk is a forward of at most few_rows.PROBE_ROWS rows, the widths `probe` checks.
TAKEOVER_CHUNKS = (8, PROBE_ROWS - 1)


def _module(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, layer(x))


class SpeculativeError(GenerationError):
    """A model or draft that speculative verification cannot take."""


@dataclass
class Verdict:
    """One round: the drafts accepted, the cloud's own next token, and whether the margin
    guard produced it through the reference path."""

    accepted: list[int]
    next_token: int
    guarded: bool = False

    @property
    def tokens(self) -> list[int]:
        return [*self.accepted, self.next_token]


@dataclass
class VerifierStats:
    rounds: int = 0
    forwards: int = 0  # multi-token and one-token forwards, replays excluded
    drafted: int = 0
    accepted: int = 0
    guard_fired: int = 0
    replayed_positions: int = 0  # one-token forwards the guard's replays cost
    min_margin: float = float("inf")  # the smallest top-2 margin of an accepted/next token


class Verifier:
    """One sequence's cache on the cloud model, verified against drafts round by round.

    `prefill(prompt, draft)` starts it; then `verify(drafts)` or `decode_one()` once per
    round. `tokens` is the sequence so far (prompt, then every token produced); its last token
    is not in the cache yet (the next round's forward feeds it)."""

    def __init__(self, model: nn.Module, device: str = "cpu", margin: float = DEFAULT_MARGIN):
        from cicada.cloud.models.gpt2 import GPT

        if not isinstance(model, GPT):
            raise SpeculativeError(
                f"speculative verification needs Cicada's reference GPT-2 "
                f"(cicada.cloud.models.gpt2), not {type(model).__name__}: a transformers "
                "model's cache cannot be rolled back here; generate with it token by token"
            )
        self.model: Any = model
        self.device = device
        self.margin = margin
        self.vocab = int(model.config.vocab_size)
        self.context = int(model.config.block_size)
        self.cache: list[Any] = []
        self.tokens: list[int] = []
        self.prompt_len = 0
        self.exact = 0  # leading cache positions whose keys/values are the reference's
        self.stats = VerifierStats()
        # Whether a forward over several rows can compute each as the one-token step does
        # (cloud/few_rows.py, probed on this model's weight shapes): then the cache stays
        # exact and a near-tie costs no replay.
        blocks: list[Any] = list(cast(Any, self.model.transformer)["h"])
        shapes = [blocks[0].attn.c_attn, blocks[0].attn.c_proj, blocks[0].mlp.c_fc,
                  blocks[0].mlp.c_proj, self.model.lm_head] if blocks else []  # fmt: skip
        self.rows_exact = bool(shapes) and probe(shapes)

    # -- rounds -----------------------------------------------------------------------------

    def prefill(self, prompt: Sequence[int] | np.ndarray, draft: Sequence[int] = ()) -> Verdict:
        """The prompt, then `draft` verified in chunks (`TAKEOVER_CHUNKS`) up to its first
        token the cloud decides otherwise: the longest agreeing prefix of `draft` and the
        cloud's next token; the cache keeps the prompt and the accepted drafts."""
        ids = self._checked(prompt, "the prompt", allow_empty=False)
        drafts = self._checked(draft, "the draft")
        self._fits(len(ids) + len(drafts))
        self.cache = self.model.new_cache()
        self.tokens, self.prompt_len, self.exact = list(ids), len(ids), 0
        self.stats = VerifierStats()
        if not drafts:  # the reference's own prefill: exact
            return Verdict([], self._reference_next())
        chunk = drafts[: TAKEOVER_CHUNKS[0]]
        if self.rows_exact:  # the reference's prefill, then the drafts' rows as its steps
            feed = torch.tensor([self.tokens], dtype=torch.int64, device=self.device)
            with torch.inference_mode():
                head = self.model.decode(feed, self.cache, 0)[0, -1:]
            self.exact = self.prompt_len
            first = self._round(chunk, self.prompt_len, chunk, head)
        else:
            first = self._round(self.tokens + chunk, 0, chunk)
        return self._verify_on(first, drafts)

    def _verify_on(self, verdict: Verdict, drafts: list[int]) -> Verdict:
        """The rest of a long draft after `verdict` on its first chunk: while the cloud's own
        next token is the draft's, the next chunk. A takeover's draft is every provisional
        token the edge streamed during the cold start (154 in a benchmark run), of which the
        first few usually stand (13 there): one forward over all of them cost 2–3× one over
        the first eight, for nothing past the first rejection."""
        accepted = list(verdict.accepted)
        size = 1
        while len(accepted) < len(drafts) and verdict.next_token == drafts[len(accepted)]:
            accepted.append(verdict.next_token)  # (already in self.tokens)
            chunk = drafts[len(accepted) : len(accepted) + TAKEOVER_CHUNKS[size]]
            size = min(size + 1, len(TAKEOVER_CHUNKS) - 1)
            verdict = self.verify(chunk) if chunk else self.decode_one()
            accepted += verdict.accepted
        return Verdict(accepted, verdict.next_token, verdict.guarded)

    def verify(self, drafts: Sequence[int]) -> Verdict:
        """One forward over [last token, d0 … dγ-1] with the cache: the longest prefix of
        `drafts` the cloud agrees with, plus its own next token; the cache rolls back to what
        stands."""
        self._started()
        drafts = self._checked(drafts, "the draft")
        self._fits(len(self.tokens) + len(drafts))
        if not drafts:
            return self.decode_one()
        start = len(self.tokens) - 1
        return self._round([self.tokens[-1], *drafts], start, drafts)

    def decode_one(self) -> Verdict:
        """No draft: one token by the reference's own one-token step."""
        self._started()
        self._fits(len(self.tokens))
        return Verdict([], self._reference_next())

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    # -- inside ---------------------------------------------------------------------------

    def _round(
        self, feed: list[int], start: int, drafts: list[int], head: torch.Tensor | None = None
    ) -> Verdict:
        """Forward `feed` at positions start…, compare rows with `drafts`, keep what stands.
        `head`: the logits row of position start - 1, already computed (the prefill's)."""
        ids = torch.tensor([feed], dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            logits = self._forward(ids, start, self.rows_exact)  # (T, V)
            if self.rows_exact and self.exact >= start:  # each row as the reference's step
                self.exact = start + len(feed)
        if head is not None:
            logits, start = torch.cat([head, logits]), start - 1
            feed = [-1, *feed]  # the row before (its token is already in the cache)
        self.stats.forwards += 1
        self.stats.rounds += 1
        self.stats.drafted += len(drafts)
        # Row r predicts the token after feed[r]; the drafts begin after the last fed token
        # that was already known (the last prompt token, or the previous round's next token).
        first = len(feed) - len(drafts) - 1
        top = torch.topk(logits[first:], 2, dim=-1)
        choice = top.indices[:, 0].tolist()
        margins = (top.values[:, 0] - top.values[:, 1]).tolist()
        ties = (self.margin * top.values[:, 0].abs().clamp(min=1.0)).tolist()
        accepted: list[int] = []
        for i, (token, gap, tie) in enumerate(zip(choice, margins, ties, strict=True)):
            if gap < tie:  # a near-tie: the reference path decides this token
                self._keep(start + first + 1 + i, accepted)
                self.stats.guard_fired += 1
                return Verdict(accepted, self._reference_next(replay=True), guarded=True)
            self.stats.min_margin = min(self.stats.min_margin, gap)
            if i < len(drafts) and token == drafts[i]:
                accepted.append(token)
                continue
            self._keep(start + first + 1 + i, accepted)
            self.tokens.append(int(token))
            return Verdict(accepted, int(token))
        raise AssertionError("unreachable: the last row has no draft to agree with")

    def _keep(self, length: int, accepted: list[int]) -> None:
        """Roll the cache back to `length` positions and take the accepted drafts."""
        for layer in self.cache:
            layer.k, layer.v = layer.k[:, :, :length], layer.v[:, :, :length]
        self.exact = min(self.exact, length)
        self.tokens.extend(accepted)
        self.stats.accepted += len(accepted)

    def _reference_next(self, replay: bool = False) -> int:
        """The next token exactly as the reference decoder computes it: `model.decode` over
        the prompt alone, then one token per forward. With `replay`, the positions a
        multi-token forward cached are first recomputed that way."""
        if len(self.tokens) == self.prompt_len:  # the prompt's own prefill
            self.cache = self.model.new_cache()
            feed, start = self.tokens, 0
        else:
            if replay:
                self._replay()
            feed, start = [self.tokens[-1]], len(self.tokens) - 1
        ids = torch.tensor([feed], dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            logits = self.model.decode(ids, self.cache, start)
        if not replay:
            self.stats.forwards += 1
        if self.exact == start:
            self.exact = start + len(feed)
        top = torch.topk(logits[0, -1], 2)
        self.stats.min_margin = min(self.stats.min_margin, float(top.values[0] - top.values[1]))
        token = int(top.indices[0])
        self.tokens.append(token)
        return token

    def _replay(self) -> None:
        """Rebuild the cache (all but the last token) as the reference would have: the prompt
        in one forward, then one token per forward, from the first inexact position."""
        known = len(self.tokens) - 1  # positions the cache must hold
        with torch.inference_mode():
            if self.exact < self.prompt_len:
                self.cache = self.model.new_cache()
                ids = torch.tensor([self.tokens[: self.prompt_len]], device=self.device)
                self.model.decode(ids, self.cache, 0)
                self.exact = self.prompt_len
                self.stats.replayed_positions += 1
            else:  # (an exact cache may hold one position more: the tie's row's own)
                self._keep(min(self.exact, known), [])
            for pos in range(self.exact, known):
                ids = torch.tensor([[self.tokens[pos]]], device=self.device)
                self.model.decode(ids, self.cache, pos)
                self.stats.replayed_positions += 1
        self.exact = known

    def _forward(self, ids: torch.Tensor, start: int, rows: bool) -> torch.Tensor:
        """Logits (T, V) of `ids` (1, T) at positions start…start+T-1, appending their keys
        and values to the cache: `GPT.step`'s arithmetic, over the LayerCache list. `rows`:
        each row computed exactly as the reference's one-token step at its position computes
        it — the linears on `row_linear` (each row as in any number of rows,
        cloud/few_rows.py), attention one query row at a time over the keys up to its own, with
        the reference step's call — so the logits and the cached keys and values are the
        reference's bit for bit (tests/cloud/test_speculative.py checks it); else all rows at
        once, the linears on `nn.Linear` and attention under a causal mask."""
        model = self.model
        tr = model.transformer
        t = ids.size(1)
        pos = model.pos_ids[start : start + t]
        x = tr["drop"](tr["wte"](ids) + tr["wpe"](pos))  # (1, T, C)
        # Query at position p sees keys 0..p: the cache and its own prefix.
        mask = None if rows else torch.arange(start + t, device=ids.device)[None] <= pos[:, None]
        linear = row_linear if rows else _module
        blocks: list[Any] = list(tr["h"])
        for block, layer in zip(blocks, self.cache, strict=True):
            attn = block.attn
            c, nh = attn.n_embd, attn.n_head
            q, k, v = linear(attn.c_attn, block.ln_1(x)).split(c, dim=2)  # (1, T, C) each
            q, k, v = (u.view(1, t, nh, c // nh).transpose(1, 2) for u in (q, k, v))
            if layer.k is not None and start > 0:
                k, v = torch.cat([layer.k, k], dim=2), torch.cat([layer.v, v], dim=2)
            layer.k, layer.v = k, v  # (1, nh, S+T, hs)
            if rows:
                y = torch.cat([
                    F.scaled_dot_product_attention(
                        q[:, :, r : r + 1], k[:, :, : start + r + 1], v[:, :, : start + r + 1]
                    )
                    for r in range(t)
                ], dim=2)  # fmt: skip
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, nh, T, hs)
            y = y.transpose(1, 2).contiguous().view(1, t, c)
            x = x + attn.resid_dropout(linear(attn.c_proj, y))
            x = x + block.mlp(block.ln_2(x), rows)
        return linear(model.lm_head, tr["ln_f"](x))[0]  # (T, V)

    def _checked(self, ids: Any, what: str, allow_empty: bool = True) -> list[int]:
        """Token ids from a peer: integers within the vocabulary, or SpeculativeError."""
        arr = np.asarray(ids)
        if arr.size == 0:
            if not allow_empty:
                raise SpeculativeError(f"{what} is empty")
            return []
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise SpeculativeError(f"{what} must be a flat list of integer token ids")
        if int(arr.min()) < 0 or int(arr.max()) >= self.vocab:
            raise SpeculativeError(f"{what}'s token ids must lie in 0..{self.vocab - 1}")
        return [int(t) for t in arr]

    def _fits(self, length: int) -> None:
        # The forward feeds `length` positions at most, plus the next token's own.
        if length > self.context:
            raise SpeculativeError(f"{length} tokens exceed the model's context of {self.context}")

    def _started(self) -> None:
        if not self.tokens:
            raise SpeculativeError("prefill the prompt before verifying drafts")


@dataclass
class AdaptiveGamma:
    """How many tokens to draft next round: +`grow` after a round whose drafts were all
    accepted, −1 after a rejection, within [lo, hi]."""

    value: int = 4
    lo: int = 1
    hi: int = 8
    grow: int = 2
    history: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.value <= self.hi:
            raise ValueError(f"need 1 <= lo <= value <= hi, got {self.lo}, {self.value}, {self.hi}")

    def update(self, drafted: int, accepted: int) -> int:
        """Take one round's outcome; return the next γ. A round without drafts (or a
        guarded one that stopped early on a tie) says nothing about the draft: γ stays."""
        if drafted > 0:
            if accepted >= drafted:
                self.value = min(self.hi, self.value + self.grow)
            else:
                self.value = max(self.lo, self.value - 1)
        self.history.append(self.value)
        return self.value


Draft = Callable[[list[int], int], list[int]]  # (sequence so far, γ) -> up to γ draft tokens


@dataclass
class SpeculativeResult:
    tokens: list[int]
    stopped: str  # "length" | "eos"
    stats: VerifierStats
    gammas: list[int]


def speculative_generate(
    verifier: Verifier,
    prompt: Sequence[int] | np.ndarray,
    max_new_tokens: int,
    draft: Draft,
    gamma: AdaptiveGamma | None = None,
    eos_token_id: int | None = None,
) -> SpeculativeResult:
    """Greedy generation of up to `max_new_tokens` with drafts from `draft`: the same tokens
    as the cloud model's greedy decode (stopping after eos, included, like
    common.generation.generate). Drafts are cut to the budget left (a draft longer than it,
    or than γ, is trimmed, never trusted)."""
    gamma = gamma or AdaptiveGamma()
    prompt_ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
    out: list[int] = []

    def budget() -> int:  # drafts beyond it would only be thrown away
        return max(0, min(gamma.value, max_new_tokens - len(out) - 1))

    proposal = list(draft(prompt_ids, budget()))[: budget()]
    verdict = verifier.prefill(prompt_ids, proposal)
    while True:
        # A tie the guard settled says nothing about the draft: γ stays.
        gamma.update(0 if verdict.guarded else len(proposal), len(verdict.accepted))
        for token in verdict.tokens:
            out.append(token)
            if token == eos_token_id:
                return SpeculativeResult(out, "eos", verifier.stats, gamma.history)
            if len(out) >= max_new_tokens:
                return SpeculativeResult(out, "length", verifier.stats, gamma.history)
        proposal = list(draft(list(verifier.tokens), budget()))[: budget()]
        verdict = verifier.verify(proposal)
