"""The draft rank's loop: answer draft requests, newest first, until the head says stop.

A newer request supersedes an older one that is still being drafted (the head only wants the latest).
"""

from __future__ import annotations

from pipeinfer_cpu.llama.drafter import Drafter
from pipeinfer_cpu.wire import control as C
from pipeinfer_cpu.wire.drafts import decode_request, encode_reply
from pipeinfer_cpu.wire.runs import HEAD, Tag
from pipeinfer_cpu.wire.transport import Transport, wait


def serve_drafts(transport: Transport, drafter: Drafter) -> None:
    """Answer draft requests until the head says stop (other control messages need no answer here)."""
    channels = [(HEAD, Tag.CONTROL), (HEAD, Tag.DRAFT)]
    while True:
        message = wait(transport, channels, timeout_s=None)
        if message.tag == Tag.CONTROL:
            if C.decode(message.data) == C.Signal.SHUTDOWN:
                transport.send(HEAD, int(Tag.REPLY), C.encode(C.Signal.BYE))
                return
            continue
        request = decode_request(message.data)
        reply = drafter.draft(request, abandon=lambda: transport.pending([(HEAD, Tag.DRAFT)]))
        if reply is not None:
            transport.send(HEAD, int(Tag.DRAFT), encode_reply(reply))
