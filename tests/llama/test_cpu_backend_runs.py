"""The CPU backend each rank loads, on real ranks: reported, forced, and refused in one clear line."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from conftest import REPO, processes_tagged
from pipeinfer_cpu.app.launcher import is_mpi_noise
from pipeinfer_cpu.llama.cpubackend import installed_variants, ranked_candidates, read_cpu
from pipeinfer_cpu.llama.runtime import LIB_DIR
from pipeinfer_cpu.wire.runs import WIRE_VERSION

RUN = ("run", "--hostfile", "hosts/local.txt", "-p", "Hello", "-n", "4")
NO_AVX2 = "sse4_2 avx f16c fma"  # an Ivy Bridge's view of the world, for PIPEINFER_CPU_FLAGS


def one_error_line(done, *fragments):
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not is_mpi_noise(line)]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and all(f in lines[0] for f in fragments), lines[0]
    assert "Traceback" not in done.stderr
    deadline = time.time() + 10  # mpiexec may return while its proxy is still ending the ranks
    while processes_tagged(done.tag) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_tagged(done.tag), "a rank was left running"


def test_the_best_variant_that_passes_its_probe_is_chosen_and_reported(cli):
    done = cli("cpu", "--json", env={"PIPEINFER_CPU_VARIANT": ""})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    installed = installed_variants(LIB_DIR)
    if not installed:
        assert report["variant"] == "built-in"
        return
    rejected = {entry.split(" ")[0] for entry in report["rejected"]}
    best = next(v.name for v in ranked_candidates(installed, read_cpu()) if v.name not in rejected)
    assert report["variant"] == best and "AVX2" in report["features"]


def test_verbose_names_every_ranks_backend(cli):
    done = cli(*RUN, "--verbose", env={"PIPEINFER_CPU_VARIANT": "haswell"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "CPU backend haswell (forced)" in line]
    assert [line.split(" ")[1] for line in lines] == ["0", "1", "2"]


def test_a_cpu_without_avx2_is_one_line_naming_rank_and_host(cli):
    one_error_line(cli(*RUN, env={"PIPEINFER_CPU_FLAGS": NO_AVX2}), "rank 1 (", "lacks AVX2, BMI2")


def test_one_worker_with_no_usable_variant_stops_the_whole_job(cache_dir):
    """Only the last rank's CPU lacks AVX2 (mpiexec's per-rank -env): it is named, every rank stops."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, PIPEINFER_CACHE=str(cache_dir), PIPEINFER_TEST_TAG=tag, PIPEINFER_CPU_VARIANT="")
    program = [sys.executable, "-m", "pipeinfer_cpu", "run", "--stages", "2", *RUN[3:]]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    done = subprocess.run([mpiexec, "-n", "2", *program, ":", "-n", "1", "-env", "PIPEINFER_CPU_FLAGS", NO_AVX2,
                           *program], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    done.tag = tag
    one_error_line(done, "rank 2 (", "lacks AVX2")


def test_a_forced_variant_this_cpu_cannot_run_or_that_is_not_installed(cli):
    one_error_line(cli(*RUN, env={"PIPEINFER_CPU_VARIANT": "pentium"}), "'pentium' is not installed")
    one_error_line(cli(*RUN, env={"PIPEINFER_CPU_VARIANT": "haswell", "PIPEINFER_CPU_FLAGS": NO_AVX2}),
                   "variant haswell needs AVX2, BMI2, which this CPU")


def test_a_tampered_wire_version_byte_is_one_line(cli):
    """The head writes version 99 into its run messages; the first stage refuses the first one."""
    done = cli(*RUN, env={"PIPEINFER_TEST_WIRE_VERSION": "99"})
    one_error_line(done, "rank 1 (", "wire format version 99", f"speaks version {WIRE_VERSION}")
