"""Tests for the reference models in cloud/models (tiny configs unless marked slow)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn as nn

from cicada.cloud.models import bert, gpt2, resnet

MODELS = [gpt2, bert, resnet]
IDS = ["gpt2", "bert", "resnet"]
models = pytest.mark.parametrize("mod", MODELS, ids=IDS)


def _input(mod: ModuleType, cfg: dict[str, Any], batch: int = 2) -> torch.Tensor:
    if mod is resnet:
        return resnet.example_input(cfg, batch=batch, size=64)
    x: torch.Tensor = mod.example_input(cfg, batch=batch)
    return x


def _expected_shape(mod: ModuleType, cfg: dict[str, Any], x: torch.Tensor) -> tuple[int, ...]:
    if mod is gpt2:
        return (x.shape[0], x.shape[1], cfg["vocab_size"])
    if mod is bert:
        return (x.shape[0], x.shape[1], cfg["hidden_size"])
    return (x.shape[0], cfg["num_classes"])


@models
def test_same_seed_same_weights(mod: ModuleType) -> None:
    a = mod.build(**mod.tiny_config()).state_dict()
    b = mod.build(**mod.tiny_config()).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@models
def test_different_seed_different_weights(mod: ModuleType) -> None:
    a = mod.build(**mod.tiny_config(), seed=0).state_dict()
    b = mod.build(**mod.tiny_config(), seed=1).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


@models
def test_build_leaves_global_rng_alone(mod: ModuleType) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    mod.build(**mod.tiny_config())
    assert torch.equal(torch.rand(4), expected)


@models
def test_forward_shape_dtype(mod: ModuleType) -> None:
    cfg = mod.tiny_config()
    model = mod.build(**cfg)
    assert not model.training
    x = _input(mod, cfg)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == _expected_shape(mod, cfg, x)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@models
def test_example_input_deterministic(mod: ModuleType) -> None:
    cfg = mod.tiny_config()
    assert torch.equal(_input(mod, cfg), _input(mod, cfg))
    if mod is not resnet:
        x = mod.example_input(cfg, batch=3, seed=5)
        assert x.dtype == torch.int64 and x.shape == (3, 32)


@models
def test_unknown_config_key_raises(mod: ModuleType) -> None:
    with pytest.raises(TypeError, match="bogus_key"):
        mod.build(**mod.tiny_config(), bogus_key=1)


_INIT_FNS = [
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
]
_SENTINEL = 7.0


@models
def test_all_params_initialised_only_through_nn_init(
    mod: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mimic the loader: patch torch.nn.init so Parameters get a sentinel. Any Parameter not
    # holding the sentinel afterwards was written by something other than nn.init.
    def patched(orig: Callable[..., Any]) -> Callable[..., Any]:
        def fn(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if isinstance(tensor, nn.Parameter):
                with torch.no_grad():
                    return tensor.fill_(_SENTINEL)
            return orig(tensor, *args, **kwargs)

        return fn

    for name in _INIT_FNS:
        monkeypatch.setattr(torch.nn.init, name, patched(getattr(torch.nn.init, name)))
    model = mod.build(**mod.tiny_config())
    for name, p in model.named_parameters():
        assert (p == _SENTINEL).all(), name


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            yield name, m


@models
def test_registration_order_is_execution_order(mod: ModuleType) -> None:
    cfg = mod.tiny_config()
    model = mod.build(**cfg)
    names = {m: n for n, m in _leaf_modules(model)}
    first_use: list[str] = []

    def hook(m: nn.Module, _args: Any) -> None:
        if names[m] not in first_use:
            first_use.append(names[m])

    for m in names:
        m.register_forward_pre_hook(hook)
    with torch.inference_mode():
        x = _input(mod, cfg)
        # the BERT pooler only runs in pooled_output
        model.pooled_output(x) if mod is bert else model(x)
    assert first_use == list(names.values())


def test_gpt2_weight_tying() -> None:
    model = gpt2.build(**gpt2.tiny_config())
    wte = model.transformer["wte"]
    assert isinstance(wte, nn.Embedding)
    assert wte.weight is model.lm_head.weight
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_gpt2_non_persistent_buffer() -> None:
    model = gpt2.build(**gpt2.tiny_config())
    assert "pos_ids" in dict(model.named_buffers())
    assert not any(k.endswith("pos_ids") for k in model.state_dict())
    assert torch.equal(model.pos_ids, torch.arange(gpt2.tiny_config()["block_size"]))


def test_gpt2_is_causal() -> None:
    cfg = gpt2.tiny_config()
    model = gpt2.build(**cfg)
    x = gpt2.example_input(cfg)
    x2 = x.clone()
    x2[0, -1] = (x2[0, -1] + 1) % cfg["vocab_size"]  # change only the last token
    with torch.inference_mode():
        y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, :-1], y2[:, :-1])
    assert not torch.allclose(y[:, -1], y2[:, -1])


def test_bert_buffer_and_pooler() -> None:
    cfg = bert.tiny_config()
    model = bert.build(**cfg)
    sd = model.state_dict()
    assert "embeddings.position_ids" in dict(model.named_buffers())
    assert "embeddings.position_ids" not in sd
    assert "pooler.dense.weight" in sd and "pooler.dense.bias" in sd
    x = bert.example_input(cfg, batch=2)
    with torch.inference_mode():
        pooled = model.pooled_output(x)
    assert pooled.shape == (2, cfg["hidden_size"])
    assert pooled.abs().max() <= 1.0  # tanh


def test_resnet_running_stats_are_random() -> None:
    sd = resnet.build(**resnet.tiny_config()).state_dict()
    means = [v for k, v in sd.items() if k.endswith("running_mean")]
    variances = [v for k, v in sd.items() if k.endswith("running_var")]
    assert means and len(means) == len(variances)
    assert any(bool(m.ne(0).any()) for m in means)
    assert any(bool(v.ne(1).any()) for v in variances)
    assert all(bool((v > 0).all()) for v in variances)
    assert any(k.endswith("num_batches_tracked") for k in sd)


def test_resnet_children_order() -> None:
    model = resnet.build(**resnet.tiny_config())
    assert [n for n, _ in model.named_children()] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "avgpool",
        "fc",
    ]


def _unique_param_count(model: nn.Module) -> int:
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mod", "expected"),
    [(gpt2, 354.8e6), (bert, 109.48e6), (resnet, 25.557e6)],
    ids=IDS,
)
def test_full_size_param_count(mod: ModuleType, expected: float) -> None:
    # meta tensors: the full-size structure without allocating or initialising real weights
    with torch.device("meta"):
        model = mod.build()
    assert abs(_unique_param_count(model) - expected) / expected < 0.01
