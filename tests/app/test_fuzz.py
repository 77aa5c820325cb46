"""Bad input, looked for the way a fuzzer would (hypothesis): whatever a user types in a hostfile, a
link setting, a --draft or --weights value, the engine and sampling options, a chat command or a
request to the engine, the answer is a result or one UserError, never another exception (which
would print a traceback). Every case found this way stays below as an explicit example."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeinfer_cpu.app.chat import ChatOptions, ChatSession
from pipeinfer_cpu.app.client import LocalClient
from pipeinfer_cpu.app.hostfile import parse_hostfile, parse_links, set_weights, without_host_line
from pipeinfer_cpu.app.options import EngineOptions, SamplingOptions
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.ngram import NgramSettings
from pipeinfer_cpu.head.server import EngineServer
from pipeinfer_cpu.head.specdecode import SpecSettings
from pipeinfer_cpu.modelfiles.planning import parse_weights, split_layers
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.wire.faults import parse_faults
from pipeinfer_cpu.wire.links import LinkSpec
from test_chat import FakeEngine

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

HOST_LINE = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
    st.builds(lambda host, slots, comment: f"{host}{slots} {comment}",
              st.sampled_from(["node1", "a.b-c", "", "127.0.0.1", "x y"]),
              st.sampled_from(["", ":2", ":0", " slots=3", ":x", " max_slots=2"]),
              st.sampled_from(["", "# weight=2", "# weight=-1", "# threads=0", "# weight=nan", "# weight=1e400",
                               "# threads=2.5", "# link node1 node1 bw=1gbit", "# link node1 zz delay=1ms",
                               "# weight=2 weight=3", "#weight=", "# threads=4 free text"])),
)


@FUZZ
@given(lines=st.lists(HOST_LINE, max_size=6))
@example(lines=["node1  # weight=0"])
@example(lines=["0#weight=1E400"])  # found by this test: an infinite weight was taken
@example(lines=["# link node1 node1 bw=1gbit,delay=1ms", "node1"])
def test_any_hostfile_is_hosts_or_one_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("h") / "hosts.txt"
    path.write_text("\n".join(lines))
    try:
        hosts = parse_hostfile(path)
        parse_links(path)
    except UserError:
        return
    assert hosts and all(h.weight > 0 and math.isfinite(h.weight) and h.threads >= 0 for h in hosts)
    text = path.read_text()
    assert len(parse_hostfile_text(set_weights(text, [1.5] * len(hosts), "h"), tmp_path_factory)) == len(hosts)
    if len(hosts) > 1:
        assert len(parse_hostfile_text(without_host_line(text, 0, "h"), tmp_path_factory)) == len(hosts) - 1


def parse_hostfile_text(text: str, factory) -> tuple:
    path = factory.mktemp("h") / "hosts.txt"
    path.write_text(text)
    return parse_hostfile(path)


@FUZZ
@given(text=st.one_of(st.text(max_size=40), st.builds(
    lambda k, v, u: f"{k}={v}{u}", st.sampled_from(["bw", "delay", "jitter", "BW", "x"]),
    st.sampled_from(["1", "0", "-1", "1e400", "nan", "inf", "0.5", "", "1e-9"]),
    st.sampled_from(["", "mbit", "gbit", "ms", "us", "s", "kbit", "bit", "MBIT"]))))
@example(text="bw=nan")
@example(text="delay=infs")
def test_any_link_setting_is_a_link_or_one_error(text):
    try:
        spec = LinkSpec.parse(text)
    except UserError:
        return
    assert (spec.rate_bps is None or spec.rate_bps > 0) and spec.delay_s >= 0 and spec.jitter_s >= 0


@FUZZ
@given(text=st.one_of(st.text(max_size=20), st.from_regex(r"ngram(:-?\d{0,30},-?\d{0,30})?", fullmatch=True)))
@example(text="ngram:0,5")
@example(text="ngram:99999999999999999999,1")
def test_any_ngram_draft_is_settings_or_one_error(text):
    if not NgramSettings.is_spec(text):
        return
    try:
        settings_ = NgramSettings.parse(text)
    except UserError:
        return
    assert settings_.n >= 1 and settings_.k >= 1


@FUZZ
@given(text=st.one_of(st.text(max_size=30), st.lists(st.sampled_from(["1", "0", "-2", "nan", "inf", "1e308", "2.5", ""]),
                                                     max_size=5).map(",".join)),
       n_stages=st.integers(1, 5), n_layer=st.integers(1, 64))
@example(text="1e308,1e308", n_stages=2, n_layer=30)  # found by this test: the weights' sum overflowed
def test_any_weights_are_a_split_or_one_error(text, n_stages, n_layer):
    try:
        ranges = split_layers(n_layer, parse_weights(text, n_stages))
    except UserError:
        return
    assert sum(r.size for r in ranges) == n_layer and all(r.size >= 1 for r in ranges)


NUMBER = st.one_of(st.integers(-10, 10_000), st.floats(allow_nan=True, allow_infinity=True))


@FUZZ
@given(threads=st.integers(-3, 64), n_ctx=st.integers(-5, 70_000), n_batch=st.integers(-2, 4096),
       draft_max=st.integers(-2, 100), max_inflight=st.integers(-2, 64), p_accept=NUMBER, p_split=NUMBER,
       mode=st.sampled_from(list(Mode)), draft=st.sampled_from([None, "ngram", "ngram:2,4", "ngram:0,1"]),
       stages=st.one_of(st.none(), st.integers(-1, 9)), weights=st.one_of(st.none(), st.sampled_from(["1,1", "2", "x"])),
       link=st.one_of(st.none(), st.sampled_from(["bw=1gbit", "delay=-1ms", "bw=0"])))
def test_any_engine_options_are_settings_or_one_error(threads, n_ctx, n_batch, draft_max, max_inflight, p_accept,
                                                      p_split, mode, draft, stages, weights, link):
    try:
        spec = SpecSettings(mode, draft_max=draft_max, max_inflight=max_inflight, p_accept=p_accept, p_split=p_split)
        options = EngineOptions(threads=threads, n_ctx=n_ctx, n_batch=n_batch, spec=spec,
                                draft=None if draft is None else Path(draft), stages=stages, weights=weights, link=link)
        options.settings  # noqa: B018 (the checks run when the settings are made)
    except UserError:
        return


@FUZZ
@given(given_=st.dictionaries(st.sampled_from(["temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                               "repeat_last_n", "frequency_penalty", "presence_penalty", "seed"]),
                              NUMBER, max_size=4))
@example(given_={"top_k": -1})
@example(given_={"repeat_penalty": math.inf})
def test_any_sampling_options_are_settings_or_one_error(given_):
    try:
        SamplingOptions(given_).over(SamplingConfig())
    except UserError:
        return


@FUZZ
@given(faults=st.text(st.sampled_from("0123456789:;=.runstalldiereplydrafttruncateversion "), max_size=30))
def test_any_fault_spec_is_faults_or_one_error(faults):
    try:
        parse_faults(faults)
    except UserError:
        return


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Iterator[ChatSession]:
    """A chat session over a fake engine, in a directory of its own: /save writes where it is told."""
    client = LocalClient(EngineServer(FakeEngine("ok", n_ctx=256)))
    where = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("chat-cwd"))
    yield ChatSession(client, ChatOptions("S", None, 16, SamplingConfig()), 5.0, interactive=False)
    os.chdir(where)


@FUZZ
@given(line=st.one_of(st.text(max_size=60), st.builds(
    lambda name, arg: f"/{name} {arg}", st.sampled_from(["help", "stats", "reset", "system", "save", "load", "quit",
                                                         "HELP", "x", ""]),
    st.sampled_from(["", " ", "/nonexistent/dir/file.json", "a" * 300, "\x00", "..", "-1"]))))
@example(line="/load /")
@example(line="/save \x00")  # found by this test: a NUL byte in a path raised ValueError
@example(line="/save /proc/x")
def test_any_chat_line_is_handled(chat, line, capsys):
    chat.handle(line)  # a command, an error said in one line, or a turn: never an exception


REQUEST_FIELD = st.one_of(st.none(), st.booleans(), st.integers(-2, 10**6), st.floats(), st.text(max_size=5),
                          st.lists(st.integers(-1, 300), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FUZZ
@given(request=st.fixed_dictionaries({"type": st.sampled_from(["complete", "turn", "interrupt", "x", 3])},
                                     optional={name: REQUEST_FIELD for name in (
                                         "text", "max_tokens", "sampling", "stop", "strict", "fresh", "reuse", "replay",
                                         "conversation", "first", "chat_template", "system")}))
@example(request={"type": "turn", "conversation": {"turns": [{"role": "user", "content": 3}]}})
def test_any_request_gets_an_answer_or_an_error_event(request):
    server = EngineServer(FakeEngine("ok", n_ctx=256))
    events: list[dict] = []
    server.handle(request, events.append, lambda: False)
    finals = [e for e in events if e["event"] in ("done", "error")]
    assert len(finals) == (0 if request["type"] == "interrupt" else 1)
