"""Starting the MPI job: find mpiexec, check the hosts, place the ranks, run, report failures.

`pipeinfer-cpu run --hostfile H` (not yet under MPI) re-runs its own command line under mpiexec with
one rank per stage plus the head. mpiexec's own chatter on failure (banners, abort notices) is
filtered out of stderr unless --debug, so the user sees the head's one-line error.
"""

from __future__ import annotations

import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeinfer_cpu.errors import LaunchError
from pipeinfer_cpu.app.hostfile import machinefile_lines

LAUNCHED_ENV = "PIPEINFER_LAUNCHED"
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
    if shutil.which("ssh") is None:
        raise LaunchError(f"host {remote[0]} is remote but ssh is not installed")
    with ThreadPoolExecutor(max_workers=min(16, len(remote))) as pool:
        for host, problem in zip(remote, pool.map(_ssh_problem, remote)):
            if problem:
                raise LaunchError(f"host {host} is unreachable: {problem}")


def _ssh_problem(host: str) -> str | None:
    command = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, "true"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SSH_TIMEOUT_S + 4,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer within {SSH_TIMEOUT_S} s"
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"ssh exited with {done.returncode}"
    return None


def mpiexec_command(mpi: MpiExec, placement: tuple[str, ...], machinefile: Path, argv: list[str]) -> list[str]:
    """The mpiexec command line that starts rank i on placement[i] and runs `argv` in each rank."""
    program = [sys.executable, "-m", "pipeinfer_cpu", *argv]
    extra_args = shlex.split(os.environ.get("PIPEINFER_MPIEXEC_ARGS", ""))  # e.g. "-bind-to core"
    if mpi.flavour == "openmpi":
        extra = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        return [mpi.path, *extra, *extra_args, "--hostfile", str(machinefile), "--map-by", "slot", "-n",
                str(len(placement)), *program]
    return [mpi.path, *extra_args, "-f", str(machinefile), "-n", str(len(placement)), *program]


def launch(placement: tuple[str, ...], argv: list[str], debug: bool, stdin=subprocess.DEVNULL) -> int:
    """Run `pipeinfer-cpu <argv>` as an MPI job with rank i on placement[i]; return its exit code."""
    with tempfile.TemporaryDirectory(prefix="pipeinfer-") as tmp:
        process = start(placement, argv, Path(tmp), stdin=stdin)
        return _supervise(process, debug)


def start(placement: tuple[str, ...], argv: list[str], tmp: Path, stdin=subprocess.DEVNULL,
          stdout=None) -> subprocess.Popen:
    """Start the MPI job and return at once (stderr is a text pipe: filter it with `stderr_lines`).

    The job runs in its own session, so a Ctrl-C at the terminal reaches only this process, which
    decides what to do with it. `tmp` must outlive the job (it holds the machinefile).
    """
    mpi = find_mpiexec()
    check_hosts(placement)
    machinefile = tmp / "machinefile"
    lines = machinefile_lines(placement)
    if mpi.flavour == "openmpi":  # host:n is MPICH's syntax; Open MPI fills `host slots=n` in order the same way
        lines = [line.replace(":", " slots=") for line in lines]
    machinefile.write_text("\n".join(lines) + "\n")
    command = mpiexec_command(mpi, placement, machinefile, argv)
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    return subprocess.Popen(command, env=env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def is_mpi_noise(line: str) -> bool:
    """mpiexec's own banners and abort notices (shown only with --debug)."""
    return line.startswith(_MPI_NOISE)


def _supervise(process: subprocess.Popen, debug: bool) -> int:
    """Pass the job's stderr through (without MPI noise) and forward Ctrl-C as a clean stop."""
    def forward(signum, frame):
        try:
            os.killpg(process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    previous = signal.signal(signal.SIGINT, forward)
    reported = False  # did a rank already explain the failure in one line?
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if debug or not is_mpi_noise(line):
                reported |= line.startswith("error: ")
                sys.stderr.write(line)
                sys.stderr.flush()
        code = process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if code != 0 and not reported:
        why = f"signal {-code}" if code < 0 else f"mpiexec exit code {code}"
        print(f"error: a rank of the MPI job stopped unexpectedly ({why}); run with --debug for mpiexec's report",
              file=sys.stderr)
    return code if code >= 0 else 128 - code
