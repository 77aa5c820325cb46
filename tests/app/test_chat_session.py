"""Real chat sessions: `pipeinfer-cpu chat --hostfile hosts/local.txt` (real MPI, 2 stages, the default
model, greedy) driven through a pseudo-terminal, and through pipes as a script would; and `chat` as it
comes (its own sampling defaults), whose answers must end by themselves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pexpect
import psutil
import pytest

from conftest import REPO
from pipeinfer_cpu.conversation import conversation_from_json

CHAT = ["-m", "pipeinfer_cpu", "chat", "--hostfile", "hosts/local.txt", "--temp", "0"]  # greedy: fixed answers
PROMPT = r"\n(?:\x1b\[[0-9;?]*[A-Za-z])*> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


@pytest.fixture()
def chat_env(cache_dir) -> dict:
    env = dict(os.environ, PIPEINFER_CACHE=str(cache_dir), PROMPT_TOOLKIT_NO_CPR="1", TERM="dumb")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Terminal:
    """A chat session in a pseudo-terminal."""

    def __init__(self, env: dict, *args: str) -> None:
        self.child = pexpect.spawn(sys.executable, [*CHAT, *args], cwd=REPO, env=env, encoding="utf-8",
                                   timeout=60, dimensions=(50, 400))
        self.child.expect("Ctrl-D to leave", timeout=180)  # a cold shard cache: hash and shard first
        self.child.expect("> ")
        self.job = _job_processes(self.child.pid)

    def press(self, key: str) -> None:
        """A control key at the prompt. A dumb terminal's prompt is printed before the line editor
        takes the terminal, and a Ctrl-D sent in that instant would be a cooked-mode EOF: wait a bit."""
        time.sleep(0.3)
        self.child.sendcontrol(key)

    def end(self) -> int:
        """Wait for the exit; the exit status, once no process of the job is left."""
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert _still_running(self.job) == []
        return self.child.exitstatus

    def say(self, line: str) -> str:
        """Type a line; return what was printed until the next prompt (escape codes removed)."""
        self.child.sendline(line)
        self.child.expect_exact(line)
        self.child.expect(PROMPT)
        return ANSI.sub("", self.child.before).strip()


def _job_processes(pid: int) -> list[psutil.Process]:
    """The processes of the chat started as `pid`: mpiexec, its proxy and every rank."""
    found = psutil.Process(pid).children(recursive=True)
    assert any(_is_rank(p) for p in found)
    return found


def _is_rank(process: psutil.Process) -> bool:
    """A rank of the job: the head (`python -m pipeinfer_cpu.head`) or another (`... pipeinfer_cpu.rank`)."""
    return process.cmdline()[0] == sys.executable and bool({"pipeinfer_cpu.head", "pipeinfer_cpu.rank"} & set(process.cmdline()))


def _still_running(processes: list[psutil.Process], timeout_s: float = 15) -> list[psutil.Process]:
    """Those of `processes` still alive after up to timeout_s (only this test's own, not other sessions')."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return alive


def test_interactive_session(chat_env, tmp_path):
    transcript = tmp_path / "transcript.jsonl"
    term = Terminal(chat_env, "-n", "400", "--transcript", str(transcript))

    # two turns, the second depending on the first; the second prefills only its own tokens
    assert "Tokyo" in term.say("What is the capital of Japan?")
    assert "Tokyo" in term.say("And what is its population?")  # "its" = Tokyo, from the first turn
    stats = term.say("/stats")
    new = int(re.search(r"prompt: (\d+) new tokens prefilled", stats).group(1))
    whole = int(re.search(r"conversation (\d+) tokens", stats).group(1))
    per_stage = [int(n) for n in re.findall(r"\): prefill (\d+) tokens, busy \d+%", stats)]
    assert per_stage == [new, new], stats
    assert 0 < new < whole / 2, stats
    assert re.search(r"last answer: \d+ tokens \(\w+\), [\d.]+ tok/s, ITL mean", stats)

    # Ctrl-C mid-answer stops it quickly and keeps what was shown; the next turn works
    term.child.sendline("Tell me a very long story about a dragon and a knight.")
    term.child.expect_exact("knight.")
    term.child.expect(r"\w+ \w+ \w+ \w+")
    pressed = time.monotonic()
    term.child.sendcontrol("c")
    term.child.expect_exact("[interrupted]")
    assert time.monotonic() - pressed < 2.0  # typically ~0.1 s; the bound leaves room for a busy machine
    term.child.expect(PROMPT)
    assert "(interrupt)" in term.say("/stats")
    assert term.say("Say hello.")

    # /save then /load round-trip; bad input keeps the session going
    saved, again = tmp_path / "a.json", tmp_path / "b.json"
    assert "saved 8 turns" in term.say(f"/save {saved}")
    assert "conversation cleared" in term.say("/reset")
    assert "loaded 8 turns" in term.say(f"/load {saved}")
    term.say(f"/save {again}")
    assert saved.read_text() == again.read_text()
    turns = conversation_from_json(json.loads(saved.read_text())).turns
    assert "Tokyo" in turns[1].content and turns[5].content  # turns[5]: the interrupted answer, as shown
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not json")
    assert "unknown command /frobnicate" in term.say("/frobnicate")
    assert "is not valid JSON" in term.say(f"/load {bad}")
    assert "empty message" in term.say("")
    assert term.say("Thank you!")  # the loaded conversation goes on

    # Ctrl-D at the empty prompt: every rank stops, exit 0
    term.press("d")
    assert term.end() == 0
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [r["stopped_by"] for r in records if r.get("role") == "assistant"][2] == "interrupt"
    assert sum(r.get("role") == "user" for r in records) == 5


def test_ctrl_c_at_an_empty_prompt_ends_the_session(chat_env):
    term = Terminal(chat_env)
    term.child.send("half a line")
    term.press("c")  # Ctrl-C with text typed: clears the line, the session goes on
    assert "commands:" in term.say("/help")
    term.press("c")
    assert term.end() == 0


def test_piped_session_answers_each_line(chat_env):
    process = subprocess.Popen([sys.executable, *CHAT, "-n", "24"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, env=chat_env)
    process.stdin.write("What is the capital of Japan?\n")
    process.stdin.flush()
    first = process.stdout.readline()
    job = _job_processes(process.pid)
    out, err = process.communicate("And what is its population?\n", timeout=120)
    assert process.returncode == 0, err
    answers = [line for line in (first + out).splitlines() if line.strip()]
    assert len(answers) == 2, first + out
    assert "Tokyo" in answers[1]
    assert "pipeline, 2 stage(s)" in err  # messages on stderr, answers alone on stdout
    assert _still_running(job) == []


def test_dead_job_is_one_error_line_and_a_non_zero_exit(chat_env, tmp_path):
    transcript = tmp_path / "t.jsonl"
    process = subprocess.Popen([sys.executable, *CHAT, "-n", "8", "--transcript", str(transcript)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO, env=chat_env)
    process.stdin.write("Hello.\n")
    process.stdin.flush()
    assert process.stdout.readline().strip()  # the first answer
    job = _job_processes(process.pid)
    ranks = [p for p in job if _is_rank(p)]
    assert len(ranks) == 3  # the head and two stages
    next(p for p in ranks if "pipeinfer_cpu.rank" in p.cmdline()).kill()  # a stage dies
    time.sleep(1)
    process.stdin.write("Hello again.\n")
    process.stdin.flush()
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "error: the MPI job ended" in err
    assert json.loads(transcript.read_text().splitlines()[1])["role"] == "assistant"
    assert _still_running(job) == []


def _most_repeats(tokens: list[int], n: int) -> int:
    """How often the most frequent n-token sequence occurs in `tokens` (0 when shorter than n)."""
    return max(Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)).values(), default=0)


def test_default_chat_ends_its_answers_without_looping(chat_env, tmp_path, default_model):
    """Issue 14's "done when": `chat` as it comes (the default model, its default sampling, which
    here is llama.cpp's: the model recommends none) ends both answers of a scripted conversation by
    itself (EOS, not the length limit), and no 8-token sequence occurs more than twice in an answer.
    Greedy, the same two turns loop on "I'm so glad you're here." up to the 512-token limit."""
    from pipeinfer_cpu.llama.runtime import Vocab

    transcript = tmp_path / "t.jsonl"
    done = subprocess.run([sys.executable, "-m", "pipeinfer_cpu", "chat", "--transcript", str(transcript)],
                          input="My name is Ada. Say hello to me.\nWhat is my name?\n", capture_output=True,
                          text=True, cwd=REPO, env=chat_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("sampling: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, seed 0 (llama.cpp's defaults; "
            "--temp 0 for greedy)") in done.stderr
    answers = [r for r in map(json.loads, transcript.read_text().splitlines()) if r["role"] == "assistant"]
    assert [a["stopped_by"] for a in answers] == ["eos", "eos"], answers
    vocab = Vocab(default_model)
    for answer in answers:
        assert _most_repeats(vocab.text_tokens(answer["content"], parse_special=False), 8) <= 2, answer
