"""Starting the MPI job: find mpiexec, check the hosts, place the ranks, start them.

Rank 0 runs `python -m pipeinfer_cpu.head` (its stdin/stdout are the front end's pipe), every
other rank `python -m pipeinfer_cpu.rank`; neither sees the user's command line. mpiexec's own
chatter on failure (banners, abort notices) is for the front end to filter out of stderr unless
--debug, so the user sees the head's one-line error.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeinfer_cpu.app.hostfile import machinefile_lines
from pipeinfer_cpu.errors import LaunchError

SSH_TIMEOUT_S = 8
_MPI_NOISE = ("[mpiexec@", "[proxy:", "=====", "=   ", "YOUR APPLICATION TERMINATED", "This typically refers",
              "Please see the FAQ", "Abort(", "application called MPI_Abort", "--------", "prterun",
              "mpirun noticed", "Primary job", "MPI_ABORT was invoked", "NOTE: invoking MPI_ABORT",
              "You may or may not see output", "with errorcode", "process that invoked", "exited on signal",
              "Ctrl-C caught", "cleaning up processes")


@dataclass(frozen=True)
class MpiExec:
    path: str
    flavour: str  # "mpich" (hydra) or "openmpi"


def find_mpiexec() -> MpiExec:
    """The mpiexec that belongs to this Python's mpi4py: $PIPEINFER_MPIEXEC, next to the interpreter, or on PATH."""
    override = os.environ.get("PIPEINFER_MPIEXEC")
    candidates = [override] if override else [str(Path(sys.executable).parent / "mpiexec"), shutil.which("mpiexec")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return MpiExec(candidate, _flavour(candidate))
    where = override or "next to the Python interpreter or on PATH"
    raise LaunchError(f"mpiexec not found ({where}); install an MPI (e.g. `pip install mpich`) or set PIPEINFER_MPIEXEC")


def _flavour(path: str) -> str:
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"{path} does not run: {exc}") from None
    return "openmpi" if "Open MPI" in text or "OpenRTE" in text else "mpich"


def is_local(host: str) -> bool:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    return host in names or host.startswith("127.")


def check_hosts(hosts: tuple[str, ...]) -> None:
    """Fail fast, naming the host, when a remote host cannot be reached the way mpiexec will (ssh)."""
    remote = sorted({h for h in hosts if not is_local(h)})
    if not remote:
        return
    if shutil.which(ssh_program()) is None:
        raise LaunchError(f"host {remote[0]} is remote but {ssh_program()} is not installed")
    with ThreadPoolExecutor(max_workers=min(16, len(remote))) as pool:
        for host, problem in zip(remote, pool.map(_ssh_problem, remote)):
            if problem:
                raise LaunchError(f"host {host} is unreachable: {problem}")


def ssh_program() -> str:
    """The ssh client for remote hosts, for the host check and mpiexec alike: $PIPEINFER_SSH (e.g. a
    script running `ssh -F <config>` for hosts that only that config names), else ssh."""
    return os.environ.get("PIPEINFER_SSH") or "ssh"


def _ssh_problem(host: str) -> str | None:
    command = [ssh_program(), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, "true"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SSH_TIMEOUT_S + 4,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer within {SSH_TIMEOUT_S} s"
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"ssh exited with {done.returncode}"
    return None


def mpiexec_command(mpi: MpiExec, placement: tuple[str, ...], machinefile: Path) -> list[str]:
    """The mpiexec command line that starts rank i on placement[i]: the head, then the other ranks."""
    head = ["-n", "1", sys.executable, "-m", "pipeinfer_cpu.head"]
    ranks = [":", "-n", str(len(placement) - 1), sys.executable, "-m", "pipeinfer_cpu.rank"] if len(placement) > 1 else []
    return [*mpiexec_prefix(mpi, machinefile), *head, *ranks]


def mpiexec_prefix(mpi: MpiExec, machinefile: Path) -> list[str]:
    """mpiexec and its options, up to the programs: place ranks in the machinefile's order."""
    extra_args = shlex.split(os.environ.get("PIPEINFER_MPIEXEC_ARGS", ""))  # e.g. "-bind-to core"
    ssh = os.environ.get("PIPEINFER_SSH")
    if mpi.flavour == "openmpi":
        extra = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        extra += ["--mca", "plm_rsh_agent", ssh] if ssh else []
        return [mpi.path, *extra, *extra_args, "--hostfile", str(machinefile), "--map-by", "slot"]
    launcher = ["-launcher", "ssh", "-launcher-exec", ssh] if ssh else []
    return [mpi.path, *launcher, *extra_args, "-f", str(machinefile)]


def write_machinefile(mpi: MpiExec, placement: tuple[str, ...], tmp: Path) -> Path:
    """A machinefile in `tmp` that puts rank i on placement[i], in this mpiexec's syntax."""
    machinefile = tmp / "machinefile"
    lines = machinefile_lines(placement)
    if mpi.flavour == "openmpi":  # host:n is MPICH's syntax; Open MPI fills `host slots=n` in order the same way
        lines = [line.replace(":", " slots=") for line in lines]
    machinefile.write_text("\n".join(lines) + "\n")
    return machinefile


def start(placement: tuple[str, ...], tmp: Path) -> subprocess.Popen:
    """Start the MPI job and return at once, with text pipes to the head's stdin/stdout and the job's stderr.

    The job runs in its own session, so a Ctrl-C at the terminal reaches only this process, which
    decides what to do with it. `tmp` must outlive the job (it holds the machinefile).
    """
    mpi = find_mpiexec()
    check_hosts(placement)
    machinefile = write_machinefile(mpi, placement, tmp)
    command = mpiexec_command(mpi, placement, machinefile)
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def is_mpi_noise(line: str) -> bool:
    """mpiexec's own banners and abort notices (shown only with --debug)."""
    return line.startswith(_MPI_NOISE)
