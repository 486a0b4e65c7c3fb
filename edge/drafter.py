"""Greedy drafts from an edge model's cached step graph, for speculative decoding (issue 13).

After the takeover the cloud owns the generation and the edge keeps proposing the next γ
tokens; the cloud verifies them (cloud/speculative.py) and answers with the sequence that
stands. `Drafter.draft(sequence, gamma)` takes that sequence, keeps the longest prefix of it
that its own keys and values already cover (a rejected draft's positions are cut off, not
recomputed), feeds the rest in one call, and proposes `gamma` greedy tokens. Torch-free: ONNX
Runtime on the decoder.onnx / decoder.int8.onnx graph (`cicada.common.edge_model`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from cicada.common.edge_model import EdgeModelError


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
