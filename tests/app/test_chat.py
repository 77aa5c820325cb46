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

from pipeinfer_cpu.app.chat import ChatOptions, ChatSession, choose_sampling, format_stats, read_transcript
from pipeinfer_cpu.app.client import JobEnded, LocalClient
from pipeinfer_cpu.app.options import SamplingOptions
from pipeinfer_cpu.conversation import (
    Conversation,
    Turn,
    answer_reserve,
    common_prefix,
    conversation_from_json,
    conversation_to_json,
    fit_window,
    plain_template,
    plan_feed,
)
from pipeinfer_cpu.errors import ModelError, UserError
from pipeinfer_cpu.head.decoding import Generation
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.server import EngineServer, LineReader, json_line_writer, sampling_json, serve_json_lines
from pipeinfer_cpu.sampling import LLAMA_CLI_DEFAULTS, SamplingConfig
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


# -- the engine server over a fake engine -----------------------------------------------------------

class FakeVocab:
    n_vocab = 0x110000  # a token is a character's code point

    def __init__(self, template: str | None = "fake", broken: bool = False) -> None:
        self.template = template
        self.broken = broken  # llama.cpp does not know the template

    def chat_template(self) -> str | None:
        return self.template

    def apply_chat_template(self, messages, add_assistant=True) -> str:
        if self.broken:
            raise ModelError("unknown chat template")
        return "".join(f"<{r}>{c}|" for r, c in messages) + ("<assistant>" if add_assistant else "")

    def tokenize(self, text, add_special=True, parse_special=True) -> list[int]:
        return [ord(c) for c in text]

    def chat_tokens(self, messages) -> list[int]:
        return self.tokenize(self.apply_chat_template(messages))

    def text_tokens(self, text, parse_special=True) -> list[int]:
        return self.tokenize(text)

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
    mode: Mode = Mode.SINGLE
    spec: None = None


@dataclass(frozen=True)
class FakeInfo:
    name: str = "fake"


class FakeEngine:
    """What EngineServer uses of an Engine. Answers every prompt with `answer` then the end token,
    like the real decoder: the last token sampled stays pending (not in the KV cache)."""

    def __init__(self, answer: str, n_ctx: int = 4096, vocab: FakeVocab | None = None) -> None:
        self.answer = answer
        self.settings = FakeSettings(n_ctx)
        self.info = FakeInfo()
        self.vocab = vocab or FakeVocab()
        self.decoder = FakeDecoder()
        self.stage_ranks: list[int] = []
        self.shards = None
        self.fed: list[list[int]] = []
        self.calls: list[dict] = []  # what each generate was given, and the context it found
        self.resets = 0
        self.closed = False
        self.logits = np.array([0.5, -1.25, 3.0, 1e-3], dtype=np.float32)

    @property
    def context_tokens(self) -> tuple[int, ...]:
        return tuple(self.decoder.kv_tokens)

    def truncate_context(self, n_keep: int) -> None:
        self.decoder.truncate(n_keep)

    def reset_context(self) -> None:
        self.resets += 1
        self.decoder.kv_tokens = []

    def encode(self, text: str, chat: bool = False, system: str | None = None,
               parse_special: bool = True) -> list[int]:
        messages = ([("system", system)] if system else []) + [("user", text)]
        return self.vocab.chat_tokens(messages) if chat else self.vocab.text_tokens(text)

    def backends_json(self) -> list[dict]:
        return [{"rank": 0, "variant": "fake"}]

    def rank_names(self) -> dict[str, str]:
        return {"0": "rank 0 (the head, on here)"}

    def close(self) -> None:
        self.closed = True

    def generate(self, tokens, max_tokens, sampling, on_token, should_stop, keep_first_logits=False, replay=()):
        self.calls.append({"context": self.context_tokens, "max_tokens": max_tokens, "sampling": sampling,
                           "keep_first_logits": keep_first_logits})
        self.fed.append(list(tokens))
        self.decoder.kv_tokens.extend(tokens)
        produced: list[int] = []
        stopped_by = "length"
        for token in ([ord(c) for c in self.answer] + [END])[:max_tokens]:
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
        first_logits = self.logits.copy() if keep_first_logits else None
        return Generation(tuple(tokens), tuple(produced), 0.01, times, first_logits, stopped_by), stats


def turn_request(conversation: Conversation, first: int = 0, max_tokens: int = 64, interrupt: bool = False,
                 sampling: SamplingConfig = SamplingConfig()) -> dict:
    """A `turn` request as ChatSession sends it: the whole conversation, ending with the new user turn."""
    return {"type": "turn", "conversation": conversation_to_json(conversation), "first": first,
            "max_tokens": max_tokens, "sampling": sampling_json(sampling), "interrupt": interrupt}


def complete_request(text: str, **fields) -> dict:
    return {"type": "complete", "text": text, "max_tokens": 64, "sampling": sampling_json(SamplingConfig()), **fields}


def _ask(server: EngineServer, request: dict, stop_after: int | None = None) -> list[dict]:
    events: list[dict] = []
    tokens = lambda: sum(e["event"] == "token" for e in events)  # noqa: E731
    assert server.handle(request, events.append, lambda: stop_after is not None and tokens() >= stop_after)
    assert [e["event"] for e in events[:-1]] == ["token"] * (len(events) - 1)  # one final event, tokens before it
    return events


def _shown(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["event"] == "token")


def _error(server: EngineServer, request: dict) -> str:
    """The message of the one error event a request gets."""
    events = _ask(server, request)
    assert len(events) == 1 and events[0]["event"] == "error", events
    return events[0]["message"]


def _text(tokens) -> str:
    return "".join(map(chr, tokens))


def test_ready_event_describes_the_engine():
    assert EngineServer(FakeEngine("ok", n_ctx=512)).ready_event() == {
        "event": "ready", "model": "fake", "mode": "single", "stages": 1, "n_ctx": 512, "notice": None,
        "ranks": {"0": "rank 0 (the head, on here)"}, "shards": None}


def test_second_turn_prefills_only_its_own_tokens():
    engine = FakeEngine("Blue.")
    server = EngineServer(engine)
    asked = Conversation("S").with_turn("user", "My colour is blue.")
    first = _ask(server, turn_request(asked))
    assert _shown(first) == "Blue."
    done = first[-1]
    assert {k: v for k, v in done.items() if k != "stats"} == {
        "event": "done", "stopped_by": "eos", "answer": "Blue.", "dropped_turns": 0}
    assert done["stats"]["reused_tokens"] == 0 and done["stats"]["dropped_turns"] == 0
    assert done["stats"]["stopped_by"] == "eos"
    asked = asked.with_turn("assistant", done["answer"]).with_turn("user", "Which colour?")
    second = _ask(server, turn_request(asked))[-1]
    whole = engine.vocab.tokenize(engine.vocab.apply_chat_template(asked.messages()))
    assert len(engine.fed[1]) < len(whole) / 2
    assert _text(engine.fed[1]) == "|<user>Which colour?|<assistant>"  # the end token was pending
    stats = second["stats"]
    assert stats["reused_tokens"] + len(engine.fed[1]) == stats["context_tokens"] == len(whole)
    assert stats["stages"][0]["prefill_tokens"] == len(engine.fed[1]) > 0


def test_turn_takes_max_tokens_and_sampling_from_the_request():
    engine = FakeEngine("Blue sky.")
    server = EngineServer(engine)
    sampling = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repeat_penalty=1.1, repeat_last_n=32,
                              frequency_penalty=0.2, presence_penalty=-0.1, seed=3)
    done = _ask(server, turn_request(Conversation().with_turn("user", "hi"), max_tokens=3, sampling=sampling))[-1]
    assert engine.calls[0]["sampling"] == sampling
    assert engine.calls[0]["max_tokens"] == 3
    assert done["stopped_by"] == "length" and done["answer"] == "Blu"


def test_turn_starts_at_the_first_turn_the_request_names():
    engine = FakeEngine("ok")
    server = EngineServer(engine)
    asked = _long_conversation(3)
    done = _ask(server, turn_request(asked, first=2))[-1]
    assert done["dropped_turns"] == done["stats"]["dropped_turns"] == 2
    assert engine.fed[0] == render_chars(asked.messages(2))  # the system message, then turns[2:]


def test_interrupted_answer_keeps_what_was_shown():
    engine = FakeEngine("Once upon a time there was a dragon.")
    server = EngineServer(engine)
    asked = Conversation().with_turn("user", "A story")
    events = _ask(server, turn_request(asked), stop_after=4)
    assert events[-1]["stopped_by"] == events[-1]["stats"]["stopped_by"] == "interrupt"
    assert events[-1]["answer"] == _shown(events) == "Once"
    asked = asked.with_turn("assistant", "Once").with_turn("user", "Go on")  # the front end keeps it as shown
    _ask(server, turn_request(asked))
    assert _text(engine.fed[1]).startswith("e|<user>Go on")  # the pending token, then the turn


def test_ctrl_c_typed_with_the_enter_stops_the_answer_at_once():
    engine = FakeEngine("Once upon a time.")
    done = _ask(EngineServer(engine), turn_request(Conversation().with_turn("user", "A story"), interrupt=True))[-1]
    assert done["stopped_by"] == "interrupt" and done["answer"] == "O"


def test_server_reports_bad_requests_and_goes_on():
    engine = FakeEngine("ok", n_ctx=64)
    server = EngineServer(engine)

    def turn(asked: Conversation, **fields) -> dict:
        return {**turn_request(asked, max_tokens=8), **fields}

    assert _error(server, turn(Conversation().with_turn("user", "  "))).startswith("an empty message")
    assert _error(server, turn(Conversation("S"))).startswith("an empty message")
    assert _error(server, turn(Conversation().with_turn("user", "hi").with_turn("assistant", "yo"))).startswith(
        "an empty message")
    assert "too long" in _error(server, turn(Conversation().with_turn("user", "x" * 200)))
    assert "transcript" in _error(server, turn(Conversation(), conversation={"turns": "no"}))
    assert "transcript" in _error(server, {"type": "turn", "max_tokens": 8})
    assert _error(server, {"type": "nonsense"}) == "unknown request 'nonsense'"
    assert "unknown request" in _error(server, {"no": "type"})
    assert engine.fed == [] and engine.context_tokens == () and engine.decoder.truncations == []  # nothing reached it
    assert "bad sampling" in _error(server, turn(Conversation().with_turn("user", "hi"), sampling={"top_p": 0}))
    assert "bad sampling" in _error(server, turn(Conversation().with_turn("user", "hi"), sampling={"colour": 1}))
    assert "bad sampling" in _error(server, turn(Conversation().with_turn("user", "hi"), sampling=None))
    assert "min_p must be in [0, 1]" in _error(server, turn(Conversation().with_turn("user", "hi"), sampling={"min_p": 2}))
    assert "repeat_penalty must be a finite number > 0" in _error(
        server, turn(Conversation().with_turn("user", "hi"), sampling={"repeat_penalty": "x"}))
    assert engine.fed == [] and engine.context_tokens == ()
    assert _ask(server, turn(Conversation().with_turn("user", "hi")))[-1]["event"] == "done"


def test_an_empty_prompt_is_refused_and_the_cache_kept():
    engine = FakeEngine("ok")
    server = EngineServer(engine)
    _ask(server, complete_request("abc"))
    held = engine.context_tokens
    assert "the prompt is empty" in _error(server, complete_request("", fresh=True))
    assert engine.context_tokens == held


def test_a_refused_request_leaves_the_stages_cache_as_it_was():
    engine = FakeEngine("ok")
    server = EngineServer(engine)
    _ask(server, turn_request(Conversation("S").with_turn("user", "hi")))
    held = engine.context_tokens
    other = Conversation("T").with_turn("user", "something else")
    assert "bad sampling" in _error(server, {**turn_request(other), "sampling": {"top_p": 0}})
    assert "bad sampling" in _error(server, complete_request("x", fresh=True, sampling={"top_p": 0}))
    assert engine.context_tokens == held


def test_strict_refuses_what_does_not_fit_counting_the_context_a_prompt_follows_and_keeps_the_cache():
    engine = FakeEngine("ok", n_ctx=64)
    server = EngineServer(engine)
    _ask(server, complete_request("x" * 30, max_tokens=4))
    held = engine.context_tokens
    events = _ask(server, complete_request("y" * 30, fresh=True, strict=True, max_tokens=40))
    assert events[0]["event"] == "error" and events[0]["code"] == "context_length_exceeded"
    assert "max_tokens asks for 40 more" in events[0]["message"] and engine.context_tokens == held
    assert "the context holds 64" in _error(server, complete_request("y" * 30, strict=True, max_tokens=4))  # follows
    assert _ask(server, complete_request("y" * 30, strict=True, fresh=True, max_tokens=4))[-1]["event"] == "done"


def test_server_holds_no_conversation_stats_reset_system_load_are_unknown():
    engine = FakeEngine("ok")
    server = EngineServer(engine)
    _ask(server, turn_request(Conversation("S").with_turn("user", "hi")))
    held = engine.context_tokens
    for request in ({"type": "stats"}, {"type": "reset"}, {"type": "system", "text": "T"},
                    {"type": "load", "system": None, "turns": [{"role": "user", "content": "x"}]}):
        assert _error(server, request) == f"unknown request {request['type']!r}"
    assert engine.context_tokens == held and engine.resets == 0  # the stages' cache is untouched
    assert not hasattr(server, "conversation")
    events: list[dict] = []
    assert server.handle({"type": "interrupt"}, events.append, lambda: False) is True  # late: nothing to stop
    assert events == []
    assert server.handle({"type": "quit"}, events.append, lambda: False) is False
    assert events == [{"event": "bye"}]


@pytest.mark.parametrize("vocab, why", [(FakeVocab(template=None), "has no chat template"),
                                        (FakeVocab(broken=True), "does not know this model's chat template")])
def test_without_a_usable_chat_template_the_plain_format_is_used(vocab, why):
    engine = FakeEngine("Sure.\nUser: and another question", vocab=vocab)
    server = EngineServer(engine)
    assert why in server.ready_event()["notice"]
    done = _ask(server, turn_request(Conversation("S").with_turn("user", "hi")))[-1]
    assert _text(engine.fed[0]) == plain_template([("system", "S"), ("user", "hi")])
    assert done["answer"] == "Sure."  # stopped where the model began the user's next turn


# -- complete: one prompt ---------------------------------------------------------------------------

def test_complete_answers_raw_text():
    engine = FakeEngine("Hello!")
    server = EngineServer(engine)
    events = _ask(server, complete_request("Say hi"))
    assert _shown(events) == "Hello!"
    done = events[-1]
    assert done["event"] == "done" and done["stopped_by"] == "eos" and done["answer"] == "Hello!"
    assert engine.fed == [[ord(c) for c in "Say hi"]]
    stats = done["stats"]
    assert stats["prompt_tokens"] == [ord(c) for c in "Say hi"]
    assert stats["tokens"] == [ord(c) for c in "Hello!"] + [END]
    assert stats["stopped_by"] == "eos"
    assert stats["cpu_backends"] == engine.backends_json()
    run = RunStats.from_json_dict(stats)
    assert (run.n_prompt, run.n_generated) == (6, 7)
    assert "first_logits" not in done and engine.calls[0]["keep_first_logits"] is False
    assert engine.resets == 0


def test_complete_renders_one_user_turn_with_the_chat_template():
    engine = FakeEngine("ok")
    _ask(EngineServer(engine), complete_request("hi", chat_template=True, system="S"))
    assert _text(engine.fed[0]) == "<system>S|<user>hi|<assistant>"


def test_complete_fresh_empties_the_context_first():
    engine = FakeEngine("ok")
    server = EngineServer(engine)
    _ask(server, complete_request("one"))
    held = engine.context_tokens
    assert held
    _ask(server, complete_request("two"))  # not fresh: the prompt follows what the stages hold
    assert engine.calls[1]["context"] == held and engine.resets == 0
    _ask(server, complete_request("three", fresh=True))
    assert engine.resets == 1 and engine.calls[2]["context"] == ()
    assert engine.fed[2] == [ord(c) for c in "three"]


def test_complete_returns_the_first_logits_when_asked():
    engine = FakeEngine("ok")
    done = _ask(EngineServer(engine), complete_request("x", keep_first_logits=True))[-1]
    assert engine.calls[0]["keep_first_logits"] is True
    logits = np.frombuffer(base64.b64decode(done["first_logits"]), dtype="<f4")
    np.testing.assert_array_equal(logits, engine.logits)


def test_complete_takes_max_tokens_and_sampling_and_stops_on_request():
    engine = FakeEngine("Hello there")
    server = EngineServer(engine)
    sampling = SamplingConfig(temperature=1.0, seed=7)
    done = _ask(server, {**complete_request("x", max_tokens=3), "sampling": sampling_json(sampling)})[-1]
    assert engine.calls[0]["sampling"] == sampling and engine.calls[0]["max_tokens"] == 3
    assert done["stopped_by"] == done["stats"]["stopped_by"] == "length" and done["answer"] == "Hel"
    done = _ask(server, complete_request("x"), stop_after=2)[-1]
    assert done["stopped_by"] == "interrupt" and done["answer"] == "He"
    assert "bad sampling" in _error(server, complete_request("x", sampling={"temperature": -1}))


# -- JSON lines -------------------------------------------------------------------------------------

def _serve(server: EngineServer, requests: list, tail: bytes = b"") -> list[dict]:
    """Serve `requests` (dicts, or raw lines) written to a pipe at once, then its end; the events."""
    read_fd, write_fd = os.pipe()
    lines = [r if isinstance(r, str) else json.dumps(r) for r in requests]
    os.write(write_fd, "".join(line + "\n" for line in lines).encode() + tail)
    os.close(write_fd)
    written: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            written.append(text)

        def flush(self) -> None:
            pass

    try:
        serve_json_lines(server, LineReader(read_fd), json_line_writer(Sink()))
    finally:
        os.close(read_fd)
    return [json.loads(line) for line in written]


def test_json_lines_server_stops_an_answer_on_an_interrupt_line():
    server = EngineServer(FakeEngine("A long answer that would go on."))
    asked = Conversation().with_turn("user", "tell")
    events = _serve(server, [turn_request(asked), {"type": "interrupt"}, {"type": "stats"}, {"type": "quit"}],
                    tail=b"not json\n")
    finals = [e["event"] for e in events if e["event"] != "token"]
    assert finals == ["ready", "done", "error", "bye"]
    assert events[0]["model"] == "fake"
    done = next(e for e in events if e["event"] == "done")
    assert done["stopped_by"] == "interrupt" and done["answer"] == "A"
    assert next(e for e in events if e["event"] == "error")["message"] == "unknown request 'stats'"


def test_json_lines_server_reports_a_bad_line_and_ends_at_the_end_of_input():
    engine = FakeEngine("ok")
    events = _serve(EngineServer(engine), ["not json", "[1, 2]", turn_request(Conversation().with_turn("user", "hi"))])
    assert [e["event"] for e in events if e["event"] != "token"] == ["ready", "error", "error", "done"]
    assert events[1]["message"] == events[2]["message"] == "unknown request 'invalid'"
    assert events[-1]["stopped_by"] == "interrupt"  # the front end is gone (end of input): the answer stops
    assert events[-1]["answer"] == "o"


# -- the front end's commands, over a fake client ---------------------------------------------------

STATS = {**RunStats("single", 7, 2, 0.01, 0.01, (0.01, 0.02), 0,
                    (StageStats(0, "here", (0, 30), 0.5, 1.0, 1, prefill_tokens=7),), 1).to_json_dict(),
         "context_tokens": 20, "reused_tokens": 13, "dropped_turns": 0, "stopped_by": "eos"}


# -- the chat's sampling: the options given, else the model's recommendation, else llama.cpp's ---------

def test_chat_samples_with_llama_cpps_defaults_when_the_model_recommends_nothing():
    config, source = choose_sampling(SamplingOptions({}), {})
    assert config == LLAMA_CLI_DEFAULTS
    assert f"{config.summary()} ({source})" == ("temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, seed 0 "
                                                "(llama.cpp's defaults; --temp 0 for greedy)")


def test_chat_options_override_the_models_recommendation_which_overrides_llama_cpp():
    config, source = choose_sampling(SamplingOptions({"temperature": 0.2, "seed": 5}),
                                     {"temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.05})
    assert config == SamplingConfig(temperature=0.2, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.05, seed=5)
    assert source == ("temperature, seed: yours; top-p, repeat-penalty: the model's recommendation; "
                      "the rest llama.cpp's defaults; --temp 0 for greedy")
    assert choose_sampling(SamplingOptions({"temperature": 0.0}), {})[1] == (
        "temperature: yours; the rest llama.cpp's defaults")


def test_a_recommendation_that_does_not_work_is_a_user_error_unless_overridden():
    with pytest.raises(UserError, match="general.sampling.* in its GGUF file.*top_p must be in"):
        choose_sampling(SamplingOptions({}), {"top_p": 0.0})
    assert choose_sampling(SamplingOptions({"top_p": 0.5}), {"top_p": 0.0})[0].top_p == 0.5


@pytest.mark.parametrize("given, fragment", [({"min_p": 1.5}, "min_p must be in [0, 1]"),
                                             ({"repeat_last_n": -1}, "repeat_last_n must be an integer >= 0")])
def test_bad_sampling_options_are_one_user_error(given, fragment):
    with pytest.raises(UserError) as caught:
        SamplingOptions(given)
    assert fragment in str(caught.value)


class FakeClient:
    """Answers every turn with "Hi there" (or what `replies` says for the next ones)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.replies: list[dict] = []

    def start(self, wait_s: float) -> dict:
        return {"event": "ready"}

    def ask(self, request, on_token, wait_s) -> dict:
        self.requests.append(request)
        assert request["type"] == "turn"  # every command is the session's own business
        reply = self.replies.pop(0) if self.replies else {}
        if reply.get("event") == "error":
            return reply
        on_token("Hi ")
        if "raise" in reply:
            raise reply["raise"]
        on_token("there")
        return {"event": "done", "stopped_by": "eos", "answer": "Hi there", "dropped_turns": 0, "stats": STATS,
                **reply}

    def close(self) -> int:
        return 0


def _session(tmp_path: Path, transcript: bool = False) -> tuple[ChatSession, FakeClient]:
    client = FakeClient()
    options = ChatOptions("S", tmp_path / "t.jsonl" if transcript else None, 32, SamplingConfig())
    return ChatSession(client, options, 5.0, interactive=False), client


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]


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
    assert session.conversation == Conversation("S")
    assert session.handle("/quit") is False


def test_each_turn_sends_the_whole_conversation(tmp_path, capsys):
    session, client = _session(tmp_path)
    session.handle("Hello")
    session.handle("More")
    assert capsys.readouterr().out == "Hi there\nHi there\n"
    asked = Conversation("S", (Turn("user", "Hello"), Turn("assistant", "Hi there"), Turn("user", "More")))
    assert client.requests[0]["sampling"] == sampling_json(SamplingConfig())
    # each answer samples with seed + the answers before it: a stream of its own, and still replayable
    assert client.requests[1] == {"type": "turn", "conversation": conversation_to_json(asked), "first": 0,
                                  "max_tokens": 32, "sampling": sampling_json(SamplingConfig(seed=1)),
                                  "interrupt": False}
    assert session.conversation == asked.with_turn("assistant", "Hi there")


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
    assert len(client.requests) == 1  # /save, /reset and /load ask nothing of the server
    session.handle("Again")  # the next turn carries the loaded conversation
    assert client.requests[-1]["conversation"] == conversation_to_json(
        read_transcript(saved).with_turn("user", "Again"))
    assert client.requests[-1]["first"] == 0
    records = _records(tmp_path)
    assert records[:3] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": "Hi there", "stopped_by": "eos"}]
    assert records[3:5] == [{"reset": True}, {"loaded": str(saved)}]


def test_stats_reset_system_load_are_handled_by_the_session(tmp_path, capsys):
    session, client = _session(tmp_path)
    session.handle("/stats")
    assert capsys.readouterr().err.strip() == "no answer yet"
    session.handle("hi")
    session.handle("/stats")
    err = capsys.readouterr().err
    assert err.splitlines() == format_stats(STATS)
    assert "prefill 7 tokens" in err
    session.handle("/reset")
    assert session.conversation == Conversation("S")
    session.handle("/system T")
    assert session.conversation.system == "T"
    session.handle("/system")
    assert "system message: 'T'" in capsys.readouterr().err
    session.handle("ho")  # the next turn carries the reset conversation and the new system message
    assert client.requests[-1]["conversation"] == {"system": "T", "turns": [{"role": "user", "content": "ho"}]}
    loaded = tmp_path / "x.json"
    loaded.write_text(json.dumps({"system": None, "turns": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]}))
    session.handle(f"/load {loaded}")
    assert session.conversation == Conversation(None, (Turn("user", "x"), Turn("assistant", "y")))
    assert [r["type"] for r in client.requests] == ["turn", "turn"]  # none of the commands reached the server
    session.handle("z")
    assert client.requests[-1]["conversation"] == {"system": None, "turns": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]}


def test_dropped_turns_are_announced_once_and_the_next_turn_starts_there(tmp_path, capsys):
    session, client = _session(tmp_path)
    client.replies = [{"dropped_turns": 2}, {"dropped_turns": 2}, {}, {"dropped_turns": 4}]
    session.handle("a")
    assert "[the 2 oldest turns no longer fit the context" in capsys.readouterr().err
    session.handle("b")
    assert client.requests[1]["first"] == 2
    assert "oldest turns" not in capsys.readouterr().err
    assert len(session.conversation.turns) == 4  # dropped turns stay in the history
    session.handle("/reset")
    session.handle("c")
    assert client.requests[2]["first"] == 0
    session.handle("d")
    assert "[the 4 oldest turns" in capsys.readouterr().err


def test_interrupted_or_cut_answers_are_kept_as_shown(tmp_path, capsys):
    session, client = _session(tmp_path, transcript=True)
    client.replies = [{"stopped_by": "interrupt", "answer": "Hi"}, {"stopped_by": "length"}]
    session.handle("A story")
    assert session.conversation.turns[-1] == Turn("assistant", "Hi")
    assert "[interrupted]" in capsys.readouterr().err
    session.handle("Go on")
    assert "[stopped at the answer limit (length)]" in capsys.readouterr().err
    assert [r.get("stopped_by") for r in _records(tmp_path)[1:]] == [None, "interrupt", None, "length"]


def test_an_error_reply_leaves_the_conversation_as_it_was(tmp_path, capsys):
    session, client = _session(tmp_path, transcript=True)
    client.replies = [{"event": "error", "message": "this message is too long: ..."}]
    session.handle("x" * 100)
    out = capsys.readouterr()
    assert out.out == "" and "error: this message is too long" in out.err
    assert session.conversation == Conversation("S")
    assert _records(tmp_path) == [{"role": "system", "content": "S"}]
    session.handle("hi")
    assert client.requests[-1]["conversation"]["turns"] == [{"role": "user", "content": "hi"}]


def test_a_job_that_ends_mid_answer_keeps_what_was_shown(tmp_path, capsys):
    session, client = _session(tmp_path, transcript=True)
    client.replies = [{"raise": JobEnded("the MPI job ended")}]
    with pytest.raises(JobEnded):
        session.handle("Hello")
    assert session.conversation.turns == (Turn("user", "Hello"), Turn("assistant", "Hi "))
    assert _records(tmp_path)[-1] == {"role": "assistant", "content": "Hi ", "stopped_by": "error"}


# -- the session over the engine server, in one process ---------------------------------------------

class RecordingLocalClient(LocalClient):
    """The in-process client, recording requests; `ctrl_c_after` tokens shown, Ctrl-C is pressed."""

    def __init__(self, server: EngineServer, ctrl_c_after: int | None = None) -> None:
        super().__init__(server)
        self.requests: list[dict] = []
        self.ctrl_c_after = ctrl_c_after

    def ask(self, request, on_token, wait_s) -> dict:
        self.requests.append(request)
        shown: list[str] = []

        def token(piece: str) -> None:
            on_token(piece)
            shown.append(piece)
            if len(shown) == self.ctrl_c_after:
                os.kill(os.getpid(), signal.SIGINT)

        return super().ask(request, token, wait_s)


def _local_session(engine: FakeEngine, max_tokens: int = 64, **client) -> tuple[ChatSession, RecordingLocalClient]:
    local = RecordingLocalClient(EngineServer(engine), **client)
    return ChatSession(local, ChatOptions("S", None, max_tokens, SamplingConfig()), 5.0, interactive=False), local


def test_session_over_the_engine_server_reuses_the_cache(capsys):
    engine = FakeEngine("Blue.")
    session, client = _local_session(engine)
    session.handle("My colour is blue.")
    session.handle("Which colour?")
    assert capsys.readouterr().out == "Blue.\nBlue.\n"
    assert _text(engine.fed[1]) == "|<user>Which colour?|<assistant>"
    session.handle("/stats")
    assert f"prompt: {len(engine.fed[1])} new tokens prefilled" in capsys.readouterr().err
    session.handle("/reset")
    assert len(engine.fed) == 2  # /reset reached no engine; the next turn brings the cache in line
    session.handle("Hi")
    assert engine.decoder.truncations[-1] == len("<system>S|<user>")
    assert _text(engine.fed[2]) == "Hi|<assistant>"
    assert client.close() == 0 and engine.closed


def test_ctrl_c_through_the_local_client_stops_the_answer_and_keeps_it(capsys):
    engine = FakeEngine("Once upon a time there was a dragon.")
    before = signal.getsignal(signal.SIGINT)
    session, client = _local_session(engine, ctrl_c_after=4)
    session.handle("A story")
    assert session.conversation.turns[-1] == Turn("assistant", "Once")
    assert "[interrupted]" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    client.ctrl_c_after = None
    session.handle("Go on")
    assert _text(engine.fed[1]).startswith("e|<user>Go on")


def test_session_over_the_engine_server_drops_the_oldest_turns(capsys):
    engine = FakeEngine("ok", n_ctx=160)
    session, client = _local_session(engine, max_tokens=8)
    for i in range(12):
        session.handle(f"question number {i}")
        if session.first:
            break
    dropped = session.first
    assert dropped > 0 and session.conversation.turns[dropped].role == "user"
    assert f"[the {dropped} oldest turns no longer fit the context" in capsys.readouterr().err
    session.handle("one more")
    assert client.requests[-1]["first"] == dropped
    assert session.first >= dropped  # never back
    assert len(session.conversation.turns) == 2 * (i + 2)  # the history keeps every turn


# -- which rank died (app/client.py) ---------------------------------------------------------------

RANKS = {"0": "rank 0 (the head, on a)", "1": "rank 1 (stage 1, layers 0-15, on a)",
         "2": "rank 2 (stage 2, layers 15-30, on b)"}


def test_the_rank_that_died_is_named_from_what_mpiexec_says():
    from pipeinfer_cpu.app.client import who_died

    placement = ("node-a", "node-a", "node-b")
    assert who_died(RANKS, placement, 2, None) == RANKS["2"]  # Open MPI names the rank
    assert who_died(RANKS, placement, None, "node-b") == RANKS["2"]  # MPICH the host: one rank there
    assert who_died(RANKS, placement, None, "node-a") == f"a process on node-a (one of {RANKS['0']}, {RANKS['1']})"
    assert who_died(RANKS, placement, None, None) == "a rank"


def test_a_long_request_comes_in_parts_each_acknowledged():
    """The head's side of JobClient._send's parts: put together into the request, one `part` event each."""
    request = complete_request("x" * 50)
    line = json.dumps(request)
    parts = [json.dumps({"type": "part", "text": line[i:i + 20], "end": i + 20 >= len(line)})
             for i in range(0, len(line), 20)]
    reader_fd, writer_fd = os.pipe()
    os.write(writer_fd, ("\n".join(parts) + "\n" + json.dumps({"type": "quit"}) + "\n").encode())
    os.close(writer_fd)
    events: list[dict] = []
    serve_json_lines(EngineServer(FakeEngine("ok")), LineReader(reader_fd), events.append)
    os.close(reader_fd)
    kinds = [e["event"] for e in events]
    assert kinds[:1 + len(parts)] == ["ready"] + ["part"] * len(parts) and "done" in kinds and kinds[-1] == "bye"
