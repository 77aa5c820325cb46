"""Ranks need none of the user's files: every rank of the job, the head included, runs in a folder where
neither the hostfile nor the prompt file exists, and the run still works (they come over MPI and the pipe)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from conftest import processes_tagged


def mpiexec_in(folder: Path, wrapper: Path) -> Path:
    """An mpiexec that starts every segment of its command line in `folder` (hydra's per-segment -wdir)."""
    real = Path(sys.executable).parent / "mpiexec"
    wrapper.write_text(f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
if args[:1] != ["--version"]:
    args = [part for arg in args for part in (["-wdir", "{folder}", arg] if arg == "-n" else [arg])]
os.execv("{real}", ["{real}", *args])
""")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def test_ranks_that_cannot_see_the_hostfile_or_the_prompt_file(cli, tmp_path):
    user = tmp_path / "user"
    elsewhere = tmp_path / "elsewhere"
    user.mkdir()
    elsewhere.mkdir()
    (user / "hosts.txt").write_text("localhost\nlocalhost\n")
    (user / "prompt.txt").write_text("The capital of France is")
    wrapper = mpiexec_in(elsewhere, tmp_path / "mpiexec")
    done = cli("run", "--hostfile", "hosts.txt", "--prompt-file", "prompt.txt", "-n", "4",
               env={"PIPEINFER_MPIEXEC": str(wrapper)}, cwd=user)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "pipeline: 4 tokens" in done.stderr
    assert not os.listdir(elsewhere)  # nothing was looked for, or left, there
    assert not processes_tagged(done.tag)
