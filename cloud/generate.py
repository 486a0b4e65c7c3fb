"""Greedy decoding with a KV cache for the decoder models a cloud worker serves.

Two kinds of model are understood: Cicada's reference GPT-2 (`forward(idx, cache, start)`,
`new_cache()`) and transformers causal LMs (`past_key_values`, `use_cache=True`). The prompt
is processed in one forward (the prefill), then each step feeds one token and the cache.

The prefill goes through `call` when given: a cloud worker passes `ColdStart.call`, so a
generation that arrives during a cold start begins on the resident stages and releases its
first token only once every stage has checked out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cicada.common.generation import CONTEXT_KEYS, Decoder, GenerationError


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
