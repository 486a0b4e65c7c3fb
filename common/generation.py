"""Greedy generation shared by edge agents and cloud workers (numpy only: no torch here).

A generation request is a REQUEST whose `options` carry `max_new_tokens` (docs/PROTOCOL.md,
"Generation"): one input, the prompt's token ids (int64, shape (1, T) or (T,)). The worker
streams each new token as a PARTIAL and ends with one RESULT holding every token it generated.
A continuation after a handoff is the same request with the tokens so far appended to the
prompt: the new worker recomputes its own cache from that, so no cache crosses the wire.

An exact generation (`exact: true`) that a cloud worker takes over from an edge agent comes
with `draft`: the edge's tokens so far. The worker runs prompt + draft through its model in one
prefill, keeps the longest prefix of the draft that its own greedy decode agrees with
(`accept`) and continues from there, so its output is its own greedy decode of the prompt.

The loop stops at `max_new_tokens`, at `eos_token_id` (included in the output), when the
coordinator cancels the dispatch, or when the deadline passes (the tokens so far are the
result: a stream that already delivered tokens is worth more than a TIMEOUT).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cicada.common.defaults import MAX_NEW_TOKENS
from cicada.common.errors import GenerationError


@dataclass(frozen=True)
class GenerationRequest:
    prompt: np.ndarray  # (T,) int64
    max_new_tokens: int
    eos_token_id: int | None = None
    draft: tuple[int, ...] | None = None  # an exact takeover's tokens to verify first

    def continued(self, accepted: int) -> GenerationRequest:
        """The rest of the generation once `accepted` draft tokens stand: they join the
        prompt, and only the tokens still due are asked for."""
        assert self.draft is not None and 0 <= accepted <= len(self.draft)
        kept = np.asarray(self.draft[:accepted], dtype=np.int64)
        return GenerationRequest(
            np.concatenate([self.prompt, kept]),
            self.max_new_tokens - accepted,
            self.eos_token_id,
        )

    @classmethod
    def parse(cls, options: Mapping[str, Any], inputs: list[np.ndarray]) -> GenerationRequest:
        n, eos = check_options(options)
        draft = options.get("draft")
        if len(inputs) != 1:
            raise GenerationError(f"generation takes one input (the prompt), got {len(inputs)}")
        prompt = np.asarray(inputs[0])
        if prompt.ndim == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.ndim != 1 or prompt.size == 0:
            raise GenerationError(
                f"the prompt must be token ids of shape (1, T) or (T,) with T >= 1, "
                f"got shape {tuple(np.asarray(inputs[0]).shape)}"
            )
        if prompt.dtype != np.int64:
            raise GenerationError(f"the prompt must be int64 token ids, got {prompt.dtype}")
        return cls(
            prompt=prompt,
            max_new_tokens=n,
            eos_token_id=eos,
            draft=None if draft is None else tuple(int(t) for t in draft),
        )

    def check_fits(self, context: int | None, vocab: int | None) -> None:
        """Refuse what the model cannot do, before any token is produced."""
        if context is not None and self.prompt.size + self.max_new_tokens > context:
            raise GenerationError(
                f"prompt ({self.prompt.size}) + max_new_tokens ({self.max_new_tokens}) exceed "
                f"the model's context of {context} tokens"
            )
        if vocab is not None and (self.prompt.min() < 0 or self.prompt.max() >= vocab):
            raise GenerationError(f"token ids must lie in 0..{vocab - 1}")
        if vocab is not None and self.draft and max(self.draft) >= vocab:
            raise GenerationError(f"draft token ids must lie in 0..{vocab - 1}")


def check_options(options: Mapping[str, Any]) -> tuple[int, int | None]:
    """(max_new_tokens, eos_token_id) of a generation request's options, or GenerationError.
    The coordinator checks them too, before it tracks the request's tokens."""
    n = _integral(options.get("max_new_tokens"))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
        raise GenerationError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}")
    eos = _integral(options.get("eos_token_id"))
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
        raise GenerationError("eos_token_id must be a non-negative integer")
    handoff = options.get("handoff", True)
    if not isinstance(handoff, bool):
        raise GenerationError("handoff must be true or false")
    exact = options.get("exact", False)
    if not isinstance(exact, bool):
        raise GenerationError("exact must be true or false")
    draft = options.get("draft")
    if draft is not None:
        if not exact:
            raise GenerationError("draft is only for an exact generation (exact: true)")
        if not isinstance(draft, list) or len(draft) > n:
            raise GenerationError(f"draft must be a list of at most max_new_tokens ({n}) ids")
        if not all(type(t) is int and t >= 0 for t in (_integral(t) for t in draft)):
            raise GenerationError("draft must hold non-negative integer token ids")
    return n, eos


def check_request_options(options: Mapping[str, Any]) -> None:
    """A client's REQUEST options, as the coordinator admits them: generation options only
    with max_new_tokens, and never a draft (the coordinator makes drafts)."""
    if "max_new_tokens" not in options:
        for name in ("exact", "draft"):
            if name in options:
                raise GenerationError(f"{name} is a generation option: give max_new_tokens too")
        return
    if "draft" in options:
        raise GenerationError("draft is set by the coordinator, not by a client")
    check_options(options)


# An accepted draft position needs the model's top logit ahead of the next by this much
# (relative to its size): a prefill and a one-token step sum in different orders (~1e-6
# apart), so a closer call could go the other way in the model's own decode.
NEAR_TIE = 1e-4


def accept(logits: np.ndarray, draft: Sequence[int], eos: int | None) -> tuple[int, bool]:
    """How many of `draft` stand, and whether the model's own next token (`argmax(logits[j])`)
    is a sure call. `logits` (k + 1, V): the model's prediction at each draft position and
    the one after, from one prefill of prompt + draft. The draft stands up to its first token
    the model would not have chosen, or whose choice was a near tie, or just past an eos."""
    top2 = np.sort(logits, axis=-1)[:, -2:] if logits.shape[-1] > 1 else None
    best = np.argmax(logits, axis=-1)

    def sure(i: int) -> bool:
        if top2 is None:
            return True
        first, second = float(top2[i, 1]), float(top2[i, 0])
        return first - second > NEAR_TIE * max(1.0, abs(first))

    j = 0
    while j < len(draft) and int(best[j]) == int(draft[j]) and sure(j):
        j += 1
        if draft[j - 1] == eos:
            break
    return j, sure(j)


def _integral(value: Any) -> Any:
    """An integral float (5.0, as some msgpack encoders write integers) as the int it is."""
    return int(value) if type(value) is float and value.is_integer() else value


CONTEXT_KEYS = ("block_size", "n_positions", "max_position_embeddings")


def limits_of(config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(context length, vocabulary size) from a model config: Cicada's reference models keep
    them at the top, a transformers package's factory config nests config.json under
    "config"."""
    for where in (config, config.get("config")):
        if isinstance(where, Mapping):
            context = next((where[k] for k in CONTEXT_KEYS if isinstance(where.get(k), int)), None)
            vocab = where.get("vocab_size")
            if context is not None or isinstance(vocab, int):
                return context, vocab if isinstance(vocab, int) else None
    return None, None


class Decoder(Protocol):
    """One model's greedy steps; implementations keep whatever cache they use."""

    def start(self, prompt: np.ndarray) -> int:
        """Process the prompt; return the first new token."""

    def advance(self, token: int) -> int:
        """Append `token`; return the next one."""


@dataclass
class Generated:
    tokens: list[int]
    stopped: str  # "length" | "eos" | "cancelled" | "deadline"


def generate(
    decoder: Decoder,
    request: GenerationRequest,
    emit: Callable[[int], None],
    cancelled: Callable[[], bool] = lambda: False,
    deadline: float | None = None,
    first: int | None = None,
) -> Generated:
    """Greedy decoding; `emit` is called with each token as soon as it exists. `first`: the
    first token, already known (the decoder holds the prompt: an exact takeover's verify)."""
    tokens: list[int] = []
    token = decoder.start(request.prompt) if first is None else first
    while True:
        tokens.append(token)
        emit(token)
        if token == request.eos_token_id:
            return Generated(tokens, "eos")
        if len(tokens) >= request.max_new_tokens:
            return Generated(tokens, "length")
        if cancelled():
            return Generated(tokens, "cancelled")
        if deadline is not None and time.monotonic() >= deadline:
            return Generated(tokens, "deadline")
        token = decoder.advance(token)


class RecomputeDecoder:
    """For models without a cache (an ONNX edge model: ids (1, T) -> logits (1, T, V)):
    every step runs the whole sequence. Cheap for the small models an edge serves."""

    def __init__(self, logits: Callable[[np.ndarray], np.ndarray]) -> None:
        self._logits = logits
        self._ids: list[int] = []

    def _next(self) -> int:
        out = self._logits(np.asarray([self._ids], dtype=np.int64))
        return int(np.argmax(out[0, -1]))

    def start(self, prompt: np.ndarray) -> int:
        self._ids = [int(t) for t in prompt]
        return self._next()

    def advance(self, token: int) -> int:
        self._ids.append(token)
        return self._next()
