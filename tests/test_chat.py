"""Chat logic without a model: conversation data, KV prefix reuse, context policy, the server and the
front end's commands, over a fake engine (one token per character) and a fake client."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeinfer_cpu.head.chatserver import (ChatServer, Conversation, LineReader, ServerSettings, Turn, answer_reserve,
                                common_prefix, conversation_from_json, conversation_to_json, fit_window,
                                json_line_writer, plain_template, plan_feed, serve_json_lines)
from pipeinfer_cpu.app.chat import ChatOptions, ChatSession, format_stats, read_transcript
from pipeinfer_cpu.head.decoding import Generation
from pipeinfer_cpu.errors import UserError
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


# -- the server over a fake engine ------------------------------------------------------------------

class FakeVocab:
    def chat_template(self) -> str:
        return "fake"

    def apply_chat_template(self, messages, add_assistant=True) -> str:
        return "".join(f"<{r}>{c}|" for r, c in messages) + ("<assistant>" if add_assistant else "")

    def tokenize(self, text, add_special=True, parse_special=True) -> list[int]:
        return [ord(c) for c in text]

    def piece(self, token: int) -> bytes:
        return chr(token).encode()

    def is_end(self, token: int) -> bool:
        return token == END


@dataclass
class FakeDecoder:
    kv_tokens: list[int] = field(default_factory=list)
    truncations: list[int] = field(default_factory=list)

    def truncate(self, n_keep: int) -> None:
        self.truncations.append(n_keep)
        self.kv_tokens = self.kv_tokens[:n_keep]


@dataclass(frozen=True)
class FakeSettings:
    n_ctx: int = 4096
    mode: str = "single"
    spec: None = None


@dataclass(frozen=True)
class FakeInfo:
    name: str = "fake"


class FakeEngine:
    """Answers every prompt with `answer`, like the real decoder: the last token stays pending."""

    def __init__(self, answer: str, n_ctx: int = 4096) -> None:
        self.answer = answer
        self.settings = FakeSettings(n_ctx)
        self.info = FakeInfo()
        self.vocab = FakeVocab()
        self.decoder = FakeDecoder()
        self.stage_ranks: list[int] = []
        self.fed: list[list[int]] = []

    @property
    def context_tokens(self) -> tuple[int, ...]:
        return tuple(self.decoder.kv_tokens)

    def truncate_context(self, n_keep: int) -> None:
        self.decoder.truncate(n_keep)

    def generate(self, tokens, max_tokens, sampling, on_token, should_stop):
        self.fed.append(list(tokens))
        self.decoder.kv_tokens.extend(tokens)
        produced: list[int] = []
        stopped_by = "length"
        for token in [ord(c) for c in self.answer][:max_tokens - 1] + [END]:
            if produced:
                self.decoder.kv_tokens.append(produced[-1])
            produced.append(token)
            on_token(token)
            if token == END:
                stopped_by = "eos"
                break
            if should_stop():
                stopped_by = "interrupt"
                break
        times = tuple(0.01 * (i + 1) for i in range(len(produced)))
        stage = StageStats(0, "here", (0, 30), 0.5, 1.0, 1, prefill_tokens=len(tokens))
        stats = RunStats("single", len(tokens), len(produced), 0.01, times[0], times, 0, (stage,), 1)
        return Generation(tuple(tokens), tuple(produced), 0.01, times, None, stopped_by), stats


def _ask(server: ChatServer, request: dict, stop_after: int | None = None) -> list[dict]:
    events: list[dict] = []
    tokens = lambda: sum(e["event"] == "token" for e in events)  # noqa: E731
    server.handle(request, events.append, lambda: stop_after is not None and tokens() >= stop_after)
    return events


def test_second_turn_prefills_only_its_own_tokens():
    engine = FakeEngine("Blue.")
    server = ChatServer(engine, ServerSettings(64, SamplingConfig(), "S"))
    first = _ask(server, {"type": "turn", "text": "My colour is blue."})
    assert "".join(e["text"] for e in first if e["event"] == "token") == "Blue."
    assert first[-1] == {"event": "done", "stopped_by": "eos", "answer": "Blue.", "dropped_turns": 0}
    _ask(server, {"type": "turn", "text": "Which colour?"})
    whole = engine.vocab.tokenize(engine.vocab.apply_chat_template(server.conversation.messages()[:-1]))
    assert len(engine.fed[1]) < len(whole) / 2
    assert "".join(map(chr, engine.fed[1])) == "|<user>Which colour?|<assistant>"  # the end token was pending
    assert server.last["reused_tokens"] + len(engine.fed[1]) == server.last["context_tokens"]


def test_interrupted_answer_keeps_what_was_shown():
    engine = FakeEngine("Once upon a time there was a dragon.")
    server = ChatServer(engine, ServerSettings(64, SamplingConfig()))
    events = _ask(server, {"type": "turn", "text": "A story"}, stop_after=4)
    assert events[-1]["stopped_by"] == "interrupt"
    assert events[-1]["answer"] == "Once"
    assert server.conversation.turns[-1] == Turn("assistant", "Once")
    _ask(server, {"type": "turn", "text": "Go on"})
    assert "".join(map(chr, engine.fed[1])).startswith("e|<user>Go on")  # the pending token, then the turn


def test_server_reports_bad_requests_and_goes_on():
    server = ChatServer(FakeEngine("ok", n_ctx=64), ServerSettings(8, SamplingConfig()))
    assert _ask(server, {"type": "turn", "text": "  "})[-1]["message"].startswith("an empty message")
    assert "too long" in _ask(server, {"type": "turn", "text": "x" * 200})[-1]["message"]
    assert _ask(server, {"type": "nonsense"})[-1]["event"] == "error"
    assert _ask(server, {"type": "load", "turns": "no"})[-1]["event"] == "error"
    assert server.conversation == Conversation()
    assert _ask(server, {"type": "turn", "text": "hi"})[-1]["event"] == "done"


def test_server_reset_system_load_stats_quit():
    server = ChatServer(FakeEngine("ok"), ServerSettings(8, SamplingConfig(), "S"))
    assert _ask(server, {"type": "stats"}) == [{"event": "stats", "stats": None}]
    _ask(server, {"type": "turn", "text": "hi"})
    assert _ask(server, {"type": "stats"})[0]["stats"]["stages"][0]["prefill_tokens"] > 0
    assert _ask(server, {"type": "reset"}) == [{"event": "ok"}]
    assert server.conversation == Conversation("S")
    _ask(server, {"type": "system", "text": "T"})
    assert server.conversation.system == "T"
    _ask(server, {"type": "load", "system": None, "turns": [{"role": "user", "content": "x"}]})
    assert server.conversation == Conversation(None, (Turn("user", "x"),))
    events: list[dict] = []
    assert server.handle({"type": "quit"}, events.append, lambda: False) is False
    assert events == [{"event": "bye"}]


def test_json_lines_server_stops_an_answer_on_an_interrupt_line():
    server = ChatServer(FakeEngine("A long answer that would go on."), ServerSettings(64, SamplingConfig()))
    read_fd, write_fd = os.pipe()
    requests = [{"type": "turn", "text": "tell"}, {"type": "interrupt"}, {"type": "stats"}, {"type": "quit"}]
    os.write(write_fd, "".join(json.dumps(r) + "\n" for r in requests).encode() + b"not json\n")
    os.close(write_fd)
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    serve_json_lines(server, LineReader(read_fd), json_line_writer(Sink()))
    events = [json.loads(line) for line in lines]
    finals = [e["event"] for e in events if e["event"] != "token"]
    assert finals == ["ready", "done", "stats", "bye"]
    assert events[0]["model"] == "fake"
    done = next(e for e in events if e["event"] == "done")
    assert done["stopped_by"] == "interrupt" and done["answer"] == "A"
    os.close(read_fd)


# -- the front end's commands, over a fake client ---------------------------------------------------

class FakeClient:
    def __init__(self) -> None:
        self.requests: list[dict] = []

    def start(self, wait_s: float) -> dict:
        return {"event": "ready"}

    def ask(self, request, on_token, wait_s) -> dict:
        self.requests.append(request)
        if request["type"] == "turn":
            on_token("Hi ")
            on_token("there")
            return {"event": "done", "stopped_by": "eos", "answer": "Hi there", "dropped_turns": 0}
        return {"event": "stats", "stats": None} if request["type"] == "stats" else {"event": "ok"}

    def close(self) -> int:
        return 0


def _session(tmp_path: Path, transcript: bool = False) -> tuple[ChatSession, FakeClient]:
    client = FakeClient()
    options = ChatOptions("S", tmp_path / "t.jsonl" if transcript else None, 32, SamplingConfig())
    return ChatSession(client, options, 5.0, interactive=False), client


def test_bad_input_gets_a_message_and_the_session_goes_on(tmp_path, capsys):
    session, client = _session(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"turns": [{"role": "wizard", "content": "x"}]}')
    for line in ("", "/frobnicate", "/save", f"/load {bad}", f"/load {wrong}", f"/load {tmp_path / 'none'}"):
        assert session.handle(line) is True
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("(empty message")
    assert err[1] == "unknown command /frobnicate (try /help)"
    assert err[2] == "usage: /save FILE"
    assert "is not valid JSON" in err[3] and "turn 1 of the transcript" in err[4] and "cannot read" in err[5]
    assert client.requests == []
    assert session.handle("/quit") is False


def test_save_then_load_round_trip_and_transcript(tmp_path, capsys):
    session, client = _session(tmp_path, transcript=True)
    session.handle("Hello")
    assert capsys.readouterr().out == "Hi there\n"
    saved = tmp_path / "conv.json"
    session.handle(f"/save {saved}")
    session.handle("/reset")
    assert session.conversation == Conversation("S")
    session.handle(f"/load {saved}")
    assert read_transcript(saved) == session.conversation
    assert session.conversation.turns == (Turn("user", "Hello"), Turn("assistant", "Hi there"))
    assert client.requests[-1] == {"type": "load", **conversation_to_json(session.conversation)}
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert records[:3] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": "Hi there", "stopped_by": "eos"}]


def test_format_stats_shows_prefill_per_stage_and_acceptance():
    stages = (StageStats(1, "a", (0, 15), 0.5, 1.0, 1, prefill_tokens=12),
              StageStats(2, "b", (15, 30), 0.25, 1.0, 1, prefill_tokens=12))
    run = RunStats("speculative", 12, 3, 0.05, 0.05, (0.05, 0.06, 0.07), 0, stages, 1, drafted=4, accepted=3)
    lines = format_stats({**run.to_json_dict(), "context_tokens": 80, "reused_tokens": 68, "stopped_by": "eos"})
    assert "100.0 tok/s" in lines[0]
    assert "12 new tokens prefilled, 68 reused" in lines[1] and "conversation 80 tokens" in lines[1]
    assert lines[2].startswith("acceptance: 75% (3/4")
    assert "layers [0, 15)): prefill 12 tokens, busy 50%" in lines[3]
    assert "busy 25%" in lines[4]
    assert format_stats(None) == ["no answer yet"]
