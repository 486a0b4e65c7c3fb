"""The OpenAI API: GET /v1/models[/{model}], POST /v1/embeddings, POST /v1/completions
(`stream: true` as server-sent events, one chunk per generated token).

Cicada's additions ride in extension fields that OpenAI clients keep and ignore: each choice
(and each streamed chunk's choice) carries `cicada: {token_ids, token_sources, served_by}`,
who made each token, edge or cloud. `exact: true` in a completion's body asks for the cloud
model's own greedy decode (docs/PROTOCOL.md section 12): a streamed chunk's `text` then carries
only tokens that stand, so an OpenAI client's concatenated text is exactly the final text; the
edge's provisional tokens and the takeover's rewind ride in the extension (`position`,
`provisional`, `rewind`, and `text`: the whole text as it stands, for a page to re-render).
Generation is greedy (`temperature`, `top_p` and the other
sampling fields are accepted and have no effect); docs/GATEWAY.md says what is refused.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cicada.client import AsyncTokenStream, InvokeResult, Piece, TokenSequence
from cicada.common.defaults import MAX_NEW_TOKENS
from cicada.common.protocol import MAX_TOKEN_ID
from cicada.common.text import MAX_TEXTS
from cicada.errors import CallError
from cicada.gateway import jsonio
from cicada.gateway.errors import bad_request, from_call_error, unknown_model
from cicada.gateway.jsonio import JsonResponse
from cicada.gateway.requests import Admission, admission, parse_json, read_body
from cicada.gateway.service import Gateway, gateway, sdk_errors
from cicada.gateway.text import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
EXTENSION = "cicada"
# Fields with no Cicada meaning that would change the answer: refused unless left at default.
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
                "stop": None}  # fmt: skip


def routes() -> list[Route]:
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


# -- models -------------------------------------------------------------------------------------


async def _model_entry(gw: Gateway, name: str) -> dict[str, Any]:
    snapshot = await gw.catalog.snapshot()
    known = gw.catalog.dirs.get(name)
    extension: dict[str, Any] = {"ready": await gw.catalog.ready(name)}
    if snapshot is not None and snapshot.error is None:
        extension["workers"] = snapshot.describe(name)
    if known is not None:
        extension["tokenizer"] = known.tokenizer is not None
        extension["context"] = known.context
    return {"id": name, "object": "model", "created": 0, "owned_by": "cicada",
            EXTENSION: extension}  # fmt: skip


async def list_models(request: Request) -> Response:
    gw = gateway(request)
    data = [await _model_entry(gw, name) for name in await gw.catalog.names()]
    return JsonResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    gw = gateway(request)
    name = request.path_params["model"]
    if not await gw.catalog.known(name):
        raise unknown_model(name)
    return JsonResponse(await _model_entry(gw, name))


# -- the body's common fields -------------------------------------------------------------------


async def _body(request: Request) -> tuple[Gateway, dict[str, Any], str, Admission]:
    gw = gateway(request)
    body = parse_json(await read_body(request, gw.config.max_body_bytes))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", "model")
    return gw, body, model, admission(request, body)


def _token_ids(value: Any, what: str, param: str) -> list[int]:
    """Ids within the protocol's bound (no vocabulary is larger), so that they make an int64
    tensor; the worker checks them against its own vocabulary."""
    if not value or not all(isinstance(t, int) and not isinstance(t, bool)
                            and 0 <= t <= MAX_TOKEN_ID for t in value):  # fmt: skip
        raise bad_request(
            f"{what} must be a non-empty list of token ids (0 ... {MAX_TOKEN_ID})", param
        )
    return list(value)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


# -- embeddings ---------------------------------------------------------------------------------


async def embeddings(request: Request) -> Response:
    gw, body, model, adm = await _body(request)
    texts, ids = _embedding_input(body.get("input"))
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if ids is not None:
        longest = max(len(row) for row in ids)  # padded with 0, as the workers pad text
        batch = np.zeros((len(ids), longest), dtype=np.int64)  # (batch, seq)
        for i, row in enumerate(ids):
            batch[i, : len(row)] = row
        result = await gw.invoke(model, [batch], adm)
    else:
        result = await gw.invoke(model, None, adm, text=texts)
    rows = len(texts or ids or [])
    output = result.output
    if output.ndim != 2 or output.shape[0] != rows or output.dtype.kind != "f":
        raise bad_request(
            f"model {model!r} does not produce embeddings: its output is {output.dtype.name} "
            f"{list(output.shape)}, not one float vector per input ({rows}, dim)",
            "model",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != output.shape[1]:
        raise bad_request(
            f"model {model!r} makes {output.shape[1]}-dimensional embeddings; 'dimensions' "
            f"{dimensions!r} cannot be served",
            "dimensions",
        )
    vectors = output.astype("<f4", copy=False)
    data = [
        {"object": "embedding", "index": i,
         "embedding": base64.b64encode(row.tobytes()).decode() if encoding == "base64"
         else row}
        for i, row in enumerate(vectors)
    ]  # fmt: skip
    tokenizer = _tokenizer(gw, model)
    if ids is not None:
        tokens = sum(len(row) for row in ids)
    else:
        tokens = tokenizer.count(texts or []) if tokenizer is not None else 0
    return JsonResponse({
        "object": "list", "model": model, "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        EXTENSION: {"served_by": result.served_by, "timings": result.timings},
    })  # fmt: skip


def _embedding_input(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, token id rows): one of them, from OpenAI's four input forms."""
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string, a list of strings, a list of token ids "
                          "or a list of such lists", "input")  # fmt: skip
    if len(value) > MAX_TEXTS:
        raise bad_request(f"'input' may hold at most {MAX_TEXTS} items", "input")
    if all(isinstance(v, str) for v in value):
        return list(value), None
    if _is_ids(value):
        return None, [_token_ids(value, "'input'", "input")]
    if all(isinstance(v, list) for v in value):
        return None, [_token_ids(v, f"'input'[{i}]", "input") for i, v in enumerate(value)]
    raise bad_request("'input' mixes strings, numbers and lists", "input")


def _tokenizer(gw: Gateway, model: str) -> Tokenizer | None:
    known = gw.catalog.dirs.get(model)
    return None if known is None else known.tokenizer


# -- completions --------------------------------------------------------------------------------


async def completions(request: Request) -> Response:
    gw, body, model, adm = await _body(request)
    for name, default in _UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise bad_request(f"'{name}' is not supported (generation is greedy, one choice "
                              "per prompt, without logprobs or stop strings)", name)  # fmt: skip
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not (1 <= max_tokens <= MAX_NEW_TOKENS)
    ):
        raise bad_request(f"'max_tokens' must be an integer in 1..{MAX_NEW_TOKENS}", "max_tokens")
    options: dict[str, Any] = {}
    eos = body.get("eos_token_id")
    if eos is not None:
        if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
            raise bad_request("'eos_token_id' must be a non-negative integer", "eos_token_id")
        options["eos_token_id"] = eos
    exact = body.get("exact", False)
    if exact not in (True, False, None):
        raise bad_request("'exact' must be a boolean", "exact")
    tokenizer = _tokenizer(gw, model)
    prompts = _prompts(body.get("prompt"), model, tokenizer)
    call = _Completion(gw, model, adm, max_tokens, options, tokenizer, exact is True)
    stream = body.get("stream", False)
    if stream not in (True, False, None):
        raise bad_request("'stream' must be a boolean", "stream")
    if stream:
        if len(prompts) != 1:
            raise bad_request("a streamed completion takes one prompt", "prompt")
        include_usage = isinstance(body.get("stream_options"), dict) and bool(
            body["stream_options"].get("include_usage")
        )
        return await call.stream(prompts[0], include_usage)
    try:  # one call per prompt, concurrently; the first failure cancels the rest
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call.run(p)) for p in prompts]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    choices = [call.choice(i, task.result()) for i, task in enumerate(tasks)]
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c[EXTENSION]["token_ids"]) for c in choices)
    return JsonResponse({
        "id": call.id, "object": "text_completion", "created": call.created, "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })  # fmt: skip


def _prompts(value: Any, model: str, tokenizer: Tokenizer | None) -> list[list[int]]:
    """Every prompt as token ids: text through the model's tokenizer, ids as they are."""
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    ):
        texts = [value] if isinstance(value, str) else value
        if tokenizer is None:
            raise bad_request(
                f"model {model!r} has no tokenizer known to the gateway: send token ids, or "
                f"start the gateway with --package {model}=DIR of a directory with "
                "tokenizer.json",
                "prompt",
            )
        if len(texts) > MAX_TEXTS:
            raise bad_request(f"'prompt' may hold at most {MAX_TEXTS} prompts", "prompt")
        prompts = [tokenizer.encode(t) for t in texts]
        if not all(prompts):
            raise bad_request("a prompt tokenizes to no tokens", "prompt")
        return prompts
    if _is_ids(value):
        return [_token_ids(value, "'prompt'", "prompt")]
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        if len(value) > MAX_TEXTS:
            raise bad_request(f"'prompt' may hold at most {MAX_TEXTS} prompts", "prompt")
        return [_token_ids(v, f"'prompt'[{i}]", "prompt") for i, v in enumerate(value)]
    raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or "
                      "a list of such lists", "prompt")  # fmt: skip


class _Completion:
    """One /v1/completions request: its calls and how their results become choices."""

    def __init__(self, gw: Gateway, model: str, adm: Admission, max_tokens: int,
                 options: dict[str, Any], tokenizer: Tokenizer | None,
                 exact: bool = False) -> None:  # fmt: skip
        self.gw, self.model, self.adm, self.exact = gw, model, adm, exact
        self.max_tokens, self.options, self.tokenizer = max_tokens, options, tokenizer
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _call(self) -> dict[str, Any]:
        return {"priority": self.adm.priority, "deadline": self.adm.deadline_s,
                "max_new_tokens": self.max_tokens, "options": self.options or None,
                "exact": self.exact}  # fmt: skip

    async def run(self, prompt: list[int]) -> InvokeResult:
        with sdk_errors():
            return await self.gw.sdk.invoke(self.model, _prompt_array(prompt), **self._call())

    def _text(self, ids: Sequence[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids)

    def _finish(self, produced: int) -> str:
        return "length" if produced >= self.max_tokens else "stop"

    def choice(self, index: int, result: InvokeResult) -> dict[str, Any]:
        ids = [int(t) for t in result.output.reshape(-1)]
        return {
            "index": index, "text": self._text(ids), "logprobs": None,
            "finish_reason": self._finish(len(ids)),
            EXTENSION: {"token_ids": ids, "token_sources": result.token_sources,
                        "served_by": result.served_by, "timings": result.timings,
                        **_generation(result)},
        }  # fmt: skip

    def _chunk(self, *choices: dict[str, Any], **extra: Any) -> bytes:
        doc = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.model, "choices": list(choices), **extra}  # fmt: skip
        return b"data: " + jsonio.dumps(doc) + b"\n\n"

    async def stream(self, prompt: list[int], include_usage: bool) -> Response:
        """Server-sent events, one chunk per piece. The first piece is awaited here, so that a
        call refused at once gets its HTTP status; a failure later ends the stream with an
        `error` event (OpenAI clients raise it)."""
        with sdk_errors():
            tokens: AsyncTokenStream = self.gw.sdk.stream(
                self.model, _prompt_array(prompt), **self._call()
            )
        first: Piece | None = None
        try:
            first = await tokens.__anext__()
        except StopAsyncIteration:
            pass
        except CallError as exc:
            await tokens.aclose()
            raise from_call_error(exc) from None
        except BaseException:
            await tokens.aclose()
            raise
        return StreamingResponse(
            self._events(tokens, first, len(prompt), include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, tokens: AsyncTokenStream, first: Piece | None, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[bytes]:  # fmt: skip
        sequence = TokenSequence()
        sent = ""
        try:
            pieces = [first] if first is not None else []
            while True:
                for piece in pieces:
                    new = [int(t) for t in piece.tokens.reshape(-1)]
                    sequence.apply(piece)
                    # `text` carries only what stands (all of it, unless exact): an OpenAI
                    # client appends deltas and cannot take text back.
                    text = self._text(sequence.tokens[: sequence.stable])
                    # Hold back a character still being assembled from several tokens.
                    delta = "" if text.endswith("\ufffd") else text[len(sent) :]
                    sent += delta
                    extension = {"token_ids": new, "token_sources": [piece.role] * len(new),
                                 "served_by": piece.served_by, "seq": piece.seq}  # fmt: skip
                    if self.exact:
                        extension.update(position=piece.position, provisional=piece.provisional,
                                         rewind=piece.rewind,
                                         text=self._text(sequence.tokens))  # fmt: skip
                    yield self._chunk({
                        "index": 0, "text": delta, "logprobs": None, "finish_reason": None,
                        EXTENSION: extension,
                    })  # fmt: skip
                try:
                    pieces = [await tokens.__anext__()]
                except StopAsyncIteration:
                    break
        except CallError as exc:
            yield b"data: " + jsonio.dumps(from_call_error(exc).openai_body()) + b"\n\n"
            return
        finally:
            await tokens.aclose()  # a client that left early: the request is withdrawn
        result = tokens.result
        final_ids = [] if result is None else [int(t) for t in result.output.reshape(-1)]
        ids = final_ids or sequence.tokens
        tail = self._text(final_ids)[len(sent) :] if final_ids else ""
        yield self._chunk({
            "index": 0, "text": tail, "logprobs": None, "finish_reason": self._finish(len(ids)),
            EXTENSION: {"token_ids": [], "token_sources": [],
                        "served_by": None if result is None else result.served_by,
                        **({} if result is None else _generation(result))},
        })  # fmt: skip
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                     "total_tokens": prompt_tokens + len(ids)}  # fmt: skip
            yield self._chunk(usage=usage)
        yield b"data: [DONE]\n\n"


def _generation(result: InvokeResult) -> dict[str, Any]:
    """An exact generation's outcome for the extension: {generation: {exact, kept, rewound}}."""
    info = result.generation
    return {} if info is None else {"generation": dataclasses.asdict(info)}


def _prompt_array(prompt: list[int]) -> np.ndarray:
    return np.asarray(prompt, dtype=np.int64).reshape(1, -1)  # (1, T)
