"""A cloud worker's verification of a draft (an exact takeover, docs/PROTOCOL.md section 12):
one prefill of prompt + draft, the longest agreeing prefix kept, then the model's own decode.
Whatever the draft, the tokens that stand plus those decoded after must be the model's own
greedy decode of the prompt, token for token, on both of the worker's generation paths (one
at a time, cloud/generate.py; continuous batching, cloud/continuous.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cicada.cloud.continuous import DecodeStream, Streams
from cicada.cloud.generate import CachedGPTDecoder, verify
from cicada.common.generation import GenerationRequest, accept, generate
from tests.generation_assets import sharp_gpt2

MODEL = sharp_gpt2()


def decoder() -> CachedGPTDecoder:
    return CachedGPTDecoder(MODEL.decode, MODEL, "cpu", MODEL.decode)


def cases(count: int) -> list[tuple[np.ndarray, int, float]]:
    rng = np.random.default_rng(7)
    return [
        (rng.integers(0, 97, size=int(rng.integers(1, 12))), int(rng.integers(1, 40)),
         float(rng.random()))
        for _ in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("prompt, n, agree", cases(16))
def test_verified_drafts_give_the_models_own_decode(prompt: np.ndarray, n: int,
                                                    agree: float) -> None:  # fmt: skip
    expected = generate(decoder(), GenerationRequest(prompt, n), lambda t: None).tokens
    rng = np.random.default_rng(n)
    k = int(rng.integers(0, n + 1))
    good = int(agree * k)
    # The model's own first `good` tokens, then tokens that may or may not agree.
    draft = expected[:good] + [int(t) for t in rng.integers(0, 97, size=k - good)]
    agreeing = next((i for i in range(k) if draft[i] != expected[i]), k)
    request = GenerationRequest(prompt, n, None, tuple(draft))

    d = decoder()
    v, first = verify(d, request)
    assert v.accepted == agreeing and v.done == (agreeing == n)
    tokens = draft[: v.accepted]
    if first is not None:
        tokens += generate(d, request.continued(v.accepted), lambda t: None, first=first).tokens
    assert tokens == expected

    got: list[int] = []
    verdicts: list[int] = []
    streams = Streams(MODEL, limit=4)
    streams.start(DecodeStream(request, got.append, verdict=verdicts.append))
    while streams.active:
        streams.step()
    assert verdicts == [agreeing] and draft[:agreeing] + got == expected


def test_a_near_tie_or_an_eos_ends_what_is_accepted() -> None:
    logits = np.zeros((4, 5), dtype=np.float32)
    logits[:, 2] = 10.0  # the model picks 2 everywhere, surely
    assert accept(logits, [2, 2, 2], None) == (3, True)
    assert accept(logits, [2, 3, 2], None) == (1, True)  # disagrees at 1
    assert accept(logits, [2, 2, 2], 2) == (1, True)  # nothing is accepted past an eos
    logits[1, 4] = 10.0 - 1e-6  # position 1: a near tie between 2 and 4
    assert accept(logits, [2, 2, 2], None) == (1, False)  # not accepted, and not sure


def test_a_transformers_model_verifies_drafts_too() -> None:
    """A transformers causal LM (cloud/generate.py `HFCausalDecoder`): one forward for the
    verdict, then a prefill of what stands; the result is its own greedy decode."""
    transformers = pytest.importorskip("transformers")
    import torch

    from cicada.cloud.generate import HFCausalDecoder

    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=61,
                                     n_positions=128)  # fmt: skip
    torch.manual_seed(4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.mul_(12.0)
    for prompt, n, agree in cases(4):
        prompt = prompt % 61
        expected = generate(HFCausalDecoder(model, "cpu", model), GenerationRequest(prompt, n),
                            lambda t: None).tokens  # fmt: skip
        k = n // 2
        good = int(agree * k)
        draft = expected[:good] + [(t + 1) % 61 for t in expected[good:k]]
        request = GenerationRequest(prompt, n, None, tuple(draft))
        d = HFCausalDecoder(model, "cpu", model)
        v, first = verify(d, request)
        assert v.accepted == good
        tokens = draft[:good]
        if first is not None:
            tokens += generate(d, request.continued(good), lambda t: None, first=first).tokens
        assert tokens == expected
