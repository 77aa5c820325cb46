"""A stage that hangs or dies: a bounded wait, one readable line naming the rank, no rank left."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO


def start_long_run(cache_dir, *extra):
    env = dict(os.environ, PIPEINFER_CACHE=str(cache_dir))
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    command = [sys.executable, "-m", "pipeinfer_cpu", "run", "--hostfile", "hosts/local.txt", "--timeout", "5",
               "--chat-template", "-p", "Tell me a very long story about the sea, in many chapters.", "-n", "4000",
               "-c", "4096", *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(job: subprocess.Popen) -> list[int]:
    """The job's three ranks (head, stage 1, stage 2), in the order hydra started them."""
    deadline = time.time() + 60
    while time.time() < deadline:
        ranks = [p for p in psutil.Process(job.pid).children(recursive=True)
                 if p.name() != "mpiexec" and "pipeinfer_cpu" in " ".join(p.cmdline())]
        if len(ranks) >= 3:
            return sorted(p.pid for p in ranks)
        time.sleep(0.2)
    raise AssertionError("the job did not start its ranks")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_text(job: subprocess.Popen) -> None:
    os.set_blocking(job.stdout.fileno(), False)
    deadline = time.time() + 60
    while time.time() < deadline:
        if job.stdout.read(1):
            return
        time.sleep(0.05)
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
