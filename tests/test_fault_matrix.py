"""The fault matrix: each fault at each moment that can be staged on one machine, with the outcome
written down and asserted. Faults come from outside (a signal) or from PIPEINFER_FAULTS
(wire/faults.py), which hits an exact moment: a rank's n-th message of a kind. The README's Faults
section has the matrix as a table; tests/test_faults.py has the signals sent by hand and the
re-sharding, tests/app/test_bad_input.py the bad input.

Every failing case: one `error:` line naming the rank (and host) and what happened, a non-zero exit,
no rank left, the text shown so far kept on stdout; a death ends the job within DEATH_BOUND_S.
(Under MPICH on one host, mpiexec names only the host of a process that died: the line then lists
the ranks it may have been, which is the most that is known.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import REPO

DEATH_BOUND_S = 5.0  # from a rank's death to the end of the job
PROMPT = "Tell me a story about the sea."


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    after_death_s: float | None  # from the first rank gone to the job's end
    left: list[int]  # ranks still running a second after the end

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def run_job(cache_dir: Path, args: list[str], faults: str = "", kill_front_end_after: int | None = None,
            command: str = "run", stdin: str | None = None) -> Outcome:
    """Run `pipeinfer-cpu COMMAND ARGS` with PIPEINFER_FAULTS, watching its ranks: when the first one
    goes, and whether any outlives the job; `kill_front_end_after`: SIGKILL the front end once that
    many bytes of answer have come."""
    env = dict(os.environ, PIPEINFER_CACHE=str(cache_dir), PIPEINFER_FAULTS=faults)
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    job = subprocess.Popen([sys.executable, "-m", "pipeinfer_cpu", command, *args], cwd=REPO, env=env,
                           stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stdin is not None:
        job.stdin.write(stdin.encode())
        job.stdin.close()
    for stream in (job.stdout, job.stderr):
        os.set_blocking(stream.fileno(), False)
    out, err, ranks, first_gone = b"", b"", set(), None
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        out += _read(job.stdout)
        err += _read(job.stderr)
        ranks |= _ranks(job.pid)
        if first_gone is None and any(not _alive(pid) for pid in ranks):
            first_gone = time.monotonic()
        if kill_front_end_after is not None and len(out) >= kill_front_end_after:
            job.kill()
            first_gone = time.monotonic()
            break
        time.sleep(0.02)
    job.wait(60)
    ended = time.monotonic()
    out += _read(job.stdout)
    err += _read(job.stderr)
    time.sleep(1)
    deadline = time.monotonic() + 15  # an orphaned job notices its front end's end within this
    while kill_front_end_after is not None and any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    ended = time.monotonic() if kill_front_end_after is not None else ended
    return Outcome(job.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                   None if first_gone is None else ended - first_gone, sorted(p for p in ranks if _alive(p)))


def _read(stream) -> bytes:
    try:
        return stream.read() or b""
    except (BlockingIOError, ValueError):
        return b""


def _ranks(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)
                if p.cmdline()[-2:] in (["-m", "pipeinfer_cpu.head"], ["-m", "pipeinfer_cpu.rank"])}
    except psutil.Error:
        return set()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run_args(*extra: str, n: int = 60) -> list[str]:
    return ["--hostfile", "hosts/local.txt", "--chat-template", "-p", PROMPT, "-n", str(n), "--timeout", "3", *extra]


def assert_failed_cleanly(outcome: Outcome, pattern: str, shown: bool) -> None:
    assert outcome.code != 0
    assert len(outcome.errors) == 1 and re.search(pattern, outcome.errors[0]), outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert not outcome.left, "a rank was left running"
    assert bool(outcome.stdout.strip()) == shown, outcome.stdout  # the answer so far stays on stdout


DIED = r"died: Killed \(signal 9\)"
STAGE_2 = r"rank 2 \(stage 2, layers 15-30, on .*\)"
DEATHS = {  # moment: (faults, extra arguments, the rank as named, is text shown before it)
    # before the ranks are loaded, they have no roles yet: the line lists the ranks on the host
    "loading": ("2:die:2:reply", (), r"one of rank 0, rank 1, rank 2", False),
    "prefill": ("2:die:1", (), STAGE_2, False),
    "decode": ("2:die:20", (), STAGE_2, True),
    "pipeinfer, runs cancelled": ("2:die:40", ("--mode", "pipeinfer", "--draft", "ngram"), STAGE_2, True),
}


@pytest.mark.parametrize("moment", DEATHS)
def test_a_stage_dies(cache_dir, moment):
    faults, extra, rank, shown = DEATHS[moment]
    outcome = run_job(cache_dir, _run_args(*extra), faults)
    assert_failed_cleanly(outcome, rf"{rank}.*{DIED}", shown)
    assert outcome.after_death_s is not None and outcome.after_death_s <= DEATH_BOUND_S


def test_the_draft_rank_dies(cache_dir, default_model):
    # its 8th reply: the first few can come before the first token is shown (one token per run keeps
    # several draft requests in flight from the start), and by the 20th the switch may have turned
    # this slow draft (the target itself) off, so that the fault never comes
    outcome = run_job(cache_dir, _run_args("--mode", "pipeinfer", "--draft", str(default_model)), "3:die:8:draft")
    assert_failed_cleanly(outcome, rf"rank 3 \(the draft, on .*\).*{DIED}", True)
    assert outcome.after_death_s is not None and outcome.after_death_s <= DEATH_BOUND_S


STALLS = {  # moment: (faults, the rank that stalls, text shown before it)
    "prefill": ("1:stall=10:1", "rank 1 \\(stage 1, layers 0-15, on .*\\)", False),
    "decode": ("2:stall=10:20", "rank 2 \\(stage 2, layers 15-30, on .*\\)", True),
}


@pytest.mark.parametrize("moment", STALLS)
def test_a_stage_answers_too_late(cache_dir, moment):
    """Stalled past --timeout 3: the head probes every stage and names the one that does not answer."""
    faults, rank, shown = STALLS[moment]
    started = time.monotonic()
    outcome = run_job(cache_dir, _run_args(), faults)
    assert_failed_cleanly(outcome, rf"no result from the pipeline within 3 s; {rank} does not answer", shown)
    assert time.monotonic() - started < 30


def test_a_stalled_draft_costs_speed_not_the_answer(cache_dir, default_model):
    """pipeinfer decides tokens without a draft that is late: the answer is the same, the exit 0."""
    args = _run_args("--mode", "pipeinfer", "--draft", str(default_model), n=40)
    normal = run_job(cache_dir, args)
    late = run_job(cache_dir, args, "3:stall=4:3:draft")
    assert normal.code == late.code == 0, late.stderr
    assert late.stdout == normal.stdout and not late.left


CORRUPT = {  # fault: the error line
    "hidden states cut short": ("1:truncate:1", r"rank 2 \(.*\): a corrupt run message: expected \d+ bytes .*"
                                                r"\(sent by rank 1\)", False),
    "a result cut short": ("2:truncate:20", r"from rank 2 \(.*\): a run message of \d+ bytes is shorter", True),
    "another format version": ("2:version:20", r"from rank 2 \(.*\): a run message is in wire format version 67",
                               True),
}


@pytest.mark.parametrize("fault", CORRUPT)
def test_a_corrupt_message(cache_dir, fault):
    faults, pattern, shown = CORRUPT[fault]
    assert_failed_cleanly(run_job(cache_dir, _run_args(), faults), pattern, shown)


def test_stats_json_keeps_the_answer_a_failure_cut_short(cache_dir, tmp_path):
    stats = tmp_path / "stats.json"
    outcome = run_job(cache_dir, _run_args("--stats-json", str(stats)), "2:die:20")
    assert outcome.code != 0
    failure = json.loads(stats.read_text())["failure"]
    assert failure["answer_so_far"] and outcome.stdout.startswith(failure["answer_so_far"])
    assert "died" in failure["message"] and len(failure["tokens_so_far"]) >= 10


@pytest.mark.parametrize("command", ["run", "chat"])
def test_the_front_end_killed_mid_answer_leaves_no_rank(cache_dir, command, tmp_path):
    """SIGKILL of the user's process: the job, in a session of its own, sees its input end and quits."""
    args = _run_args(n=400) if command == "run" else [
        "--hostfile", "hosts/local.txt", "-n", "400", "--transcript", str(tmp_path / "t.jsonl")]
    outcome = run_job(cache_dir, args, kill_front_end_after=20, command=command,
                      stdin=None if command == "run" else f"{PROMPT}\n")
    assert not outcome.left, "a rank outlived its front end"


def test_a_shard_changed_on_disk_is_written_again(cli, cache_dir):
    """A cached shard edited in place (same size) is not this split's shard any more: it is written
    again, and the answer is the same as before."""
    args = ("run", "--hostfile", "hosts/local.txt", "-p", "The capital of France is", "-n", "12")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    shard = next((cache_dir / "pipeinfer-cpu" / "shards").glob("*-0-15_15-30/*stage1*.gguf"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    shard.write_bytes(data)
    again = cli(*args)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
