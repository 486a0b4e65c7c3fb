"""Small model factories for the stage-detection and packaging tests.

Each factory is importable as ``tests.cloud.toy_models:build_xxx`` (run `cicada` with
cwd = the repository root), takes only JSON-able keyword arguments, and is seeded, so two
builds with the same config hold identical weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IN_FEATURES = 8
OUT_FEATURES = 4


def _seeded(seed: int, make: Any) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = make()
    return model.eval()


def example_input(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """float32 (batch, IN_FEATURES), the input every toy model takes."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, IN_FEATURES, generator=gen, dtype=torch.float32)


# -- sequential ------------------------------------------------------------------------------


def build_mlp(width: int = 16, seed: int = 0) -> nn.Module:
    """An nn.Sequential: stages are the children that hold tensors (0, 2, 4)."""
    return _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Linear(IN_FEATURES, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, OUT_FEATURES),
        ),
    )


# -- declared --------------------------------------------------------------------------------


class Declared(nn.Module):
    """Declares two stages where child detection would find three (embed, body, head)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, width)
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.head = nn.Linear(width, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(self.embed(x)))
        return out

    def cicada_stages(self) -> list[tuple[str, list[str]]]:
        return [("front", ["embed", "body"]), ("back", ["head"])]


class DeclaredMissing(Declared):
    """Forgets `head` in its declaration: head.weight and head.bias belong to no stage."""

    def cicada_stages(self) -> list[tuple[str, list[str]]]:
        return [("front", ["embed"]), ("middle", ["body"])]


class DeclaredNested(Declared):
    """One stage claims the root, another a module inside it: the longest path wins."""

    def cicada_stages(self) -> list[tuple[str, list[str]]]:
        return [("embed", ["embed"]), ("rest", [""])]


def build_declared(width: int = 16, seed: int = 0) -> nn.Module:
    return _seeded(seed, lambda: Declared(width))


def build_declared_missing(width: int = 16, seed: int = 0) -> nn.Module:
    return _seeded(seed, lambda: DeclaredMissing(width))


def build_declared_nested(width: int = 16, seed: int = 0) -> nn.Module:
    return _seeded(seed, lambda: DeclaredNested(width))


# -- whole -----------------------------------------------------------------------------------


class Flat(nn.Module):
    """Every parameter is a direct attribute of the root: no submodule to cut at."""

    scale: torch.Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(IN_FEATURES, width) * 0.3)
        self.b1 = nn.Parameter(torch.randn(width) * 0.1)
        self.w2 = nn.Parameter(torch.randn(width, OUT_FEATURES) * 0.3)
        self.b2 = nn.Parameter(torch.randn(OUT_FEATURES) * 0.1)
        self.register_buffer("scale", torch.rand(OUT_FEATURES) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(x @ self.w1 + self.b1)
        out: torch.Tensor = (hidden @ self.w2 + self.b2) * self.scale
        return out


def build_flat(width: int = 16, seed: int = 0) -> nn.Module:
    return _seeded(seed, lambda: Flat(width))


# -- a model that refuses some rows (the cloud worker's batch fallback) -----------------------

POISON = 1000.0  # a first feature this large is refused


class Picky(nn.Module):
    """An MLP that raises ValueError when any row's first feature is POISON or more, as a model
    refuses inputs it cannot handle: run in a batch, one such row fails the whole forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, width)
        self.fc2 = nn.Linear(width, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] >= POISON).any()):
            raise ValueError("a row this model refuses")
        return self.fc2(torch.relu(self.fc1(x)))


def build_picky(width: int = 16, seed: int = 0) -> nn.Module:
    return _seeded(seed, lambda: Picky(width))
