"""Chat logic without a model: conversation data, KV prefix reuse, context policy, the engine server
(which holds no conversation) and the front end's commands (which own it), over a fake engine (one
token per character) and a fake client."""

from __future__ import annotations

import base64
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeinfer_cpu.app.chat import ChatOptions, ChatSession, format_stats, read_transcript
from pipeinfer_cpu.app.client import JobEnded, LocalClient
from pipeinfer_cpu.conversation import (Conversation, Turn, answer_reserve, common_prefix, conversation_from_json,
                                        conversation_to_json, fit_window, plain_template, plan_feed)
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.decoding import Generation
from pipeinfer_cpu.head.server import EngineServer, LineReader, json_line_writer, sampling_json, serve_json_lines
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.stats import RunStats, StageStats

END = 0


def render_chars(messages) -> list[int]:
    """A fake template and tokenizer: one token per character of '<role>content|'."""
    return [ord(c) for role, content in messages for c in f"<{role}>{content}|"] + [ord(c) for c in "<assistant>"]


# -- conversation data ----------------------------------------------------------------------------

def test_conversation_is_plain_data_and_messages_skip_dropped_turns():
    base = Conversation("be brief")
    conversation = base.with_turn("user", "hi").with_turn("assistant", "hello")
    assert base.turns == ()
    assert conversation.messages() == [("system", "be brief"), ("user", "hi"), ("assistant", "hello")]
    assert conversation.messages(first=2) == [("system", "be brief")]
    assert conversation.cleared() == Conversation("be brief")
    assert Conversation().with_system("").system is None


def test_transcript_json_round_trip():
    conversation = Conversation("sys", (Turn("user", "a"), Turn("assistant", "b")))
    data = json.loads(json.dumps(conversation_to_json(conversation)))
    assert conversation_from_json(data) == conversation


@pytest.mark.parametrize("data", [[], {"system": "x"}, {"turns": {}}, {"system": 3, "turns": []},
                                  {"turns": [{"role": "robot", "content": "x"}]},
                                  {"turns": [{"role": "user", "content": 5}]}, {"turns": ["hi"]}])
def test_transcript_of_wrong_shape_is_a_user_error(data):
    with pytest.raises(UserError, match="transcript"):
        conversation_from_json(data)


def test_plain_template_ends_with_the_assistant_cue():
    text = plain_template([("system", "S"), ("user", "U")])
    assert text == "System: S\n\nUser: U\n\nAssistant:"


# -- KV prefix reuse --------------------------------------------------------------------------------

@pytest.mark.parametrize("kv, prompt, keep", [
    ([], [1, 2, 3], 0),
    ([1, 2], [1, 2, 3, 4], 2),
    ([1, 2, 9, 9], [1, 2, 3], 2),  # diverged: drop the cache's tail
    ([1, 2, 3], [1, 2, 3], 2),  # nothing new: still feed the last token for its logits
    ([1, 2, 3, 4, 5], [1, 2, 3], 2),
])
def test_plan_feed_reuses_the_common_prefix(kv, prompt, keep):
    plan = plan_feed(kv, prompt)
    assert plan.keep == keep
    assert list(plan.feed) == prompt[keep:]
    assert common_prefix(kv, prompt) >= keep


# -- context policy ---------------------------------------------------------------------------------

def _long_conversation(pairs: int) -> Conversation:
    conversation = Conversation("S")
    for i in range(pairs):
        conversation = conversation.with_turn("user", f"question {i}").with_turn("assistant", f"answer {i}")
    return conversation.with_turn("user", "last")


def test_fit_window_keeps_everything_that_fits():
    conversation = _long_conversation(3)
    first, tokens = fit_window(render_chars, conversation, 0, n_ctx=1000, reserve=100)
    assert first == 0
    assert tokens == render_chars(conversation.messages())


def test_fit_window_drops_oldest_pairs_and_keeps_the_system_message():
    conversation = _long_conversation(5)
    whole = len(render_chars(conversation.messages()))
    first, tokens = fit_window(render_chars, conversation, 0, n_ctx=whole - 10, reserve=20)
    assert first > 0 and first % 2 == 0  # whole pairs, starting at a user turn
    assert conversation.turns[first].role == "user"
    assert len(tokens) + 20 <= whole - 10
    assert tokens[:len("<system>S|")] == [ord(c) for c in "<system>S|"]
    assert fit_window(render_chars, conversation, first, n_ctx=whole - 10, reserve=20)[0] == first
    assert fit_window(render_chars, conversation, first, n_ctx=10_000, reserve=20)[0] == first  # never back


def test_fit_window_refuses_a_message_longer_than_the_context():
    conversation = Conversation("S").with_turn("user", "x" * 500)
    with pytest.raises(UserError, match="too long"):
        fit_window(render_chars, conversation, 0, n_ctx=300, reserve=10)


def test_answer_reserve_is_bounded_by_a_quarter_of_the_context():
    assert answer_reserve(2048, 100, 1) == 101
    assert answer_reserve(2048, 4096, 1) == 513
    assert answer_reserve(64, 512, 33) == 16 + 33


