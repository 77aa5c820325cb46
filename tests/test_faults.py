"""A stage that hangs or dies: a bounded wait, one readable line naming the rank, no rank left."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO


STORY = "Tell me a very long story about the sea, in many chapters."


def start_run(cache_dir, *args):
    env = dict(os.environ, PIPEINFER_CACHE=str(cache_dir))
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    command = [sys.executable, "-m", "pipeinfer_cpu", "run", "--chat-template", "-p", STORY, *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_long_run(cache_dir, *extra):
    return start_run(cache_dir, "--hostfile", "hosts/local.txt", "--timeout", "5", "-n", "4000", "-c", "4096", *extra)


def rank_pids(job: subprocess.Popen, n_ranks: int = 3) -> list[int]:
    """The job's ranks (head, the stages, any draft rank), in the order hydra started them."""
    deadline = time.time() + 60
    while time.time() < deadline:
        ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
                 if p.name() != "mpiexec" and "pipeinfer_cpu" in " ".join(p.cmdline())]
        if len(ranks) >= n_ranks:
            return sorted(p.pid for p in ranks)
        time.sleep(0.2)
    raise AssertionError("the job did not start its ranks")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_text(job: subprocess.Popen, n_bytes: int = 1) -> bytes:
    """The first `n_bytes` of the answer, read from the pipe itself (a buffered read would take more
    than it returns, which communicate() would then not see)."""
    fd = job.stdout.fileno()
    os.set_blocking(fd, False)
    got = b""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            got += os.read(fd, n_bytes - len(got))
        except BlockingIOError:
            time.sleep(0.02)
        if len(got) >= n_bytes:
            return got
    raise AssertionError("no text was generated")


@pytest.mark.parametrize("fault", ["stuck", "dead"])
def test_a_stage_that_hangs_or_dies(cache_dir, fault):
    job = start_long_run(cache_dir)
    pids = rank_pids(job)
    wait_for_text(job)
    started = time.time()
    os.kill(pids[-1], signal.SIGSTOP if fault == "stuck" else signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    assert time.time() - started < 30  # bounded: --timeout 5, then every rank is stopped
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("pipeline:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    if fault == "stuck":
        assert "no result from the pipeline within 5 s" in lines[0] and "rank 2" in lines[0]
    else:
        assert "died" in lines[0] or "rank" in lines[0]
    assert "Traceback" not in stderr
    time.sleep(1)
    assert not any(alive(pid) for pid in pids), "a rank was left running"


def test_ctrl_c_stops_a_run_and_keeps_what_was_shown(cache_dir):
    """Ctrl-C reaches only the front end, which asks the head to stop: the text so far and its statistics
    line stay, the exit code is 130, and every rank ends."""
    job = start_long_run(cache_dir)
    pids = rank_pids(job)
    wait_for_text(job)
    time.sleep(2)
    os.kill(job.pid, signal.SIGINT)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 130
    assert len(stdout) > 20  # more than the character wait_for_text took: the answer so far was kept
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == ["error: interrupted"]
    assert "pipeline: " in stderr and "Traceback" not in stderr
    time.sleep(1)
    assert not any(alive(pid) for pid in pids), "a rank was left running"


@pytest.fixture(scope="module")
def three_hosts(tmp_path_factory):
    path = tmp_path_factory.mktemp("hosts") / "three.txt"
    path.write_text("localhost\nlocalhost  # weight=1\nlocalhost\n")
    return path


@pytest.mark.parametrize("mode", ["pipeline", "pipeinfer"])
def test_reshard_finishes_the_answer_on_the_stages_left(cache_dir, cli, three_hosts, tmp_path, mode):
    """A stage killed in the middle of a greedy 3-stage answer: with --on-failure reshard the answer
    finishes on 2 stages and equals `single`'s. For `pipeline` this holds by construction (the new
    job rebuilds the KV cache in the shapes the old one built it); for `pipeinfer` it holds as far
    as its uninterrupted answers equal single's (greedy, on this model: tests/test_speculative_modes.py)."""
    single = cli("run", "--mode", "single", "--chat-template", "-p", STORY, "-n", "80")
    assert single.returncode == 0, single.stderr
    stats = tmp_path / "stats.json"
    draft = ("--draft", "ngram") if mode == "pipeinfer" else ()
    job = start_run(cache_dir, "--hostfile", str(three_hosts), "--mode", mode, *draft, "--on-failure", "reshard",
                    "-n", "80", "--timeout", "10", "--stats-json", str(stats))
    pids = rank_pids(job, 4)
    seen = wait_for_text(job, 40)
    os.kill(pids[-1], signal.SIGKILL)  # the last stage
    rest, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr
    assert seen.decode() + rest == single.stdout
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "died" in warnings[0] and "going on with 2 stages" in warnings[0], stderr
    assert "error:" not in stderr and "Traceback" not in stderr
    recovery, = json.loads(stats.read_text())["recoveries"]
    assert recovery["stages"] == 2 and recovery["after_tokens"] >= 1 and "stage 3" in recovery["failed"]
    assert 0 < recovery["restart_s"] <= recovery["recover_s"] and "sent" in recovery["shards"]
    time.sleep(1)
    assert not any(alive(pid) for pid in pids), "a rank was left running"


def test_reshard_goes_on_without_a_stage_that_stopped_answering(cache_dir, cli, three_hosts):
    """A stage that hangs (a laptop asleep: here stage 3 stalls 60 s at its 20th run) is named by the
    head after --timeout; the answer finishes on the other two and equals `single`'s."""
    single = cli("run", "--mode", "single", "--chat-template", "-p", STORY, "-n", "60")
    env = {**os.environ, "PIPEINFER_FAULTS": "3:stall=60:20"}
    job = subprocess.run([sys.executable, "-m", "pipeinfer_cpu", "run", "--chat-template", "-p", STORY, "-n", "60",
                          "--hostfile", str(three_hosts), "--on-failure", "reshard", "--timeout", "3"],
                         cwd=REPO, env={**env, "PIPEINFER_CACHE": str(cache_dir)}, capture_output=True, text=True,
                         timeout=120)
    assert job.returncode == 0 and job.stdout == single.stdout, job.stderr
    warning, = [line for line in job.stderr.splitlines() if line.startswith("warning: ")]
    assert "rank 3 (stage 3, layers 20-30, on" in warning and "does not answer" in warning
    assert "error:" not in job.stderr


def test_reshard_with_no_stage_left_is_one_error_line(cache_dir):
    job = start_run(cache_dir, "--hostfile", "hosts/local.txt", "--stages", "1", "--on-failure", "reshard",
                    "-n", "4000", "-c", "4096", "--timeout", "5")
    pids = rank_pids(job, 2)
    wait_for_text(job)
    os.kill(pids[-1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot reshard: no stage is left to continue on" in errors[0], stderr
    assert "Traceback" not in stderr


def test_chat_reshards_and_goes_on(cache_dir, three_hosts, tmp_path):
    """The same in a chat: the turn being answered finishes on 2 stages, the next turn runs there, and
    the transcript holds both."""
    env = dict(os.environ, PIPEINFER_CACHE=str(cache_dir))
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    transcript, lines = tmp_path / "chat.jsonl", tmp_path / "typed.txt"
    lines.write_text(f"{STORY}\nAnd one more sentence, please.\n")
    with open(lines) as typed:
        job = subprocess.Popen([sys.executable, "-m", "pipeinfer_cpu", "chat", "--hostfile", str(three_hosts),
                                "--on-failure", "reshard", "-n", "60", "--temp", "0", "--transcript", str(transcript)],
                               cwd=REPO, env=env, stdin=typed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = rank_pids(job, 4)
    wait_for_text(job, 80)
    os.kill(pids[-1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=180)
    assert job.returncode == 0, stderr
    assert sum(line.startswith("warning: ") for line in stderr.splitlines()) == 1, stderr
    turns = [json.loads(line) for line in transcript.read_text().splitlines()]
    answers = [t for t in turns if t.get("role") == "assistant"]
    assert len(answers) == 2 and all(a["content"] and a["stopped_by"] != "error" for a in answers), turns


def test_a_request_longer_than_a_pipe_does_not_end_the_job(cache_dir, monkeypatch):
    """Found by the soak: MPICH's mpiexec ended the whole job when a request line (a long chat's whole
    conversation, a long prompt) was over 64 KiB. Such a request now travels in parts; the job answers it
    and the next one."""
    from pipeinfer_cpu.app.client import JobClient
    from pipeinfer_cpu.app.options import EngineOptions
    from pipeinfer_cpu.conversation import Conversation, conversation_to_json

    monkeypatch.setenv("PIPEINFER_CACHE", str(cache_dir))
    conversation = Conversation(None, ())
    for _ in range(200):  # about 90 KB of JSON
        conversation = conversation.with_turn("user", "Tell me about the sea. " * 5).with_turn("assistant", "Waves. " * 40)
    job = JobClient.launch(EngineOptions(hostfile=REPO / "hosts/local.txt", n_ctx=1024))
    try:
        job.start(300)
        for last in ("Hi", "And again?"):
            asked = conversation.with_turn("user", last)
            final = job.ask({"type": "turn", "conversation": conversation_to_json(asked), "first": 0,
                             "max_tokens": 8}, lambda text: None, 120)
            assert final["event"] == "done" and final["dropped_turns"] > 0
    finally:
        assert job.close() == 0
