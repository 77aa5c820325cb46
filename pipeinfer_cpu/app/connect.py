"""How a command reaches the model: which client its session gets (app/client.py's kinds, or
app/reshard.py's when a failed stage should not end the answer)."""

from __future__ import annotations

from typing import Callable

from pipeinfer_cpu.app.client import Client, JobClient, LocalClient
from pipeinfer_cpu.app.options import EngineOptions
from pipeinfer_cpu.app.reshard import ReshardingClient
from pipeinfer_cpu.head.engine import Engine
from pipeinfer_cpu.head.job import as_head
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.server import EngineServer
from pipeinfer_cpu.wire.transport import MpiTransport, under_mpi


def with_client(options: EngineOptions, session: Callable[[Client], int]) -> int:
    """Run `session` (it returns the exit code) with a client of the model: in this process (`single`,
    or rank 0 of your own mpiexec), under the head's failure handling; else the head of a job started
    now, one that re-shards on a stage's failure with --on-failure reshard."""
    if under_mpi() or options.mode == Mode.SINGLE:
        transport = MpiTransport() if under_mpi() else None
        return as_head(lambda: session(LocalClient(EngineServer(Engine.start(options.settings, transport)))),
                       transport, options.debug)
    options.preflight()
    return session(ReshardingClient(options) if options.on_failure == "reshard" else JobClient.launch(options))
