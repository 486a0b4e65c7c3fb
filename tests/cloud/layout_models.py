"""Models whose constructed layout the CUDA loader must not trust blindly (factories for
tests/cloud/test_cuda_source.py, importable as ``tests.cloud.layout_models:build_xxx``)."""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 8


class Strided(nn.Module):
    """Its weight is a transposed view: a non-contiguous parameter as constructed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(WIDTH // 2, WIDTH).t())  # (WIDTH, WIDTH/2)
        self.bias = nn.Parameter(torch.empty(WIDTH // 2))
        nn.init.normal_(self.weight)
        nn.init.normal_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias  # (batch, WIDTH/2)


class Pair(nn.Module):
    """Two linears that share a weight only if `tie` (the constructor may leave them apart)."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.a = nn.Linear(WIDTH, WIDTH)
        self.b = nn.Linear(WIDTH, WIDTH)
        if tie:
            self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def build_strided(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Strided().eval()


def build_pair(tie: bool = False, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Pair(tie).eval()


def example_input() -> torch.Tensor:
    return torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1))
