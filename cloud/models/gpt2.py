"""GPT-2 reference model (nanoGPT style), GPT-2 medium by default.

Weights are a fixed-seed random init, not a pretrained checkpoint: what matters to Cicada is the
shape of the network (stage split, bytes per stage), and a seeded init makes every build identical.

Contract with the loader and the stage detector:
- every Parameter is initialised by a `torch.nn.init` function looked up at call time, so a
  loader that patches those functions skips all of the init work;
- modules are registered in the order the forward first uses them;
- `pos_ids` is a non-persistent buffer: absent from the state dict, rebuilt by the constructor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from cicada.cloud.few_rows import row_linear


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in its Linears and LayerNorms
    seed: int = 0


def _call(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, layer(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        # key, query, value projections for all heads, in one batched matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # attention-probability dropout happens inside scaled_dot_product_attention
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        hs = C // self.n_head
        # A cached one-token step: its linears compute each row as a verify forward over
        # several rows does (cloud/few_rows.py), so speculative verification is bit-exact.
        step = cache is not None and cache.k is not None
        linear = row_linear if step else _call
        q, k, v = linear(self.c_attn, x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        causal = True
        if cache is not None:
            if cache.k is not None and cache.v is not None:
                # Decoding one token past a cached prefix: it may attend to everything.
                assert T == 1, "a cached step takes exactly one new token"
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
                causal = False
            cache.k, cache.v = k, v
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble the heads
        return cast(torch.Tensor, self.resid_dropout(linear(self.c_proj, y)))  # (B, T, C)

    def step(
        self, x: torch.Tensor, past: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over `past` (2, B, nh, P, hs) and `x`'s own keys, with an explicit mask;
        returns the output and the keys and values with `x`'s appended (2, B, nh, P+T, hs)."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = torch.cat([past[0], k.view(B, T, self.n_head, hs).transpose(1, 2)], dim=2)
        v = torch.cat([past[1], v.view(B, T, self.n_head, hs).transpose(1, 2)], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), torch.stack([k, v])


@dataclass
class LayerCache:
    """One block's keys and values so far, (B, nh, T, hs) each: a KV cache for decoding."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 was trained with the tanh approximation ("gelu_new" in Hugging Face)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, step: bool = False) -> torch.Tensor:
        linear = row_linear if step else _call  # step: a cached one-token step
        x = self.gelu(linear(self.c_fc, x))  # (B, T, 4C)
        return cast(torch.Tensor, self.dropout(linear(self.c_proj, x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        step = cache is not None and cache.k is not None  # before attn extends the cache
        x = x + self.attn(self.ln_1(x), cache)  # (B, T, C), pre-LayerNorm residual
        x = x + self.mlp(self.ln_2(x), step)  # (B, T, C)
        return x

    def step(
        self, x: torch.Tensor, past: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, kv = self.attn.step(self.ln_1(x), past, mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    pos_ids: torch.Tensor  # (block_size,) non-persistent buffer

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.vocab_size > 0 and config.block_size > 0
        self.config = config
        # Positions 0..block_size-1, sliced in forward. Non-persistent: it is derived from the
        # config, so checkpoints do not carry it and the loader must rebuild it.
        self.register_buffer("pos_ids", torch.arange(config.block_size), persistent=False)

        wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.transformer = nn.ModuleDict(
            dict(
                wte=wte,
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the token embedding and the output projection are ONE Parameter object.
        # named_parameters() reports it once, as transformer.wte.weight (registered first);
        # state_dict() still has both keys.
        wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale the init of residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T)."""
        return self.decode(idx)

    def decode(
        self, idx: torch.Tensor, cache: list[LayerCache] | None = None, start: int = 0
    ) -> torch.Tensor:
        """Logits for `idx` (B, T). With `cache` (one LayerCache per block), keys and values
        are kept for the next call: prefill with start=0, then one token at position `start`."""
        _, t = idx.size()  # idx: (B, T) int64 token ids
        assert start + t <= self.config.block_size, (
            f"sequence length {start + t} exceeds block_size {self.config.block_size}"
        )
        tr = self.transformer
        pos = self.pos_ids[start : start + t]  # (T,)
        tok_emb = tr["wte"](idx)  # (B, T, C)
        pos_emb = tr["wpe"](pos)  # (T, C), broadcast over the batch
        x = tr["drop"](tok_emb + pos_emb)  # (B, T, C)
        for i, block in enumerate(cast(nn.ModuleList, tr["h"])):
            x = block(x) if cache is None else block(x, cache[i])  # (B, T, C)
        x = tr["ln_f"](x)  # (B, T, C)
        step = cache is not None and start > 0  # a cached one-token step
        return row_linear(self.lm_head, x) if step else _call(self.lm_head, x)  # (B, T, V)

    def step(self, idx: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for `idx` (B, T) following `past`, the keys and values of the P tokens
        before it, (n_layer, 2, B, nh, P, hs) with P >= 0; returns them with `idx`'s appended.
        One tensor-in, tensor-out graph for the prefill and every decoding step: what an
        exported edge decoder with a cache needs (cloud/export_edge.py)."""
        t = idx.size(1)
        tr = self.transformer
        pos = torch.arange(t, device=idx.device) + past.size(4)  # absolute positions
        x = tr["drop"](tr["wte"](idx) + tr["wpe"](pos))
        # Query at position p may see keys 0..p: the past and its own prefix.
        mask = torch.arange(past.size(4) + t, device=idx.device)[None, :] <= pos[:, None]
        presents = []
        for i, block in enumerate(cast(nn.ModuleList, tr["h"])):
            x, kv = cast(Block, block).step(x, past[i], mask)
            presents.append(kv)
        return cast(torch.Tensor, self.lm_head(tr["ln_f"](x))), torch.stack(presents)

    def empty_past(self, batch: int = 1) -> torch.Tensor:
        c = self.config
        return torch.zeros(c.n_layer, 2, batch, c.n_head, 0, c.n_embd // c.n_head)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in range(self.config.n_layer)]


def _make_config(config: Mapping[str, Any]) -> GPTConfig:
    known = [f.name for f in dataclasses.fields(GPTConfig)]
    for key in config:
        if key not in known:
            raise TypeError(f"unknown GPT-2 config key {key!r}; known keys: {', '.join(known)}")
    return GPTConfig(**config)


def build(**config: Any) -> GPT:
    """Build a GPT-2 in eval mode; the same config (seed included) gives identical weights."""
    cfg = _make_config(config)
    # fork_rng: seed deterministically without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT(cfg)
    return model.eval()


def tiny_config() -> dict[str, Any]:
    """Same structure, small enough for unit tests."""
    return dict(n_layer=2, n_head=2, n_embd=64, vocab_size=97, block_size=64)


def example_input(config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids of shape (batch, min(32, block_size)), dtype int64."""
    cfg = _make_config(config)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t = min(32, cfg.block_size)
    return torch.randint(0, cfg.vocab_size, (batch, t), generator=gen, dtype=torch.int64)
