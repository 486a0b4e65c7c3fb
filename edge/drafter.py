"""Greedy drafts from an edge model's cached step graph, for speculative decoding (issue 13).

After the takeover the cloud owns the generation and the edge keeps proposing the next γ
tokens; the cloud verifies them (cloud/speculative.py) and answers with the sequence that
stands. `Drafter.draft(sequence, gamma)` takes that sequence, keeps the longest prefix of it
that its own keys and values already cover (a rejected draft's positions are cut off, not
recomputed), feeds the rest in one call, and proposes `gamma` greedy tokens. Torch-free: ONNX
Runtime on the decoder.onnx / decoder.int8.onnx graph (`cicada.common.edge_model`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from cicada.common.edge_model import EdgeModelError
from cicada.common.generation import GenerationRequest

# How far the edge drafts past the last token that stands: twice the cloud's largest γ (8),
# so a round never waits for want of drafts, and a diverged edge stops burning the CPU.
LOOKAHEAD = 16


class Drafter:
    """One generation's drafts (a drafter holds that generation's keys and values)."""

    def __init__(self, session: ort.InferenceSession, vocab: int | None = None) -> None:
        self._session = session
        shape = session.get_inputs()[1].shape  # (layers, 2, batch, heads, past, head_size)
        self._past = np.zeros((shape[0], 2, 1, shape[3], 0, shape[5]), dtype=np.float32)
        self._fed: list[int] = []  # the tokens whose keys and values `_past` holds
        self._vocab = vocab
        self.calls = 0  # graph runs so far

    def draft(self, sequence: Sequence[int], gamma: int) -> list[int]:
        """Up to `gamma` greedy tokens after `sequence` (the prompt and every token that
        stands so far); [] for gamma < 1."""
        seq = [int(t) for t in sequence]
        if not seq:
            raise EdgeModelError("a draft needs at least one token of context")
        if self._vocab is not None and not all(0 <= t < self._vocab for t in seq):
            raise EdgeModelError(f"token ids must lie in 0..{self._vocab - 1}")
        if gamma < 1:
            return []
        keep = 0  # the longest common prefix, leaving at least one token to feed
        for mine, theirs in zip(self._fed, seq[:-1], strict=False):
            if mine != theirs:
                break
            keep += 1
        self._past = self._past[:, :, :, :, :keep]
        self._fed = self._fed[:keep]
        out: list[int] = []
        feed = seq[keep:]
        for _ in range(gamma):
            token = self._run(feed)
            out.append(token)
            feed = [token]
        return out

    def _run(self, ids: list[int]) -> int:
        feed = np.asarray([ids], dtype=np.int64)
        try:
            logits, self._past = self._session.run(None, {"ids": feed, "past": self._past})
        except Exception as exc:  # ORT's own exception types
            raise EdgeModelError(f"the draft decoder failed ({type(exc).__name__}: {exc})") from exc
        self.calls += 1
        self._fed.extend(ids)
        return int(np.argmax(logits[0, -1]))


class SyncSource(Protocol):
    """The edge dispatch's stream (common/worker.py `Stream`): the coordinator's TOKENS."""

    tokens_heard: int

    def offered(self) -> dict[int, int]: ...

    def wait_tokens(self, heard: int, timeout: float) -> None: ...

    def send(self, outputs: list[np.ndarray], position: int | None = None) -> None: ...

    @property
    def cancelled(self) -> bool: ...


def draft_after_takeover(
    drafter: Drafter,
    request: GenerationRequest,
    mine: list[int],
    stream: SyncSource,
    deadline: float | None,
    pace: Callable[[], None] = lambda: None,
) -> int:
    """A drafting attempt (docs/PROTOCOL.md section 12): the tokens that stand arrive as
    TOKENS (the cloud's); the edge's own tokens after them are cut at the first disagreement,
    and it drafts on, one PARTIAL per token with its position, at most LOOKAHEAD past what
    stands. Ends when cancelled (the cloud answered), at the deadline, or when everything
    stands. Returns the drafts sent."""
    prompt = [int(t) for t in request.prompt]
    n = request.max_new_tokens
    seq = list(mine)  # the edge's view: positions 0 ... of the generation
    stands = 0  # leading positions the cloud has settled
    sent = 0
    while not stream.cancelled and (deadline is None or time.monotonic() < deadline):
        heard = stream.tokens_heard
        settled = stream.offered()
        while stands in settled:
            token = settled[stands]
            if stands < len(seq) and seq[stands] != token:
                del seq[stands:]  # the cloud disagreed: drafts from here on are dead
            if stands >= len(seq):
                seq.append(token)
            stands += 1
        if stands >= n:
            break
        if len(seq) - stands >= LOOKAHEAD or len(seq) >= n:
            stream.wait_tokens(heard, 0.5)
            continue
        token = drafter.draft(prompt + seq, 1)[0]
        pace()
        stream.send([np.asarray([token], dtype=np.int64)], position=len(seq))
        seq.append(token)
        sent += 1
    return sent
