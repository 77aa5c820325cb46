"""`pipeinfer-cpu serve`, for real: the server process with its MPI job (2 stages of the default model
on this machine), driven by the real `openai` client and by httpx; greedy answers compared with
`pipeinfer-cpu run --mode single` on the same prompt; stopped with SIGTERM, leaving no rank behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, processes_tagged

PIPELINE = ("--hostfile", "hosts/local.txt", "--stages", "2", "--mode", "pipeline")
QUESTION = "What is the capital of France? Answer in one sentence."
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # a prompt the model continues for a long time
REPEATED = "the cat sat on the mat. " * 6  # continued by repeating it: the n-gram draft guesses well


class Server:
    """A `pipeinfer-cpu serve --port 0 ...` process; its stderr is collected, its URL read from it."""

    def __init__(self, cache_dir: Path, *args: str) -> None:
        self.tag = uuid.uuid4().hex
        env = {**os.environ, "PIPEINFER_CACHE": str(cache_dir), "PIPEINFER_TEST_TAG": self.tag}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.process = subprocess.Popen([sys.executable, "-m", "pipeinfer_cpu", "serve", "--port", "0", *args],
                                        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.listening = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self.listening.wait(300) or self.process.poll() is not None:
            self.process.kill()
            raise AssertionError("the server did not start:\n" + self.stderr)
        self.url = re.search(r"listening on (http://\S+)", self.stderr).group(1)  # .../v1

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("listening on "):
                self.listening.set()
        self.listening.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def client(self, api_key: str = "unused", timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=timeout)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url.removesuffix("/v1") + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url.removesuffix("/v1") + path, timeout=120, **kwargs)

    def metric(self, name: str, headers: dict | None = None, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels`."""
        text = self.get("/metrics", headers=headers or {}).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server; its exit status, once no process of its job is left."""
        self.process.send_signal(sig)
        try:
            code = self.process.wait(60)
        finally:
            self.process.kill()
        _, alive = psutil.wait_procs(processes_tagged(self.tag), timeout=15)
        assert not alive, f"left running: {alive}"
        return code


@pytest.fixture(scope="module")
def server(cache_dir):
    server = Server(cache_dir, *PIPELINE, "--max-body-bytes", "65536")
    yield server
    assert server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr


@pytest.fixture(scope="module")
def single_run(cli):
    """`pipeinfer-cpu run --mode single` (the reference) with these arguments: its stdout."""
    def run(*args: str) -> str:
        done = cli("run", "--mode", "single", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout
    return run


def chat(server: Server, messages: list[dict], max_tokens: int = 48, **extra):
    return server.client().chat.completions.create(model="anything", messages=messages, max_tokens=max_tokens,
                                                   temperature=0, **extra)


def streamed_chat(server: Server, messages: list[dict], max_tokens: int = 48) -> tuple[str, list]:
    chunks = list(server.client().chat.completions.create(
        model="x", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_greedy_chat_equals_run_single_streamed_and_not(server, single_run):
    expected = single_run("--chat-template", "-p", QUESTION, "-n", "48").strip()
    answer = chat(server, [{"role": "user", "content": QUESTION}])
    assert answer.choices[0].message.content.strip() == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 10

    text, chunks = streamed_chat(server, [{"role": "user", "content": QUESTION}])
    assert text.strip() == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_a_follow_up_turn_reuses_the_kv_prefix(server):
    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    answer = chat(server, first, max_tokens=16).choices[0].message.content
    reused_before = server.metric("pipeinfer_reused_tokens_total")
    follow_up = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another one?"}]
    again = chat(server, follow_up, max_tokens=16)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 15 and cached < again.usage.prompt_tokens  # the conversation so far, not the new turn
    assert server.metric("pipeinfer_reused_tokens_total") - reused_before == cached


def test_text_completions_equal_run_single_and_stop_strings_end_them(server, single_run):
    expected = single_run("-p", COUNTING, "-n", "24").removesuffix("\n")  # raw text (run ends with a newline)
    client = server.client()
    done = client.completions.create(model="x", prompt=COUNTING, max_tokens=24, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="x", prompt=COUNTING, max_tokens=24, temperature=0, stream=True))
    assert streamed == expected
    stop = expected.strip().split()[3]  # the fourth number the model writes
    stopped = client.completions.create(model="x", prompt=COUNTING, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].text == expected[:expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_bad_requests_are_openai_shaped_4xx_and_the_server_goes_on(server):
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}), 400, "max_tokens"),
        (dict(json={"messages": [{"role": "user", "content": "x" * 70_000}]}), 413, "limit"),
        (dict(json={"messages": [{"role": "user", "content": "hi"}], "n": 2}), 400, "n > 1"),
        (dict(json={"messages": [{"role": "tool", "content": "hi"}]}), 400, "role"),
        (dict(json={"messages": "hi"}), 400, "messages"),
        (dict(json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}), 400, "context"),
    ]
    for request, status, fragment in cases:
        response = server.post("/v1/chat/completions", **request)
        assert response.status_code == status, (request, response.text)
        error = response.json()["error"]
        assert fragment in error["message"] and {"type", "param", "code"} <= error.keys(), error
    assert server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 100_000}).json()["error"]["code"] \
        == "context_length_exceeded"
    assert server.get("/v1/nothing").status_code == 404
    with pytest.raises(openai.BadRequestError):
        chat(server, [{"role": "user", "content": "hi"}], max_tokens=-5)
    assert chat(server, [{"role": "user", "content": QUESTION}], max_tokens=4).choices[0].message.content
    assert server.get("/health").json()["status"] == "ok"


def test_models_and_health_describe_the_served_model(server):
    models = server.client().models.list().data
    assert len(models) == 1 and models[0].owned_by == "pipeinfer-cpu"
    assert models[0].model_extra["meta"]["stages"] == 2 and models[0].model_extra["meta"]["draft"] is None
    health = server.get("/health").json()
    assert health["model"] == models[0].id and "one request at a time" in health["concurrency"]


def test_two_concurrent_requests_are_answered_one_after_the_other(server):
    questions = [QUESTION, "Write one sentence about the sea."]
    alone = [chat(server, [{"role": "user", "content": q}], max_tokens=32).choices[0].message.content
             for q in questions]
    results: dict[int, tuple[str, float, float]] = {}

    def ask(index: int) -> None:
        times, text = [], []
        for chunk in server.client().chat.completions.create(
                model="x", messages=[{"role": "user", "content": questions[index]}], max_tokens=32,
                temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.monotonic())
                text.append(chunk.choices[0].delta.content)
        results[index] = ("".join(text), times[0], times[-1])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(120)
    assert [results[i][0] for i in range(2)] == alone
    first, second = sorted(results.values(), key=lambda r: r[1])
    assert first[2] <= second[1], "the two answers' tokens interleaved"


def test_a_queued_request_whose_client_left_is_dropped_without_running(server):
    dropped, generated = (server.metric("pipeinfer_requests_total", outcome="dropped"),
                          server.metric("pipeinfer_generated_tokens_total"))
    long_answer = threading.Thread(target=lambda: server.client().completions.create(
        model="x", prompt=COUNTING, max_tokens=160, temperature=0))
    long_answer.start()
    _wait_for(lambda: server.get("/health").json()["running"] == 1)
    with pytest.raises(httpx.TimeoutException):  # queued behind the long answer; the client gives up
        httpx.post(f"{server.url}/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=1.0)
    long_answer.join(120)
    _wait_for(lambda: server.metric("pipeinfer_requests_total", outcome="dropped") == dropped + 1)
    assert server.metric("pipeinfer_generated_tokens_total") - generated == 160  # the long answer's only


# -- speculation, cancellation, the API key -------------------------------------------------------

def test_a_client_leaving_mid_stream_cancels_its_runs_on_every_stage_and_an_api_key_is_required(cache_dir,
                                                                                               single_run):
    key = "sk-test-" + uuid.uuid4().hex
    server = Server(cache_dir, "--hostfile", "hosts/local.txt", "--stages", "2", "--mode", "pipeinfer",
                    "--draft", "ngram", "--fixed-length", "--api-key", key)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="sk-wrong").chat.completions.create(
                model="x", messages=[{"role": "user", "content": "hi"}])
        assert server.get("/metrics").status_code == 401
        assert server.get("/health").status_code == 200  # for load balancers: no key

        # pipeinfer speculating eagerly throughout (--fixed-length) on an answer the n-gram draft predicts,
        # so runs are in flight; the client leaves after four tokens. Whether one is in flight at that
        # instant is timing, so up to three tries.
        client = server.client(api_key=key)
        assert client.models.list().data[0].model_extra["meta"]["draft"] == "ngram:3,8"
        for attempt in range(1, 4):
            stream = client.completions.create(model="x", prompt=REPEATED, max_tokens=400, temperature=0,
                                               stream=True)
            for index, _ in enumerate(stream):
                if index == 3:
                    break
            stream.close()
            _wait_for(lambda: server.metric("pipeinfer_requests_total", auth, outcome="cancelled") == attempt)
            if server.metric("pipeinfer_runs_cancelled_total", auth) > 0:
                break
        assert server.metric("pipeinfer_generated_tokens_total", auth) < 100 * attempt  # each stopped before 400
        again = client.completions.create(model="x", prompt=COUNTING, max_tokens=24, temperature=0)
        assert again.choices[0].text == single_run("-p", COUNTING, "-n", "24").removesuffix("\n")
        assert server.metric("pipeinfer_runs_cancelled_total", auth) > 0
        assert server.metric("pipeinfer_stage_runs_cancelled_total", auth) > 0  # the stages' own counts
    finally:
        code = server.stop(signal.SIGINT)
    assert code == 0, server.stderr


def test_a_rank_that_dies_is_a_503_naming_it_and_the_server_exits_non_zero(cache_dir, tmp_path):
    hostfile = tmp_path / "hosts.txt"  # two names of this machine: mpiexec says on which one a process died
    hostfile.write_text("localhost\n127.0.0.1\n")
    server = Server(cache_dir, "--hostfile", str(hostfile))
    try:
        last_stage = next(p for p in processes_tagged(server.tag) if p.environ().get("PMI_RANK") == "2")
        answer = {}
        asking = threading.Thread(target=lambda: answer.update(response=server.post(
            "/v1/completions", json={"prompt": COUNTING, "max_tokens": 1000, "temperature": 0})))
        asking.start()
        _wait_for(lambda: server.get("/health").json()["running"] == 1)
        last_stage.kill()
        asking.join(120)
        response = answer["response"]
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable" and "rank 2 (stage 2, layers 15-30" in error["message"], error
        assert server.process.wait(60) == 1
    finally:
        server.stop()
    assert re.search(r"^error: .*rank 2 \(stage 2", server.stderr, re.M), server.stderr
    assert "Traceback" not in server.stderr


def test_the_server_killed_mid_answer_leaves_no_rank(cache_dir):
    """SIGKILL of the server while it answers: its job sees its input end and quits (the fault matrix's
    "front end killed" for serve; tests/test_fault_matrix.py has run and chat)."""
    server = Server(cache_dir, *PIPELINE)
    asking = threading.Thread(target=lambda: _ignore_errors(lambda: server.post(
        "/v1/completions", json={"prompt": COUNTING, "max_tokens": 1000, "temperature": 0})), daemon=True)
    asking.start()
    _wait_for(lambda: server.get("/health").json()["running"] == 1)
    ranks = [p for p in processes_tagged(server.tag) if p.pid != server.process.pid]
    assert len(ranks) >= 3  # the head and two stages (and mpiexec's own)
    server.process.kill()
    _, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive, f"left running: {alive}"


def _ignore_errors(call) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass


def _wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
