"""Greedy generation: option parsing, the loop's stopping rules, and the cached decoders agree
with a plain recompute of the whole sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cicada.cloud.generate import context_of, decoder_for
from cicada.common.generation import (
    MAX_NEW_TOKENS,
    GenerationError,
    GenerationRequest,
    RecomputeDecoder,
    generate,
)
from tests.generation_assets import sharp_gpt2


def prompt(*ids: int) -> list[np.ndarray]:
    return [np.asarray([ids], dtype=np.int64)]


class Counter:
    """A decoder whose next token is the last one plus one: the loop is what is tested."""

    def start(self, ids: np.ndarray) -> int:
        return int(ids[-1]) + 1

    def advance(self, token: int) -> int:
        return token + 1


@pytest.mark.parametrize(
    ("options", "inputs", "why"),
    [
        ({}, prompt(1), "max_new_tokens"),
        ({"max_new_tokens": 0}, prompt(1), "max_new_tokens"),
        ({"max_new_tokens": MAX_NEW_TOKENS + 1}, prompt(1), "max_new_tokens"),
        ({"max_new_tokens": True}, prompt(1), "max_new_tokens"),
        ({"max_new_tokens": 2, "eos_token_id": -1}, prompt(1), "eos_token_id"),
        ({"max_new_tokens": 2}, [], "one input"),
        ({"max_new_tokens": 2}, prompt(1) * 2, "one input"),
        ({"max_new_tokens": 2}, [np.zeros((2, 3), np.int64)], "shape"),
        ({"max_new_tokens": 2}, [np.zeros((1, 0), np.int64)], "shape"),
        ({"max_new_tokens": 2}, [np.zeros((1, 3), np.int32)], "int64"),
    ],
)
def test_bad_generation_requests_say_what_is_wrong(
    options: dict[str, object], inputs: list[np.ndarray], why: str
) -> None:
    with pytest.raises(GenerationError, match=why):
        GenerationRequest.parse(options, inputs)


def test_prompt_and_tokens_must_fit_the_model() -> None:
    request = GenerationRequest.parse({"max_new_tokens": 10}, prompt(1, 2, 3))
    request.check_fits(context=13, vocab=4)
    with pytest.raises(GenerationError, match="context of 12"):
        request.check_fits(context=12, vocab=None)
    with pytest.raises(GenerationError, match=r"0\.\.2"):
        request.check_fits(context=None, vocab=3)


def test_the_loop_stops_at_length_eos_cancel_and_deadline() -> None:
    emitted: list[int] = []
    out = generate(Counter(), GenerationRequest.parse({"max_new_tokens": 4}, prompt(5)),
                   emitted.append)  # fmt: skip
    assert (out.tokens, out.stopped, emitted) == ([6, 7, 8, 9], "length", [6, 7, 8, 9])

    eos = GenerationRequest.parse({"max_new_tokens": 10, "eos_token_id": 7}, prompt(5))
    out = generate(Counter(), eos, lambda t: None)
    assert (out.tokens, out.stopped) == ([6, 7], "eos")

    flag = {"cancel": False}

    def emit(token: int) -> None:
        flag["cancel"] = token >= 8

    out = generate(Counter(), GenerationRequest.parse({"max_new_tokens": 10}, prompt(5)), emit,
                   lambda: flag["cancel"])  # fmt: skip
    assert (out.tokens, out.stopped) == ([6, 7, 8], "cancelled")

    out = generate(Counter(), GenerationRequest.parse({"max_new_tokens": 10}, prompt(5)),
                   lambda t: None, deadline=0.0)  # fmt: skip
    assert (out.tokens, out.stopped) == ([6], "deadline")


def test_kv_cache_decoding_matches_recomputing_the_sequence() -> None:
    model = sharp_gpt2()
    request = GenerationRequest.parse({"max_new_tokens": 40}, prompt(3, 14, 15, 92, 6))
    assert context_of(model) == (512, 97)

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids)).numpy()

    cached = generate(decoder_for(model), request, lambda t: None).tokens
    recomputed = generate(RecomputeDecoder(logits), request, lambda t: None).tokens
    assert cached == recomputed
    assert len(set(cached)) > 5  # the weights are sharp enough for the sequence to vary


def sharp_hf_gpt2(seed: int) -> Any:
    """A tiny transformers GPT2LMHeadModel with weights scaled up (see tests/generation_assets)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=61,
                                     n_positions=64)  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20.0)
    return model


def greedy_reference(model: Any, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        x = torch.tensor([ids])  # (an explicit mask: generate() would take id 0 for padding)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    return [int(t) for t in out[0, len(ids) :]]


def test_transformers_causal_lm_decodes_as_its_own_generate() -> None:
    model = sharp_hf_gpt2(seed=0)
    request = GenerationRequest.parse({"max_new_tokens": 12}, prompt(1, 2, 3, 4))
    ours = generate(decoder_for(model), request, lambda t: None).tokens
    assert ours == greedy_reference(model, [1, 2, 3, 4], 12)
    assert context_of(model) == (64, 61)


def test_a_packed_transformers_decoder_generates_with_its_cache(tmp_path: Path) -> None:
    """A model from `cicada pack --transformers` (its forward hook returns bare logits) still
    hands its cache to the decoder, and decodes exactly as the library's generate()."""
    reference = sharp_hf_gpt2(seed=1)
    from cicada.cloud.hub import load_transformers_dir

    reference.save_pretrained(tmp_path)
    packed, _, _ = load_transformers_dir(tmp_path)
    with torch.inference_mode():
        assert isinstance(packed(torch.tensor([[1, 2]])), torch.Tensor)  # the hook's logits
    expected = greedy_reference(reference, [7, 8, 9], 10)
    request = GenerationRequest.parse({"max_new_tokens": 10}, prompt(7, 8, 9))
    assert generate(decoder_for(packed), request, lambda t: None).tokens == expected


def test_limits_are_read_from_flat_and_nested_configs() -> None:
    from cicada.common.generation import limits_of

    assert limits_of({"block_size": 64, "vocab_size": 97, "n_layer": 1}) == (64, 97)
    nested = {"class_name": "GPT2LMHeadModel", "config": {"n_positions": 512, "vocab_size": 61}}
    assert limits_of(nested) == (512, 61)
    assert limits_of({"config": {"max_position_embeddings": 128}}) == (128, None)
    assert limits_of({"layers": [1, 1]}) == (None, None)
