"""The OpenAI API through the real `openai` client, unmodified (sync and async, streaming),
against a real gateway, coordinator and edge agents; results checked against the SDK's for
the same request on the same stack."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cicada import Client
from tests.gateway.assets import EMBED_DIM, expected_embeddings, words
from tests.gateway.conftest import GatewayStack

openai = pytest.importorskip("openai")

PROMPT = [5, 17, 42, 3]


def _client(gw: GatewayStack) -> object:
    # max_retries=0: a refusal must show, not be retried away.
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _sdk_tokens(gw: GatewayStack, prompt: list[int], n: int) -> tuple[list[int], list[str]]:
    with Client(gw.address, timeout=60) as sdk:
        result = sdk.invoke("gpt2", np.array([prompt], dtype=np.int64), max_new_tokens=n)
    return [int(t) for t in result.output.reshape(-1)], result.token_sources


def test_models_lists_the_served_models_with_their_readiness(gw: GatewayStack) -> None:
    models = _client(gw).models.list()
    by_id = {m.id: m for m in models.data}
    assert {"gpt2", "emb"} <= set(by_id)
    extension = by_id["gpt2"].model_extra["cicada"]
    assert extension["ready"] is True and extension["workers"]["edge"]["ready"] == 1
    assert extension["tokenizer"] is True
    assert _client(gw).models.retrieve("emb").id == "emb"


def test_completion_of_token_ids_is_what_the_sdk_generates(gw: GatewayStack) -> None:
    expected, sources = _sdk_tokens(gw, PROMPT, 6)
    done = _client(gw).completions.create(model="gpt2", prompt=PROMPT, max_tokens=6)
    choice = done.choices[0]
    extension = choice.model_extra["cicada"]
    assert extension["token_ids"] == expected
    assert extension["token_sources"] == sources == ["edge"] * 6
    assert choice.text == words(expected)  # the gateway decoded with the package's tokenizer
    assert choice.finish_reason == "length"
    assert done.usage.prompt_tokens == len(PROMPT) and done.usage.completion_tokens == 6


def test_text_prompt_is_tokenized_by_the_gateway(gw: GatewayStack) -> None:
    expected, _ = _sdk_tokens(gw, PROMPT, 4)
    done = _client(gw).completions.create(model="gpt2", prompt=words(PROMPT), max_tokens=4)
    assert done.choices[0].model_extra["cicada"]["token_ids"] == expected


def test_streamed_completion_says_who_made_each_token(gw: GatewayStack) -> None:
    expected, _ = _sdk_tokens(gw, PROMPT, 5)
    stream = _client(gw).completions.create(
        model="gpt2", prompt=PROMPT, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    ids, text, sources, finish, usage = [], "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            extension = choice.model_extra["cicada"]
            ids += extension["token_ids"]
            sources += extension["token_sources"]
            text += choice.text
            finish = choice.finish_reason or finish
            if extension["token_ids"]:
                assert extension["served_by"]["role"] in ("edge", "cloud")
    assert ids == expected and sources == ["edge"] * 5
    assert text == words(expected) and finish == "length"
    assert usage is not None and usage.completion_tokens == 5


def test_async_client_streams_and_completes_concurrently(gw: GatewayStack) -> None:
    expected, _ = _sdk_tokens(gw, PROMPT, 3)

    async def run() -> tuple[list[list[int]], list[int]]:
        async with openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60
        ) as client:
            plain = await asyncio.gather(*(
                client.completions.create(model="gpt2", prompt=PROMPT, max_tokens=3)
                for _ in range(4)
            ))  # fmt: skip
            streamed: list[int] = []
            async for chunk in await client.completions.create(
                model="gpt2", prompt=PROMPT, max_tokens=3, stream=True
            ):
                for choice in chunk.choices:
                    streamed += choice.model_extra["cicada"]["token_ids"]
        return [c.choices[0].model_extra["cicada"]["token_ids"] for c in plain], streamed

    plain, streamed = asyncio.run(run())
    assert plain == [expected] * 4 and streamed == expected


def test_leaving_a_stream_early_withdraws_the_request(gw: GatewayStack) -> None:
    before = gw.stack.status()["dropped"].get("cancelled", 0)
    stream = _client(gw).completions.create(model="paced", prompt=PROMPT, max_tokens=40,
                                            stream=True)  # fmt: skip
    first = next(iter(stream))  # 40 tokens take 8 s at this agent's pace: far from done
    assert first.choices[0].model_extra["cicada"]["token_ids"]
    stream.close()  # the HTTP connection closes; the gateway CANCELs at the coordinator
    gw.stack.wait_for(
        lambda s: s["dropped"].get("cancelled", 0) > before,
        what="the coordinator counting the stream as cancelled",
        timeout=30,
    )


def test_embeddings_of_text_and_of_token_ids(gw: GatewayStack) -> None:
    client = _client(gw)
    sentences = [words([1, 2, 3]), words([40, 41])]
    # Left unsaid, the openai client asks for base64 and decodes it itself.
    for fmt in (openai.NOT_GIVEN, "float"):
        done = client.embeddings.create(model="emb", input=sentences, encoding_format=fmt)
        got = np.array([d.embedding for d in done.data], dtype=np.float32)
        # The agent tokenized the text (pad 0 to the longest): the same ids, in numpy.
        ids = np.array([[1, 2, 3], [40, 41, 0]])
        np.testing.assert_allclose(got, expected_embeddings(ids), atol=1e-5)
        assert got.shape == (2, EMBED_DIM) and done.usage.prompt_tokens == 5
    by_ids = client.embeddings.create(model="emb", input=[7, 8, 9], encoding_format="float")
    np.testing.assert_allclose(
        by_ids.data[0].embedding, expected_embeddings(np.array([[7, 8, 9]]))[0], atol=1e-5
    )


def test_errors_come_in_openai_shape_with_their_status(gw: GatewayStack) -> None:
    client = _client(gw)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert missing.value.status_code == 404
    assert missing.value.body["code"] == "model_not_found"
    assert "no-such-model" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="gpt2", prompt=[1, 2], max_tokens=0)
    assert bad.value.body["param"] == "max_tokens" and bad.value.body["type"] == (
        "invalid_request_error"
    )
    with pytest.raises(openai.BadRequestError) as too_long:  # past the model's 64-token context
        client.completions.create(model="gpt2", prompt=[1] * 60, max_tokens=10)
    assert "context" in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # logits are not embeddings
        client.embeddings.create(model="gpt2", input=[1, 2], encoding_format="float")


def test_an_exact_stream_sends_only_text_that_stands(gw: GatewayStack) -> None:
    """`exact: true` (an extra body field): with no cloud worker the edge's tokens are all
    provisional, so the OpenAI deltas carry no text until the end, and the concatenated text
    is exactly the final one; the extension shows each provisional token and the text as it
    stands, and the last chunk says the result is not exact."""
    expected, _ = _sdk_tokens(gw, PROMPT, 5)
    stream = _client(gw).completions.create(
        model="gpt2", prompt=PROMPT, max_tokens=5, stream=True, extra_body={"exact": True},
    )  # fmt: skip
    text, shown, generation = "", [], None
    for chunk in stream:
        for choice in chunk.choices:
            extension = choice.model_extra["cicada"]
            text += choice.text
            if extension["token_ids"]:
                assert extension["provisional"] is True and choice.text == ""
                assert extension["position"] == len(shown)
                shown.append(extension["text"])
            generation = extension.get("generation", generation)
    assert text == words(expected)
    assert shown == [words(expected[: i + 1]) for i in range(5)]
    assert generation == {"exact": False, "kept": 5, "rewound": 0}
    done = _client(gw).completions.create(model="gpt2", prompt=PROMPT, max_tokens=5,
                                          extra_body={"exact": True})  # fmt: skip
    assert done.choices[0].model_extra["cicada"]["generation"]["exact"] is False
    assert done.choices[0].text == words(expected)
