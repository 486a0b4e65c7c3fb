"""Greedy decoding with a KV cache for the decoder models a cloud worker serves.

Two kinds of model are understood: Cicada's reference GPT-2 (`forward(idx, cache, start)`,
`new_cache()`) and transformers causal LMs (`past_key_values`, `use_cache=True`). The prompt
is processed in one forward (the prefill), then each step feeds one token and the cache.

An exact takeover (`GenerationRequest.draft`) starts with `verify` instead of `start`: one
prefill of prompt + draft, the longest agreeing prefix of the draft kept (common/generation.py
`accept`), the cache cut back to it, and the model's own next token.

The prefill goes through `call` when given: a cloud worker passes `ColdStart.call`, so a
generation that arrives during a cold start begins on the resident stages and releases its
first token only once every stage has checked out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cicada.common.generation import (
    CONTEXT_KEYS,
    Decoder,
    GenerationError,
    GenerationRequest,
    accept,
)


def context_of(model: nn.Module) -> tuple[int | None, int | None]:
    """(context length, vocabulary size) where the model's config object says them (the keys
    `cicada.common.generation.limits_of` reads from a config dict)."""
    config = getattr(model, "config", None)
    values = (getattr(config, key, None) for key in CONTEXT_KEYS)
    context = next((v for v in values if isinstance(v, int)), None)
    vocab = getattr(config, "vocab_size", None)
    return context, vocab if isinstance(vocab, int) else None


Forward = Callable[..., Any]


def decoder_for(
    model: nn.Module, device: str = "cpu", call: Callable[..., Any] | None = None
) -> Decoder:
    """`call(method, *args, **kwargs)` runs the prefill: `ColdStart.call` on a cloud worker."""
    if callable(getattr(model, "new_cache", None)):
        decode = getattr(model, "decode")  # noqa: B009 - a method the Protocol can't name
        prefill = (lambda *a: call("decode", *a)) if call else decode
        return CachedGPTDecoder(decode, model, device, prefill)
    if callable(getattr(model, "prepare_inputs_for_generation", None)):
        return HFCausalDecoder(model, device, (lambda **k: call(None, **k)) if call else model)
    raise GenerationError(
        f"{type(model).__name__} is not a decoder this worker can generate with "
        "(a Cicada GPT or a transformers causal LM)"
    )


def _argmax_last(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits[0, -1]).item())


@dataclass(frozen=True)
class Verdict:
    """What a prefill of prompt + draft says: the draft's first `accepted` tokens stand;
    `done`: they end the generation (its length, or an eos); `sure`: the model's own token at
    `accepted` is no near tie, so the prefill's argmax there is its token."""

    accepted: int
    done: bool
    sure: bool


def judge(request: GenerationRequest, logits: torch.Tensor) -> Verdict:
    """The verdict on `request.draft` from `logits` (1, T + k, V) of prompt + draft."""
    draft = request.draft or ()
    t = int(request.prompt.size)
    tail = logits[0, t - 1 :].float().cpu().numpy()  # (k + 1, V): a prediction per position
    j, sure = accept(tail, draft, request.eos_token_id)
    done = j >= request.max_new_tokens or (j > 0 and draft[j - 1] == request.eos_token_id)
    return Verdict(j, done, sure)


def with_draft(request: GenerationRequest) -> torch.Tensor:
    """The prompt and the draft as one (1, T + k) int64 tensor."""
    ids = np.concatenate([request.prompt, np.asarray(request.draft or (), dtype=np.int64)])
    return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))[None]


def cut(cache: list[Any], length: int) -> None:
    """Keep the first `length` positions of a reference GPT-2 cache (LayerCache per block)."""
    for layer in cache:
        layer.k, layer.v = layer.k[:, :, :length], layer.v[:, :, :length]


def can_verify(decoder: Decoder) -> bool:
    return callable(getattr(decoder, "verify", None))


def verify(decoder: Decoder, request: GenerationRequest) -> tuple[Verdict, int | None]:
    """Start an exact takeover: (the verdict, the model's own next token, None if `done`).
    The decoder then holds prompt + the accepted tokens, as after `start`."""
    verdict, token = getattr(decoder, "verify")(request)  # noqa: B009 - not in the Protocol
    return verdict, token


class CachedGPTDecoder:
    def __init__(self, decode: Forward, model: nn.Module, device: str, prefill: Forward) -> None:
        self._decode = decode
        self._model = model
        self._prefill = prefill
        self._device = device
        self._cache: Any = None
        self._pos = 0

    def start(self, prompt: np.ndarray) -> int:
        ids = torch.from_numpy(np.ascontiguousarray(prompt, dtype=np.int64))[None].to(self._device)
        self._cache = self._model.new_cache()  # type: ignore[operator]
        with torch.inference_mode():
            logits = self._prefill(ids, self._cache, 0)
        self._pos = ids.shape[1]
        return _argmax_last(logits)

    def advance(self, token: int) -> int:
        ids = torch.tensor([[token]], dtype=torch.int64, device=self._device)
        with torch.inference_mode():
            logits = self._decode(ids, self._cache, self._pos)
        self._pos += 1
        return _argmax_last(logits)

    def verify(self, request: GenerationRequest) -> tuple[Verdict, int | None]:
        """One prefill of prompt + draft; the cache is cut back to what stands. A near tie
        at the next position is decided as the model's own decode reaches it: the prompt
        alone (position 0) or a one-token step."""
        self._cache = self._model.new_cache()  # type: ignore[operator]
        with torch.inference_mode():
            logits = self._prefill(with_draft(request).to(self._device), self._cache, 0)
        verdict = judge(request, logits)
        j, t = verdict.accepted, int(request.prompt.size)
        cut(self._cache, t + j)
        self._pos = t + j
        if verdict.done:
            return verdict, None
        if verdict.sure:
            return verdict, int(torch.argmax(logits[0, t - 1 + j]).item())
        if j == 0:
            return verdict, self.start(request.prompt)
        cut(self._cache, t + j - 1)
        self._pos = t + j - 1
        return verdict, self.advance(int(request.draft[j - 1]))  # type: ignore[index]


class HFCausalDecoder:
    def __init__(self, model: nn.Module, device: str, prefill: Forward) -> None:
        self._model = model
        self._prefill = prefill
        self._device = device
        self._past: Any = None

    def _step(self, forward: Forward, ids: torch.Tensor) -> int:
        with torch.inference_mode():
            out = forward(input_ids=ids, past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        return _argmax_last(out.logits)

    def start(self, prompt: np.ndarray) -> int:
        self._past = None
        ids = torch.from_numpy(np.ascontiguousarray(prompt, dtype=np.int64))[None]
        return self._step(self._prefill, ids.to(self._device))

    def advance(self, token: int) -> int:
        ids = torch.tensor([[token]], dtype=torch.int64, device=self._device)
        return self._step(self._model, ids)

    def verify(self, request: GenerationRequest) -> tuple[Verdict, int | None]:
        """One forward of prompt + draft for the verdict, then a prefill of what stands
        (transformers caches are not cut back here: the second prefill is the simple way)."""
        with torch.inference_mode():
            out = self._prefill(input_ids=with_draft(request).to(self._device), use_cache=False)
        verdict = judge(request, out.logits)
        if verdict.done:
            return verdict, None
        return verdict, self.start(request.continued(verdict.accepted).prompt)
