"""The generation relay: streamed PARTIALs to the client, numbered across every worker that
served the request, and the handoff of a generation from an edge agent to a cloud worker
mid-stream (the cloud continues from the prompt plus the tokens so far). An exact generation
(options.exact) is handed over differently: the cloud gets the original prompt and the tokens
so far as a draft, says how many of them it accepts (its verdict), and the client is told to
rewind to that position (docs/PROTOCOL.md section 12). Sends nothing: it says what to send,
and the broker sends it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from cicada.common.protocol import (
    Limits,
    Partial,
    ProtocolError,
    RawTensor,
    Reply,
    Role,
    Status,
    Tokens,
    WorkerState,
    decode_tensor,
)
from cicada.edge.coordinator.registry import Registry, WorkerInfo
from cicada.edge.coordinator.scheduler import Pending


class GenerationRelay:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.on_edge: set[str] = set()  # keys generating on an edge agent now

    def array(self, tensor: Any) -> np.ndarray:
        """A tensor as numpy: frames are forwarded raw, and read only where the coordinator
        needs their values (the tokens of a generation)."""
        if isinstance(tensor, RawTensor):
            return decode_tensor(tensor.spec, tensor.frame, self.limits)
        return np.asarray(tensor)

    def started(self, p: Pending, worker: WorkerInfo) -> None:
        """`p` was dispatched to `worker`."""
        if p.generating and worker.role is Role.EDGE:
            self.on_edge.add(p.key)

    def ended(self, key: str) -> None:
        self.on_edge.discard(key)

    def continuation(self, p: Pending, worker: WorkerInfo) -> tuple[list[Any], dict[str, Any]]:
        """A generation that already streamed tokens continues from them: prompt + tokens so
        far as the prompt, and only the tokens still due. An exact one moving to a cloud
        worker keeps its prompt and sends the tokens as a draft to verify (`p.draft_len` set:
        the attempt's first PARTIAL must be its verdict)."""
        if p.exact and worker.role is Role.CLOUD:
            p.draft_len = len(p.tokens)
            return list(p.request.inputs), {**p.request.options, "draft": list(p.tokens)}
        prompt = self.array(p.request.inputs[0])
        ids = np.concatenate([prompt.reshape(-1), np.asarray(p.tokens, np.int64)])
        options = {**p.request.options, "max_new_tokens": p.tokens_left()}
        return [ids.astype(np.int64)[None]], options

    def verdict(self, p: Pending, worker: WorkerInfo, accepted: int) -> Partial | None:
        """A cloud worker accepted the first `accepted` tokens of its draft: later ones are
        dropped, the kept ones are the cloud's (their edge segments say `verified_by`), and
        the client gets a rewind event, unless nothing provisional was in the draft and
        nothing is replaced (a re-route of tokens already verified)."""
        draft = p.draft_len
        if draft is None or worker.role is not Role.CLOUD:
            raise ProtocolError("a verdict (accepted) for an attempt that verifies no draft")
        if not 0 <= accepted <= draft:
            raise ProtocolError(f"accepted {accepted} is outside 0 ... {draft} (the draft)")
        replaced = len(p.tokens) - accepted
        provisional = draft > p.verified
        del p.tokens[accepted:]
        p.segments = _cut(p.segments, accepted, worker.name)
        p.verified, p.draft_len = accepted, None
        p.rewound += replaced
        if not replaced and not provisional:
            return None
        seq, p.seq = p.seq, p.seq + 1
        served_by = {"role": worker.role.value, "worker": worker.name, "variant": worker.variant}
        return Partial(id=p.request.id, seq=seq, served_by=served_by, rewind=accepted,
                       position=accepted, provisional=False)  # fmt: skip

    def relay(self, p: Pending, worker: WorkerInfo, partial: Partial) -> Partial | None:
        """The client's PARTIAL for `worker`'s piece of `p` (a generation's tokens are kept, to
        continue from and to reply with), or None when there is nothing to tell it.
        ProtocolError: a piece the request cannot take (not a generation, not one int64 token,
        a token over max_new_tokens, a token before the verdict an exact takeover owes, a
        verdict nobody asked for): the attempt fails."""
        served_by = {"role": worker.role.value, "worker": worker.name, "variant": worker.variant}
        if not p.generating:
            raise ProtocolError("a PARTIAL for a request that does not generate")
        if partial.accepted is not None:
            if partial.outputs:
                raise ProtocolError("a verdict (accepted) carries no tokens")
            return self.verdict(p, worker, partial.accepted)
        if p.draft_len is not None:
            raise ProtocolError("a token before the verdict on the draft (accepted)")
        # Checked on the spec before any value is read: one token, within the budget.
        outputs = partial.outputs
        spec = _spec(outputs[0]) if len(outputs) == 1 else None
        if spec is None or spec["dtype"] != "int64" or spec["shape"] != [1]:
            raise ProtocolError(
                "a generation PARTIAL carries one token: one int64 tensor of shape (1,)"
            )
        if p.tokens_left() < 1:
            budget = p.request.options["max_new_tokens"]
            raise ProtocolError(f"a token beyond the request's max_new_tokens ({budget})")
        token = int(self.array(outputs[0])[0])
        position = len(p.tokens)
        p.tokens.append(token)
        provisional: bool | None = None
        if p.exact:
            provisional = worker.role is not Role.CLOUD or p.verified < position
            if not provisional:
                p.verified = position + 1
        last = p.segments[-1] if p.segments else None
        if last is not None and last["worker"] == worker.name:
            last["tokens"] += 1
        else:
            p.segments.append({**served_by, "tokens": 1})
        seq, p.seq = p.seq, p.seq + 1
        return Partial(id=p.request.id, seq=seq, outputs=partial.outputs, served_by=served_by,
                       position=position, provisional=provisional)  # fmt: skip

    def draft(self, p: Pending, partial: Partial) -> Tokens | None:
        """A drafting edge's PARTIAL as TOKENS for the cloud attempt of the same request, or
        None when it is stale (a position that already stands) or no cloud attempt runs.
        ProtocolError: not one int64 token of shape (1,) with a position below
        max_new_tokens."""
        outputs = partial.outputs
        spec = _spec(outputs[0]) if len(outputs) == 1 else None
        if partial.accepted is not None or partial.rewind is not None:
            raise ProtocolError("a draft carries one token, not a verdict or a rewind")
        if spec is None or spec["dtype"] != "int64" or spec["shape"] != [1]:
            raise ProtocolError("a draft carries one token: one int64 tensor of shape (1,)")
        budget = int(p.request.options["max_new_tokens"])
        position = partial.position
        if position is None or not 0 <= position < budget:
            raise ProtocolError(f"a draft's position must lie in 0 ... {budget - 1}")
        token = int(self.array(outputs[0])[0])
        if token < 0:
            raise ProtocolError("a draft token is a token id (>= 0)")
        if position < len(p.tokens) or p.worker is None or p.dispatch_id is None:
            return None
        return Tokens(id=p.dispatch_id, position=position, tokens=[token])

    def final_reply(
        self,
        p: Pending,
        worker: WorkerInfo | None,
        status: Status,
        error: str,
        timings: dict[str, float],
    ) -> Reply:
        """A generation's one REPLY: the tokens relayed (a worker's PARTIALs precede its
        RESULT), with every worker that produced some."""
        served_by: dict[str, Any] = {"segments": p.segments}
        if p.segments:
            last = p.segments[-1]
            served_by.update(role=last["role"], worker=last["worker"], variant=last["variant"])
        elif worker is not None:
            served_by.update(role=worker.role.value, worker=worker.name, variant=worker.variant)
        generation = None
        if p.exact:
            kept = sum(s["tokens"] for s in p.segments if s["role"] != Role.CLOUD.value)
            exact = bool(p.tokens) and p.verified == len(p.tokens)
            generation = {"exact": exact, "kept": kept, "rewound": p.rewound}
        return Reply(
            id=p.request.id,
            status=status,
            outputs=[np.asarray(p.tokens, dtype=np.int64)] if status is Status.OK else [],
            error=error,
            served_by=served_by,
            timings=timings,
            generation=generation,
        )

    def handoffs(
        self, pending: dict[str, Pending], registry: Registry
    ) -> Iterator[tuple[Pending, WorkerInfo, WorkerInfo]]:
        """(request, its edge agent, a cloud worker ready and free to take it over), one at a
        time: the caller hands each over before the next cloud worker is picked. A request may
        opt out with options.handoff = false."""
        for key in list(self.on_edge):
            p = pending.get(key)
            edge = registry.get(p.worker) if p is not None and p.worker else None
            if p is None or edge is None or edge.role is not Role.EDGE:
                self.on_edge.discard(key)
                continue
            # (An exact generation is worth handing over for its last token: the cloud verifies
            # the draft; otherwise a last token is not worth a cloud prefill.)
            if p.request.options.get("handoff") is False or p.tokens_left() < 2 - p.exact:
                continue
            cloud = registry.pick(p.request.model, Role.CLOUD)
            if cloud is None or cloud.state is not WorkerState.READY:
                continue
            self.on_edge.discard(key)
            yield p, edge, cloud


def _cut(segments: list[dict[str, Any]], n: int, verifier: str) -> list[dict[str, Any]]:
    """`segments` covering only the first `n` tokens; those kept that the cloud worker
    `verifier` did not make are marked as verified by it."""
    kept: list[dict[str, Any]] = []
    left = n
    for segment in segments:
        if left <= 0:
            break
        take = min(left, int(segment["tokens"]))
        piece = {**segment, "tokens": take}
        if piece["worker"] != verifier or piece["role"] != Role.CLOUD.value:
            piece["verified_by"] = verifier
        kept.append(piece)
        left -= take
    return kept


def _spec(tensor: Any) -> dict[str, Any] | None:
    """A tensor's {dtype, shape} as it travelled (or as numpy holds it)."""
    if isinstance(tensor, RawTensor):
        return tensor.spec
    array = np.asarray(tensor)
    return {"dtype": array.dtype.name, "shape": list(array.shape)}
