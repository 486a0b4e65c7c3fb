"""Continuous batching of generation streams for Cicada's reference GPT-2 (cloud worker).

Several greedy generations decode at once: a stream joins between two steps (its prompt is
prefilled alone, so prompts of different lengths need no padding; a handoff from the edge is
just a longer prompt), every step feeds the last token of each active stream, and a stream
leaves as soon as it stops (length, eos, cancelled, deadline), each step.

Design: every stream keeps its own KV cache, (1, nh, L_i, hs) per layer, L_i its own length.
A step runs the linear layers (QKV projection, attention output projection, the MLP, the LM
head: nearly all of the FLOPs and all of the weight traffic) as ONE matmul over the B new
tokens, (B, 1, C), and attention per stream, each query over its own cache. A single new
token may attend to every position of its own sequence, so no mask is needed, and no cache is
padded or copied into a shared buffer: what each stream computes is exactly what it computes
decoding alone (`CachedGPTDecoder.advance`), except that its rows of the matmuls are part of a
larger one. BLAS picks another kernel (another order of summation) for B rows than for one,
so the logits differ in the last bits (measured on this CPU: not bit-identical, equal within
1e-5; tests/cloud/test_continuous.py); greedy tokens are equal unless two logits tie within
rounding, which the tests check on real weights. A padded shared
cache with a mask would batch attention too, but attention over one token is a small part of
a step and the padding would be copied every time a stream joins or leaves.

Models this does not understand (a transformers causal LM) are not batched: the worker runs
their generations one at a time, as before (cloud/generate.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cicada.common.generation import GenerationRequest

# (keys, values) per layer, (1, nh, L, hs) each.
Cache = list[tuple[torch.Tensor, torch.Tensor]]
Prefill = Callable[[torch.Tensor, list[Any]], torch.Tensor]  # (ids, LayerCache list) -> logits


def batchable(model: nn.Module) -> bool:
    """Whether `model` is (built like) Cicada's reference GPT-2, whose step this batches."""
    from cicada.cloud.models.gpt2 import GPT

    return isinstance(model, GPT)


@dataclass
class DecodeStream:
    """One generation: its request, where its tokens go, and its own cache."""

    request: GenerationRequest
    emit: Callable[[int], None]
    cancelled: Callable[[], bool] = lambda: False
    deadline: float | None = None
    owner: Any = None  # the caller's handle (the worker's work item)
    verdict: Callable[[int], None] = lambda accepted: None  # an exact takeover's verdict
    tokens: list[int] = field(default_factory=list)
    stopped: str | None = None  # as common.generation.Generated.stopped, once it stops
    peak: int = 1  # the most streams it was decoded with in one step
    cache: Cache = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return int(self.request.prompt.size) + len(self.tokens)

    def push(self, token: int) -> None:
        """Take a new token; the same checks, in the same order, as common.generation.generate."""
        self.tokens.append(token)
        self.emit(token)
        if token == self.request.eos_token_id:
            self.stopped = "eos"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.stopped = "length"
        elif self.cancelled():
            self.stopped = "cancelled"
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped = "deadline"


class Streams:
    """The active streams of one model, at most `limit` of them."""

    def __init__(self, model: nn.Module, device: str = "cpu", limit: int = 8) -> None:
        self.model, self.device, self.limit = model, device, limit
        self.active: list[DecodeStream] = []
        self.steps = 0  # batched steps run so far

    @property
    def full(self) -> bool:
        return len(self.active) >= self.limit

    def start(self, stream: DecodeStream, prefill: Prefill | None = None) -> None:
        """Prefill the prompt alone (through `prefill`, e.g. ColdStart.call, when given) and
        take its first token; the stream is active unless that token already stopped it."""
        model = cast(Any, self.model)
        run = prefill or (lambda ids, layers: model.decode(ids, layers, 0))
        if stream.request.draft is not None:
            token, layers = self._verify(stream, run)
            if token is None:
                return
        else:
            prompt = np.ascontiguousarray(stream.request.prompt, dtype=np.int64)
            layers = model.new_cache()
            with torch.inference_mode():
                logits = run(torch.from_numpy(prompt)[None].to(self.device), layers)
            token = int(torch.argmax(logits[0, -1]).item())
        stream.cache = [(c.k, c.v) for c in layers]
        stream.started = time.monotonic()
        stream.push(token)
        if stream.stopped is None:
            self.active.append(stream)

    def _verify(self, stream: DecodeStream, prefill: Prefill) -> tuple[int | None, list[Any]]:
        """An exact takeover (cloud/generate.py, `CachedGPTDecoder.verify`): one prefill of
        prompt + draft, the verdict sent, the stream continuing from what stands with its
        own next token (None: the accepted draft ends the generation)."""
        from cicada.cloud.generate import cut, judge, with_draft

        model = cast(Any, self.model)
        request = stream.request
        layers = model.new_cache()
        with torch.inference_mode():
            logits = prefill(with_draft(request).to(self.device), layers)
        verdict = judge(request, logits)
        j, t = verdict.accepted, int(request.prompt.size)
        stream.verdict(j)
        stream.request = request.continued(j)
        cut(layers, t + j)
        if verdict.done:
            stream.stopped = "length"
            return None, layers
        if verdict.sure:
            return int(torch.argmax(logits[0, t - 1 + j]).item()), layers
        with torch.inference_mode():  # a near tie: decided as the model's own decode does
            if j == 0:
                layers = model.new_cache()
                ids = torch.from_numpy(np.ascontiguousarray(request.prompt))[None]
                logits = prefill(ids.to(self.device), layers)
            else:
                cut(layers, t + j - 1)
                last = torch.tensor([[request.draft[j - 1]]], device=self.device)  # type: ignore[index]
                logits = model.decode(last, layers, t + j - 1)
        return int(torch.argmax(logits[0, -1]).item()), layers

    def step(self, only: list[DecodeStream] | None = None) -> list[DecodeStream]:
        """One token for every active stream (or for `only`), as one batched forward; returns
        the streams that stopped, no longer active. Nothing changes if the forward raises."""
        group = self.active if only is None else only
        if not group:
            return []
        with torch.inference_mode():
            logits, caches = self._forward(group)
        nexts = torch.argmax(logits, dim=-1).tolist()
        self.steps += 1
        for stream, cache, token in zip(group, caches, nexts, strict=True):
            stream.cache = cache
            stream.peak = max(stream.peak, len(group))
            stream.push(int(token))
        done = [s for s in group if s.stopped is not None]
        self.active = [s for s in self.active if s.stopped is None]
        return done

    def _forward(self, group: list[DecodeStream]) -> tuple[torch.Tensor, list[Cache]]:
        """Logits (B, V) for each stream's last token, and each stream's cache grown by one."""
        model = cast(Any, self.model)
        tr = model.transformer
        b = len(group)
        ids = torch.tensor([s.tokens[-1] for s in group], device=self.device)[:, None]
        # The last token sits at position length - 1 of its own sequence.
        pos = torch.tensor([s.length - 1 for s in group], device=self.device)[:, None]
        x = tr["drop"](tr["wte"](ids) + tr["wpe"](pos))  # (B, 1, C)
        caches: list[Cache] = [[] for _ in group]
        for i, block in enumerate(tr["h"]):
            attn = block.attn
            c, nh = attn.n_embd, attn.n_head
            q, k, v = attn.c_attn(block.ln_1(x)).split(c, dim=2)  # batched: (B, 1, C) each
            q, k, v = (t.view(b, 1, nh, c // nh).transpose(1, 2) for t in (q, k, v))
            ys = []
            for j, stream in enumerate(group):  # attention over its own cache, unmasked
                past_k, past_v = stream.cache[i]
                kj = torch.cat([past_k, k[j : j + 1]], dim=2)
                vj = torch.cat([past_v, v[j : j + 1]], dim=2)
                ys.append(F.scaled_dot_product_attention(q[j : j + 1], kj, vj))
                caches[j].append((kj, vj))
            y = torch.cat(ys).transpose(1, 2).contiguous().view(b, 1, c)
            x = x + attn.resid_dropout(attn.c_proj(y))
            x = x + block.mlp(block.ln_2(x))
        return model.lm_head(tr["ln_f"](x))[:, -1], caches
