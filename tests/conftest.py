"""Shared fixtures: the embedded default model, an isolated shard cache, a CLI runner; and the `network` mark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "network: downloads from the package index; runs only with "
                                       "PIPEINFER_NETWORK_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PIPEINFER_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="downloads from the package index: set PIPEINFER_NETWORK_TESTS=1 to run it")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model() -> Path:
    from pipeinfer_cpu.modelfiles.models import default_model_path

    return default_model_path()


def real_model(name: str) -> Path:
    """A real model of the catalogue (`make test` fetches them), or a skip saying why it is missing."""
    from pipeinfer_cpu.errors import ModelError
    from pipeinfer_cpu.modelfiles.registry import resolve_model

    try:
        return resolve_model(name)
    except ModelError as exc:
        pytest.skip(f"the real model {name} cannot be had on this machine: {exc}")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeinfer-cache")


@pytest.fixture(scope="session")
def cli(cache_dir):
    """Run `pipeinfer-cpu ARGS` in a subprocess (real MPI when asked), returning CompletedProcess; `env`
    adds to the environment or overrides it (PIPEINFER_CACHE included)."""
    def run(*args: str, timeout: float = 300, env: dict | None = None, input: str | None = None,
            cwd: Path = REPO):
        tag = uuid.uuid4().hex  # marks every process of this job, to find leftovers later
        full_env = {**os.environ, "PIPEINFER_CACHE": str(cache_dir), "PIPEINFER_TEST_TAG": tag, **(env or {})}
        full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
        done = subprocess.run([sys.executable, "-m", "pipeinfer_cpu", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd, input=input)
        done.tag = tag
        return done
    return run


def processes_tagged(tag: str) -> list:
    """Live processes started with PIPEINFER_TEST_TAG=tag (the job's ranks, mpiexec, ...)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("PIPEINFER_TEST_TAG") == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def assert_clean_failure(done, fragment):
    """Bad input's contract: one `error:` line naming the problem, a non-zero exit, no traceback, no rank left."""
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert not processes_tagged(done.tag), "a rank was left running"
