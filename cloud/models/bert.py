"""BERT encoder reference model (nanoGPT style), BERT-base by default.

Weights are a fixed-seed random init, not a pretrained checkpoint. Config field names follow
Hugging Face's BertConfig so sizes can be copied across.

Contract with the loader and the stage detector:
- every Parameter is initialised by a `torch.nn.init` function looked up at call time, so a
  loader that patches those functions skips all of the init work;
- modules are registered in the order they are first used (the pooler comes last and is used
  by `pooled_output`);
- `embeddings.position_ids` is a non-persistent buffer, as in Hugging Face.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    seed: int = 0


class Embeddings(nn.Module):
    position_ids: torch.Tensor  # (max_position_embeddings,) non-persistent buffer

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Derived from the config, so not saved in checkpoints (persistent=False, like HF).
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings), persistent=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1)
        pos = self.position_ids[:t]  # (T,)
        # forward takes a single tensor, so every token is segment A (token type 0)
        token_types = torch.zeros_like(input_ids)  # (B, T)
        x = self.word_embeddings(input_ids)  # (B, T, H)
        x = x + self.position_embeddings(pos)  # (B, T, H), broadcast over the batch
        x = x + self.token_type_embeddings(token_types)  # (B, T, H)
        return cast(torch.Tensor, self.dropout(self.ln(x)))  # (B, T, H)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention plus its output projection."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        assert h % config.num_attention_heads == 0, "hidden_size must divide into heads"
        self.qkv = nn.Linear(h, 3 * h)  # query, key, value for all heads in one matmul
        self.proj = nn.Linear(h, h)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.n_head = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.size()
        hs = H // self.n_head
        q, k, v = self.qkv(x).split(H, dim=2)  # 3 x (B, T, H)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # no mask: every input is one full-length sequence without padding
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, H)  # (B, T, H)
        return cast(torch.Tensor, self.dropout(self.proj(y)))  # (B, T, H)


class MLP(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.gelu = nn.GELU()  # exact erf GELU, as in the original BERT
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.fc(x))  # (B, T, I)
        return cast(torch.Tensor, self.dropout(self.proj(x)))  # (B, T, H)


class Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x))  # (B, T, H), post-LayerNorm residual as in BERT
        x = self.ln_2(x + self.mlp(x))  # (B, T, H)
        return x


class Pooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first = hidden[:, 0]  # (B, H): the [CLS] position
        return cast(torch.Tensor, self.activation(self.dense(first)))  # (B, H)


class Bert(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        # registered after the layers because it runs after them (see pooled_output)
        self.pooler = Pooler(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1)  # input_ids: (B, T) int64
        assert t <= self.config.max_position_embeddings, (
            f"sequence length {t} exceeds max_position_embeddings "
            f"{self.config.max_position_embeddings}"
        )
        x = self.embeddings(input_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x)  # (B, T, H)
        return x  # (B, T, H): last hidden state

    def pooled_output(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BERT's pooled [CLS] representation, (B, H)."""
        return cast(torch.Tensor, self.pooler(self(input_ids)))  # (B, H)


def _make_config(config: Mapping[str, Any]) -> BertConfig:
    known = [f.name for f in dataclasses.fields(BertConfig)]
    for key in config:
        if key not in known:
            raise TypeError(f"unknown BERT config key {key!r}; known keys: {', '.join(known)}")
    return BertConfig(**config)


def build(**config: Any) -> Bert:
    """Build a BERT encoder in eval mode; the same config (seed included) gives the same weights."""
    cfg = _make_config(config)
    # fork_rng: seed deterministically without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Bert(cfg)
    return model.eval()


def tiny_config() -> dict[str, Any]:
    """Same structure, small enough for unit tests."""
    return dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=101,
        max_position_embeddings=64,
    )


def example_input(config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids of shape (batch, min(32, max_position_embeddings)), dtype int64."""
    cfg = _make_config(config)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t = min(32, cfg.max_position_embeddings)
    return torch.randint(0, cfg.vocab_size, (batch, t), generator=gen, dtype=torch.int64)
