"""How the head reaches the draft (a `specdecode.DraftClient`): in its own process, or on the dedicated draft rank (Tag.DRAFT)."""

from __future__ import annotations

from typing import Protocol

from pipeinfer_cpu.head.specdecode import DraftClient
from pipeinfer_cpu.wire.drafts import DraftReply, DraftRequest, decode_reply, encode_request
from pipeinfer_cpu.wire.runs import Tag
from pipeinfer_cpu.wire.transport import Transport


class Drafts(Protocol):
    """A draft model (llama/drafter.py) or the n-gram draft (head/ngram.py)."""

    def draft(self, request: DraftRequest) -> DraftReply | None: ...


class LocalDraftClient:
    """Drafting in the head's own process: the n-gram draft, a draft model with --draft-ranks head, tests."""

    def __init__(self, drafter: Drafts) -> None:
        self.drafter = drafter
        self._reply: DraftReply | None = None

    def request(self, request: DraftRequest) -> None:
        self._reply = self.drafter.draft(request)

    def poll(self) -> DraftReply | None:
        reply, self._reply = self._reply, None
        return reply


class RemoteDraftClient:
    """Drafting on a dedicated rank: requests and replies travel on Tag.DRAFT."""

    def __init__(self, transport: Transport, rank: int) -> None:
        self.transport = transport
        self.rank = rank

    def request(self, request: DraftRequest) -> None:
        self.transport.send(self.rank, int(Tag.DRAFT), encode_request(request))

    def poll(self) -> DraftReply | None:
        message = self.transport.poll([(self.rank, Tag.DRAFT)])
        return None if message is None else decode_reply(message.data)


class NgramFirstDraftClient:
    """The n-gram draft where the context repeats itself, the draft model where it finds nothing
    (`--draft ngram+MODEL`): a lookup costs nothing, and the model's run is spent only where it is needed."""

    def __init__(self, ngram: Drafts, model: DraftClient) -> None:
        self.ngram = ngram
        self.model = model
        self._reply: DraftReply | None = None

    def request(self, request: DraftRequest) -> None:
        reply = self.ngram.draft(request)
        if reply is not None and reply.tokens:
            self._reply = reply
        else:
            self.model.request(request)

    def poll(self) -> DraftReply | None:
        if self._reply is not None:
            reply, self._reply = self._reply, None
            return reply
        return self.model.poll()
