"""The generation relay: streamed PARTIALs to the client, numbered across every worker that
served the request, and the handoff of a generation from an edge agent to a cloud worker
mid-stream (the cloud continues from the prompt plus the tokens so far). Sends nothing: it
says what to send, and the broker sends it."""

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

    def continuation(self, p: Pending) -> tuple[list[Any], dict[str, Any]]:
        """A generation that already streamed tokens continues from them: prompt + tokens so
        far as the prompt, and only the tokens still due."""
        prompt = self.array(p.request.inputs[0])
        ids = np.concatenate([prompt.reshape(-1), np.asarray(p.tokens, np.int64)])
        options = {**p.request.options, "max_new_tokens": p.tokens_left()}
        return [ids.astype(np.int64)[None]], options

    def relay(self, p: Pending, worker: WorkerInfo, partial: Partial) -> Partial:
        """The client's PARTIAL for `worker`'s piece of `p` (a generation's tokens are kept, to
        continue from and to reply with). ProtocolError: a piece the request cannot take (not
        a generation, not one int64 token, a token over max_new_tokens): the attempt fails."""
        served_by = {"role": worker.role.value, "worker": worker.name, "variant": worker.variant}
        if not p.generating:
            raise ProtocolError("a PARTIAL for a request that does not generate")
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
        p.tokens.append(token)
        last = p.segments[-1] if p.segments else None
        if last is not None and last["worker"] == worker.name:
            last["tokens"] += 1
        else:
            p.segments.append({**served_by, "tokens": 1})
        seq, p.seq = p.seq, p.seq + 1
        return Partial(id=p.request.id, seq=seq, outputs=partial.outputs, served_by=served_by)

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
        return Reply(
            id=p.request.id,
            status=status,
            outputs=[np.asarray(p.tokens, dtype=np.int64)] if status is Status.OK else [],
            error=error,
            served_by=served_by,
            timings=timings,
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
            if p.request.options.get("handoff") is False or p.tokens_left() < 2:
                continue
            cloud = registry.pick(p.request.model, Role.CLOUD)
            if cloud is None or cloud.state is not WorkerState.READY:
                continue
            self.on_edge.discard(key)
            yield p, edge, cloud


def _spec(tensor: Any) -> dict[str, Any] | None:
    """A tensor's {dtype, shape} as it travelled (or as numpy holds it)."""
    if isinstance(tensor, RawTensor):
        return tensor.spec
    array = np.asarray(tensor)
    return {"dtype": array.dtype.name, "shape": list(array.shape)}
