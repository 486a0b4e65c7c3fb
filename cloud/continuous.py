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
padded or copied into a shared buffer: what each stream computes is what it computes decoding
alone (`CachedGPTDecoder.advance`). In rows mode (CPU, oneDNN, 2+ torch threads:
`cloud/few_rows.py`) every linear computes each row exactly as the solo step does (oneDNN,
checked for 2–17 rows), so a stream's logits are its solo decode's bit for bit whatever its
company (tested at 5 streams), and the weights are reordered once for that kernel in the
background. Otherwise (one thread, CUDA, no
oneDNN) its rows of the matmuls are part of a larger one, so the logits differ in the last bits
(equal within 1e-5: tests/cloud/test_continuous.py); greedy tokens are equal unless two logits
tie within rounding, which the tests check on real weights.

Two things make a step of B > 1 streams cheap on a CPU (BENCHMARKS.md, "Batching"):
* in rows mode, oneDNN's kernel on reordered weights reads the weights once for all rows; below
  2 threads, `PackedLinears`: torch's fp32 matmul of a few rows (MKL sgemm at M = 2..16) repacks
  the weight matrix at every call and ran 8 rows at ~3 x the time of one row; MKL's packed GEMM
  on weights packed once runs 8 rows at ~1.5 x, near the time of reading the weights. The packed
  copy costs as much memory as the linear weights; it is made at the first step of two or more
  streams (the weights are final by then: every stream's prefill ran every stage), and again for
  a weight that was replaced or changed in place. One stream keeps torch's own matmul (a matrix-
  vector product, faster than the packed kernel at one row). Each row's result on the packed
  weights does not depend on the other rows (measured: bit-identical at 1..16 rows), so a
  stream's logits do not depend on its company.
* `_Room`: each stream's keys and values live in a buffer with room to grow (capacity
  doubling, up to what its request can still need); a step writes the new position in place
  and hands out views, instead of a `torch.cat` that copies the whole cache every step.

A padded shared cache with a mask would batch attention too, but one token's attention reads
every byte of its own stream's cache whatever the batching (it saves calls, not bytes) and the
padding would be copied every time a stream joins or leaves.

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

from cicada.cloud.few_rows import (
    reorder_in_background,
    row_linear,
    rows_available,
    weight_version,
)
from cicada.common.generation import GenerationRequest

# (keys, values) per layer, (1, nh, L, hs) each.
Cache = list[tuple[torch.Tensor, torch.Tensor]]
Prefill = Callable[[torch.Tensor, list[Any]], torch.Tensor]  # (ids, LayerCache list) -> logits


def batchable(model: nn.Module) -> bool:
    """Whether `model` is (built like) Cicada's reference GPT-2, whose step this batches."""
    from cicada.cloud.models.gpt2 import GPT

    return isinstance(model, GPT)


class _Room:
    """One stream's keys and values in a buffer with room to grow: (n_layer, 2, 1, nh, cap,
    hs). `views` are the (k, v) views of the first `length` positions last handed out as the
    stream's cache; positions from `length` on were never in a view, so a step may write
    there in place without changing anything anyone holds."""

    def __init__(self, buf: torch.Tensor, length: int) -> None:
        self.buf, self.length = buf, length
        self.views: Cache = self.cut(length)

    @property
    def capacity(self) -> int:
        return int(self.buf.size(4))

    def cut(self, length: int) -> Cache:
        return [(layer[0, :, :, :length], layer[1, :, :, :length]) for layer in self.buf]

    def holds(self, cache: Cache) -> bool:
        """Whether `cache` is still exactly the views this room handed out (nobody replaced
        or truncated them): tuples are immutable, so identity of each says it."""
        return len(cache) == len(self.views) and all(
            a is b for a, b in zip(cache, self.views, strict=True)
        )

    @classmethod
    def adopt(cls, cache: Cache, capacity: int) -> _Room:
        """A new room holding a copy of `cache` ((1, nh, L, hs) per layer), `capacity` >= L."""
        k0 = cache[0][0]
        n, (_, nh, length, hs) = len(cache), k0.shape
        buf = torch.empty(n, 2, 1, nh, capacity, hs, dtype=k0.dtype, device=k0.device)
        for i, (k, v) in enumerate(cache):
            buf[i, 0, :, :, :length] = k
            buf[i, 1, :, :, :length] = v
        return cls(buf, length)


def _room_for(stream: DecodeStream) -> _Room:
    """A room where `stream`'s cache can take one more position: its own when that still
    holds its cache and has space, else a new one (twice the length, at most what its
    request can still need). Changes nothing on the stream: the step commits it."""
    room = stream.room
    length = int(stream.cache[0][0].size(2))
    if room is not None and room.holds(stream.cache) and length < room.capacity:
        return room
    # The cache holds every position but the last token's: prompt + max_new_tokens - 1 at most.
    need = int(stream.request.prompt.size) + stream.request.max_new_tokens - 1
    return _Room.adopt(stream.cache, max(length + 1, min(max(2 * length, length + 16), need)))


class PackedLinears:
    """The step's linear layers on weights packed once for MKL's packed GEMM (the kernel
    torch's own CPU freezing pass uses), for steps of two or more rows. Packed for `ROWS`
    rows; any row count runs on the same packing, each row with the same result."""

    ROWS = 8

    def __init__(self) -> None:
        # id(weight) -> (weight, its data pointer and version when packed, the packing)
        self._packed: dict[int, tuple[torch.Tensor, int, int, torch.Tensor]] = {}

    @staticmethod
    def available(device: str) -> bool:
        mkl = getattr(torch.ops, "mkl", None)
        return (
            device == "cpu"
            and torch.backends.mkl.is_available()
            and (mkl is not None and hasattr(mkl, "_mkl_linear"))
        )

    def packing(self, weight: torch.Tensor) -> torch.Tensor:
        entry = self._packed.get(id(weight))
        version = weight_version(weight)
        if (
            entry is not None
            and entry[0] is weight
            and entry[1] == weight.data_ptr()
            and entry[2] == version
        ):
            return entry[3]
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, self.ROWS)
        self._packed[id(weight)] = (weight, weight.data_ptr(), version, packed)
        return packed

    def __call__(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """`layer(x)` for an nn.Linear `layer` and x (B, 1, C_in): (B, 1, C_out)."""
        weight, bias = layer.weight, layer.bias
        if x.dtype != torch.float32 or weight.dtype != torch.float32:
            return cast(torch.Tensor, layer(x))
        rows = x.reshape(-1, x.size(-1))
        y = torch.ops.mkl._mkl_linear(rows, self.packing(weight), weight, bias, rows.size(0))
        return y.view(*x.shape[:-1], y.size(-1))


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
    # (k, v) per layer, (1, nh, L, hs) each; may be replaced (e.g. truncated) between steps.
    cache: Cache = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    room: _Room | None = field(default=None, repr=False)  # where `cache` lives, once stepped

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
    """The active streams of one model, at most `limit` of them. `pack`: run the linear
    layers of steps of two or more streams on packed weights (PackedLinears; CPU, MKL).
    `reorder`: start reordering the weights for row_linear now (few_rows.py); a cloud worker
    passes False and starts it itself once the weights are resident and a generation came."""

    def __init__(
        self,
        model: nn.Module,
        device: str = "cpu",
        limit: int = 8,
        pack: bool = True,
        reorder: bool = True,
    ) -> None:
        self.model, self.device, self.limit = model, device, limit
        self.active: list[DecodeStream] = []
        self.steps = 0  # batched steps run so far
        self.packed = PackedLinears() if pack and PackedLinears.available(device) else None
        if pack and reorder and rows_available(device):  # the layout row_linear reads best
            reorder_in_background(model)

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
        stream.room = None
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
            logits, rooms = self._forward(group)
        nexts = torch.argmax(logits, dim=-1).tolist()
        self.steps += 1
        for stream, room, token in zip(group, rooms, nexts, strict=True):
            room.length += 1
            room.views = room.cut(room.length)
            stream.room, stream.cache = room, room.views
            stream.peak = max(stream.peak, len(group))
            stream.push(int(token))
        done = [s for s in group if s.stopped is not None]
        self.active = [s for s in self.active if s.stopped is None]
        return done

    def _forward(self, group: list[DecodeStream]) -> tuple[torch.Tensor, list[_Room]]:
        """Logits (B, V) for each stream's last token, and the room of each stream with its
        new position written at `room.length` (committed by `step`)."""
        model = cast(Any, self.model)
        tr = model.transformer
        b = len(group)
        rows = rows_available(self.device)  # each row as the solo step computes it
        packed = self.packed if b > 1 and not rows else None

        def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            if rows:
                return row_linear(layer, x)
            return packed(layer, x) if packed is not None else cast(torch.Tensor, layer(x))

        rooms = [_room_for(s) for s in group]
        at = [r.length for r in rooms]  # where each stream's new position goes
        ids = torch.tensor([s.tokens[-1] for s in group], device=self.device)[:, None]
        # The last token sits at position length - 1 of its own sequence.
        pos = torch.tensor([s.length - 1 for s in group], device=self.device)[:, None]
        x = tr["drop"](tr["wte"](ids) + tr["wpe"](pos))  # (B, 1, C)
        for i, block in enumerate(tr["h"]):
            attn = block.attn
            c, nh = attn.n_embd, attn.n_head
            qkv = linear(attn.c_attn, block.ln_1(x))  # batched: (B, 1, 3C)
            q, k, v = (t.view(b, 1, nh, c // nh).transpose(1, 2) for t in qkv.split(c, dim=2))
            ys = []
            for j, room in enumerate(rooms):  # attention over its own cache, unmasked
                n = at[j]
                layer = room.buf[i]  # (2, 1, nh, cap, hs)
                layer[0, :, :, n : n + 1] = k[j : j + 1]
                layer[1, :, :, n : n + 1] = v[j : j + 1]
                kj, vj = layer[0, :, :, : n + 1], layer[1, :, :, : n + 1]
                ys.append(F.scaled_dot_product_attention(q[j : j + 1], kj, vj))
            y = torch.cat(ys).transpose(1, 2).contiguous().view(b, 1, c)
            x = x + attn.resid_dropout(linear(attn.c_proj, y))
            mlp = block.mlp
            h = mlp.gelu(linear(mlp.c_fc, block.ln_2(x)))
            x = x + mlp.dropout(linear(mlp.c_proj, h))
        return linear(model.lm_head, tr["ln_f"](x))[:, -1], rooms
