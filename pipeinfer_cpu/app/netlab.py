"""`pipeinfer-cpu netlab probe`: measure a link through the real transport, emulated or not
(`netlab sweep` is app/sweep.py).

Two ranks are started with the project's launcher helpers (placed on the hostfile's first two
hosts, or twice on this machine) running `python -m pipeinfer_cpu.wire.probe`, which ping-pongs and
streams messages of each size (see there). The link map is built here, as for `run`: --link for the
pair, or the hostfile's `# link A B ...` line naming their hosts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeinfer_cpu.app import launcher
from pipeinfer_cpu.app.hostfile import link_map, parse_hostfile
from pipeinfer_cpu.errors import LaunchError, UserError
from pipeinfer_cpu.stats import markdown_table
from pipeinfer_cpu.wire.links import LinkMap

SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
              "g": 10**9, "gb": 10**9, "gib": 1 << 30}
_SIZE = re.compile(r"^(?P<number>[0-9]*\.?[0-9]+)\s*(?P<unit>[A-Za-z]*)$")
MAX_SIZE = 256 << 20


@dataclass(frozen=True)
class ProbeRequest:
    link: str | None
    hostfile: Path | None
    sizes: tuple[int, ...]
    budget_s: float = 1.0
    timeout_s: float = 300.0


def parse_sizes(text: str) -> tuple[int, ...]:
    """`8,64KiB,1MiB` in bytes (B, k/KB/M/MB/G/GB decimal, KiB/MiB/GiB binary); a UserError naming a bad one."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        match = _SIZE.match(part)
        unit = match["unit"].lower() if match else ""
        if match is None or unit not in SIZE_UNITS:
            raise UserError(f"bad message size {part!r} in --sizes (e.g. 8,64KiB,1MiB)")
        size = int(float(match["number"]) * SIZE_UNITS[unit])
        if not 1 <= size <= MAX_SIZE:
            raise UserError(f"message size {part!r} must be between 1 byte and {MAX_SIZE >> 20} MiB")
        sizes.append(size)
    return tuple(sizes)


def probe_placement(hostfile: Path | None) -> tuple[str, str]:
    """The two ranks' hosts: the hostfile's first two lines (its only one, twice), else this machine twice."""
    if hostfile is None:
        return ("localhost", "localhost")
    hosts = parse_hostfile(hostfile)
    return (hosts[0].name, hosts[1 % len(hosts)].name)


def run_probe(request: ProbeRequest) -> dict:
    """Start the probe job and return rank 0's result: {"link": ..., "hosts": [...], "rows": [...]}."""
    placement = probe_placement(request.hostfile)
    links = link_map(request.link, request.hostfile, placement) or LinkMap()
    mpi = launcher.find_mpiexec()
    launcher.check_hosts(placement)
    with tempfile.TemporaryDirectory(prefix="pipeinfer-netlab-") as tmp:
        machinefile = launcher.write_machinefile(mpi, placement, Path(tmp))
        command = [*launcher.mpiexec_prefix(mpi, machinefile), "-n", "2", sys.executable, "-m",
                   "pipeinfer_cpu.wire.probe", "--links", json.dumps(links.to_json()),
                   "--sizes", ",".join(map(str, request.sizes)), "--budget-s", str(request.budget_s)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=request.timeout_s,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"the probe did not finish within {request.timeout_s:.0f} s") from None
    result = _result_line(done.stdout)
    if done.returncode != 0 or result is None:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        reason = errors[0][len("error: "):] if errors else f"mpiexec exited with {done.returncode}"
        raise LaunchError(f"the probe failed: {reason}")
    return {**result, "hosts": list(placement)}


def _result_line(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "rows" in value:
            return value
    return None


def probe_table(result: dict) -> str:
    """The result as a markdown table, with a title line saying which link and hosts."""
    columns = {"size": "size", "one-way ms": "one_way_ms", "unshaped ms": "baseline_ms", "added ms": "added_ms",
               "expected ms": "expected_ms", "Mbit/s": "mbit_s", "configured Mbit/s": "expected_mbit_s"}
    rows = [{name: (_size_text(row[key]) if key == "size" else row.get(key)) for name, key in columns.items()}
            for row in result["rows"]]
    hosts = " <-> ".join(result["hosts"])
    title = f"link {result['link'] or 'unshaped (the real transport)'}, ranks on {hosts}"
    return f"{title}\n\n{markdown_table(rows, list(columns))}"


def _size_text(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"
