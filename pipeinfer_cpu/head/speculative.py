"""The `speculative` loop: synchronous speculative decoding, in the manner of gpt-fast's.

Draft k tokens after the decided ones, send [last decided token + draft] as one run, wait for its
result, verify, repeat: the draft and the target never work at the same time.
"""

from __future__ import annotations

from pipeinfer_cpu.errors import ClusterError
from pipeinfer_cpu.head.clock import Clock
from pipeinfer_cpu.head.decoding import Generation
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.head.specdecode import DraftClient, Request, SpecCounters, SpecSettings, SpecState
from pipeinfer_cpu.wire.drafts import DraftReply


def generate(context: Context, draft: DraftClient, settings: SpecSettings, request: Request, n_batch: int,
             timeout_s: float) -> tuple[Generation, SpecCounters]:
    """Generate after the committed `context` (which learns what the stages hold afterwards)."""
    state = SpecState(context, draft, settings, request)
    chain = state.chain
    while state.running:
        if len(chain.decided) - len(chain.fed) > 1:  # the prompt: fed on its own, in chunks
            while chain.needs_feed():
                state.send(chain.feed_decided(n_batch))
        else:  # the last decided token and the draft's continuation of it, verified in one run
            reply = _wait_for_draft(draft, state.ask_draft(chain.decided), timeout_s, state.clock)
            state.send(chain.feed_with_draft(list(reply.tokens)))
        while state.verify(state.executor.wait()) is None:
            pass  # a stale result, of a run an earlier request left behind
    return state.finish()


def _wait_for_draft(draft: DraftClient, request_id: int, timeout_s: float, clock: Clock) -> DraftReply:
    """The draft's reply to `request_id` (older replies are dropped)."""
    deadline = clock.now() + timeout_s
    backoff = clock.idler()
    while clock.now() < deadline:
        reply = draft.poll()
        if reply is not None and reply.request_id == request_id:
            return reply
        backoff.sleep()
    raise ClusterError(f"the draft rank did not answer within {timeout_s:.0f} s")
