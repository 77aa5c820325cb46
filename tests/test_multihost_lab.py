"""A real cluster of three hosts on this machine (scripts/netlab_hosts.sh): network namespaces with
their own address, hostname and sshd, reached by ssh as a lab's machines are, MPI over TCP between
them, and one host (pi-h3) that cannot see the user's files, so the head sends it its shard.

Needs root, network namespaces and sshd (.ci/run installs openssh-server); skips, saying which, where
one is missing. Takes down any lab that is up, and its own lab always.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, assert_clean_failure, processes_tagged, read_json

SCRIPT = REPO / "scripts" / "netlab_hosts.sh"
PINGPONG = REPO / "tests" / "mpi_programs" / "pingpong.py"
PROMPT = "The capital of France is"
HIDDEN_HOST = "pi-h3"  # the script's last host: an empty tmpfs covers the lab's data directory there


def _unavailable() -> str | None:
    """Why this machine cannot run the lab, or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, a bridge, sshd)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (package {package})"
    if shutil.which("sshd") is None and not os.access("/usr/sbin/sshd", os.X_OK):
        return "sshd is not installed, and could not be (.ci/run tries `apt-get install openssh-server` as root)"
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the kernel refuses namespaces: {probe.stderr.strip() or f'unshare exited with {probe.returncode}'}"
    return None


@dataclass(frozen=True)
class Lab:
    dir: Path
    env: dict[str, str]  # what the lab's `env` file exports: PIPEINFER_SSH, PIPEINFER_MPIEXEC_ARGS

    @property
    def hostfile(self) -> Path:
        return self.dir / "hosts.txt"

    @property
    def data(self) -> Path:  # visible on every host but the last
        return self.dir / "data"

    @property
    def model(self) -> Path:
        return self.data / "model.gguf"

    @property
    def cache(self) -> Path:
        return self.data / "cache"

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.env["PIPEINFER_SSH"], host, command], capture_output=True, text=True, timeout=30)

    def run_env(self) -> dict[str, str]:
        return {**self.env, "PIPEINFER_CACHE": str(self.cache)}


def _script(action: str, lab_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIPEINFER_LAB_DIR": str(lab_dir)})


def _read_env(path: Path) -> dict[str, str]:
    """`export NAME=VALUE` lines (shell-quoted), as a dict."""
    pairs = [shlex.split(line)[1] for line in path.read_text().splitlines() if line.startswith("export ")]
    return dict(pair.split("=", 1) for pair in pairs)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, default_model):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    lab_dir = tmp_path_factory.mktemp("lab")
    _script("down", lab_dir)  # a lab left over from an interrupted run
    try:
        up = _script("up", lab_dir)
        assert up.returncode == 0, f"netlab_hosts.sh up failed:\n{up.stdout}{up.stderr}"
        lab = Lab(lab_dir, _read_env(lab_dir / "env"))
        shutil.copyfile(default_model, lab.model)  # the user's model, where pi-h3 cannot see it
        yield lab
    finally:
        down = _script("down", lab_dir)
        assert down.returncode == 0, down.stderr


def test_pipeline_across_three_hosts_equals_single(lab, cli, tmp_path):
    """Three stages on three hosts, the last without the user's files: the same greedy text as one process."""
    assert lab.ssh("pi-h2", f"test -e {lab.model}").returncode == 0  # a host that shares the user's disk
    assert lab.ssh(HIDDEN_HOST, f"test -e {lab.model}").returncode == 1, "pi-h3 should not see the model"
    generate = ("-m", str(lab.model), "-p", PROMPT, "-n", "12")
    single = cli("run", "--hostfile", "hosts/local.txt", "--mode", "single", *generate,
                 env={"PIPEINFER_CACHE": str(lab.cache)})
    assert single.returncode == 0, single.stderr
    stats = tmp_path / "stats.json"
    done = cli("run", "--hostfile", str(lab.hostfile), "--stages", "3", "--mode", "pipeline", *generate,
               "--stats-json", str(stats), env=lab.run_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == single.stdout and done.stdout.strip()
    assert [stage["host"] for stage in read_json(stats)["stages"]] == ["pi-h1", "pi-h2", HIDDEN_HOST]
    # pi-h3 got its shard over MPI (Tag.FILE) into its own cache, which this namespace cannot see.
    received = lab.ssh(HIDDEN_HOST, f"ls {lab.cache}/pipeinfer-cpu/received")
    assert received.returncode == 0 and "stage2" in received.stdout, received.stdout + received.stderr
    assert not (lab.cache / "pipeinfer-cpu" / "received").exists()
    assert lab.ssh(HIDDEN_HOST, f"test -e {lab.model}").returncode == 1
    assert not processes_tagged(done.tag), "a rank was left running"


def _pingpong(lab: Lab, size: int, repeats: int) -> float:
    """Median round trip (s) of `size` bytes from a rank on pi-h1 to one on pi-h2, launched as the lab says."""
    hostfile = lab.dir / "two-hosts.txt"
    hostfile.write_text("pi-h1\npi-h2\n")
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    command = [mpiexec, "-launcher", "ssh", "-launcher-exec", lab.env["PIPEINFER_SSH"],
               *shlex.split(lab.env["PIPEINFER_MPIEXEC_ARGS"]), "-f", str(hostfile), "-n", "2",
               sys.executable, str(PINGPONG), str(size), str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hosts"] == ["pi-h1", "pi-h2"]
    return result["round_trip_s"]


def test_mpi_between_hosts_goes_over_the_link(lab):
    """Shape pi-h1's link to 1 Mbit/s: 100 KB then take >= 0.7 s (shared memory, which MPICH would use
    between processes of one machine unless told otherwise, would take microseconds)."""
    size = 100_000
    free = _pingpong(lab, size, repeats=3)
    shape = ["ip", "netns", "exec", "pi-h1", "tc", "qdisc"]
    subprocess.run([*shape, "replace", "dev", "lab0", "root", "tbf", "rate", "1mbit", "burst", "4kb", "limit",
                    "256kb"], check=True, capture_output=True)
    try:
        shaped = _pingpong(lab, size, repeats=1)
    finally:
        subprocess.run([*shape, "del", "dev", "lab0", "root"], capture_output=True)
    assert shaped >= (size - 4096) * 8 / 1e6 * 0.95, f"{shaped:.4f} s at 1 Mbit/s: not over the shaped link"
    assert shaped < 5.0 and free < shaped / 10, (free, shaped)


def test_a_host_whose_sshd_is_down(lab, cli):
    """One `error:` line naming the host, exit 1, no traceback, nothing left running. (Last: it stops pi-h2's sshd.)"""
    os.kill(int((lab.dir / "sshd-pi-h2.pid").read_text()), signal.SIGTERM)
    assert lab.ssh("pi-h2", "true").returncode != 0
    done = cli("run", "--hostfile", str(lab.hostfile), "--stages", "3", "-m", str(lab.model), "-p", PROMPT,
               "-n", "4", env=lab.run_env(), timeout=60)
    assert done.returncode == 1
    assert_clean_failure(done, "host pi-h2 is unreachable")


def test_pipeinfer_ssh_is_what_mpiexec_and_the_host_check_use(monkeypatch, tmp_path):
    """$PIPEINFER_SSH (the lab's `ssh -F <config>` wrapper) reaches both hydra and the host check; no lab needed."""
    from pipeinfer_cpu.app import launcher
    from pipeinfer_cpu.errors import LaunchError

    fake = tmp_path / "ssh"
    fake.write_text("#!/bin/sh\necho \"ssh: connect to host $5 port 22: Connection refused\" >&2\nexit 255\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PIPEINFER_SSH", str(fake))
    command = launcher.mpiexec_command(launcher.MpiExec("/opt/mpich/bin/mpiexec", "mpich"), ("n1", "n2"),
                                       tmp_path / "machinefile")
    assert command[1:5] == ["-launcher", "ssh", "-launcher-exec", str(fake)]
    refused = r"^host n2 is unreachable: ssh: connect to host n2 port 22: Connection refused$"
    with pytest.raises(LaunchError, match=refused):
        launcher.check_hosts(("n2",))
