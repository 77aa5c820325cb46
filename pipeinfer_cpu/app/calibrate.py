"""`pipeinfer-cpu hosts calibrate`: time the model on every host of a hostfile, then write the hostfile
again with measured `# weight=W` comments, and the timings (timings.py) that `plan` reads.

The timing runs in an MPI job started like a pipeline's, one worker per hostfile line
(head/calibration.py, rank/calibration.py). A host's weight is 1 / (its seconds per layer for a
one-token run), scaled so that the slowest host has 1.00: a pipeline split by these weights gives
each host a share of the layers that takes it about as long as the others take for theirs.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeinfer_cpu.app import launcher
from pipeinfer_cpu.app.client import JobClient, JobEnded
from pipeinfer_cpu.app.hostfile import Host, parse_hostfile, set_weights
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_write_text, temporary_beside
from pipeinfer_cpu.head.calibration import CalibrationSettings
from pipeinfer_cpu.modelfiles.models import check_supported, read_model_info
from pipeinfer_cpu.modelfiles.registry import resolve_model
from pipeinfer_cpu.timings import Calibration, HostTiming

JOB_WAIT_S = 900.0  # the whole job: start, shards written and sent, every host timed
BUSY_SPREAD = 1.5  # median run / fastest run above which a host was busy with something else


@dataclass(frozen=True)
class CalibrateRequest:
    """What `hosts calibrate` was asked."""

    hostfile: Path
    out: Path  # the hostfile to write, with weights
    timings: Path | None = None  # default: `out` with .timings.json
    model: Path | None = None  # a file or a model name; None: the embedded default
    threads: int = 0  # for a host line without threads=; 0: the host's cores shared by its ranks
    cpu_variant: str | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise UserError(f"--threads must be 0 (auto) or more, got {self.threads}")

    @property
    def timings_path(self) -> Path:
        return self.timings or self.out.with_suffix(".timings.json")


class _JobFailed(Exception):
    """The job ended without a calibration; what went wrong is already on stderr."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def calibrate_hosts(request: CalibrateRequest) -> int:
    """Calibrate, write both files, print the table; returns the exit code."""
    hosts = parse_hostfile(request.hostfile)
    text = request.hostfile.read_text()
    info = read_model_info(resolve_model(request.model))
    check_supported(info)
    for path in (request.out, request.timings_path):
        check_writable(path)
    settings = CalibrationSettings(info.path, tuple(host.threads for host in hosts), request.threads,
                                   request.cpu_variant)
    try:
        event = _run_job(hosts, settings, request.debug)
    except _JobFailed as failed:
        return failed.code
    calibration = calibration_from_event(event, hosts)
    weights = host_weights(calibration.hosts)
    _write(request.out, lambda: atomic_write_text(request.out, set_weights(text, weights, str(request.hostfile))))
    _write(request.timings_path, lambda: calibration.save(request.timings_path))
    print(table(calibration, weights, [h["backend"] for h in event["hosts"]]))
    for line in busy_warnings(hosts, [float(h["spread"]) for h in event["hosts"]]):
        print(line, file=sys.stderr)
    print(f"wrote {request.out} and {request.timings_path}")
    return 0


def check_writable(path: Path) -> None:
    """Fail before the job runs when `path` cannot be written (as atomic_write_text will write it)."""
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    above = next(parent for parent in path.absolute().parents if parent.exists())
    if not above.is_dir():
        raise UserError(f"cannot write {path}: {above} is not a folder")
    try:
        temporary_beside(path).unlink()
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write(path: Path, write) -> None:
    try:
        write()
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def _run_job(hosts: Sequence[Host], settings: CalibrationSettings, debug: bool) -> dict:
    """Start the job (the head beside the first host, then one worker per line) and wait for its calibration."""
    placement = (hosts[0].name, *(host.name for host in hosts))
    tmp = tempfile.TemporaryDirectory(prefix="pipeinfer-calibrate-")
    client = JobClient(launcher.start(placement, Path(tmp.name)), debug, tmp, placement)
    try:
        event = client.ask({"type": "calibrate", "settings": settings.to_json(), "debug": debug},
                           lambda text: None, JOB_WAIT_S)
    except JobEnded as exc:
        if not client.reported:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise _JobFailed(max(1, client.close())) from None
    except KeyboardInterrupt:
        client.close()
        print("error: interrupted", file=sys.stderr, flush=True)
        raise _JobFailed(130) from None
    client.close()
    if event.get("event") != "calibration":
        raise UserError(f"the calibration job answered {event.get('event')!r} instead of a calibration")
    return event


def calibration_from_event(event: dict, hosts: Sequence[Host]) -> Calibration:
    """The head's `calibration` event as a Calibration, one HostTiming per hostfile line, named as there."""
    def pairs(rows) -> tuple[tuple[int, float], ...]:
        return tuple((int(n), float(s)) for n, s in rows)

    return Calibration(str(event["model"]), int(event["n_layers"]),
                       tuple(HostTiming(host.name, int(h["threads"]), pairs(h["layer"]), pairs(h["output"]),
                                        pairs(h.get("run", ())))
                             for host, h in zip(hosts, event["hosts"], strict=True)))


def busy_warnings(hosts: Sequence[Host], spreads: Sequence[float]) -> list[str]:
    """A warning for each host line whose runs took much longer than its fastest (rank/calibration.spread)."""
    return [f"warning: host {index + 1} ({host.name}): a typical run took {value:.1f} x its fastest, so something "
            "else was using the CPU there: its timings and weight are not to be trusted (calibrate on idle hosts)"
            for index, (host, value) in enumerate(zip(hosts, spreads)) if value > BUSY_SPREAD]


def host_weights(timings: Sequence[HostTiming]) -> tuple[float, ...]:
    """Each host's weight: 1 / its seconds per layer for one token, the slowest host 1.00, to 2 decimals."""
    slowest = max(timing.layer_s(1) for timing in timings)
    return tuple(round(slowest / timing.layer_s(1), 2) for timing in timings)


def table(calibration: Calibration, weights: Sequence[float], backends: Sequence[str]) -> str:
    """Milliseconds per run, by tokens per run, of one layer and of the output layer; the weight."""
    counts = [n for n, _ in calibration.hosts[0].layer]
    width = 7 * len(counts)
    heads = "".join(f"{f'n={n}':>7s}" for n in counts)
    lines = [f"{calibration.model}, {calibration.n_layers} layers",
             f"{'':43s}{'one layer, ms per run':>{width}s}  {'output layer, ms per run':>{width}s}",
             f"{'host':20s} {'threads':>7s} {'backend':14s}{heads}  {heads}  weight"]
    for timing, weight, backend in zip(calibration.hosts, weights, backends):
        layer = "".join(f"{timing.layer_s(n) * 1e3:7.3f}" for n in counts)
        output = "".join(f"{timing.output_s(n) * 1e3:7.3f}" for n in counts)
        lines.append(f"{timing.host:20s} {timing.threads:7d} {backend:14s}{layer}  {output}  {weight:6.2f}")
    return "\n".join(lines)
