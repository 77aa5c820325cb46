"""The engine options of `run` and `chat`: declared once (click), parsed once into `EngineOptions`,
checked once (`EngineOptions.__post_init__`), and turned into the library's settings and topology."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import click

from pipeinfer_cpu.app.hostfile import Host, parse_hostfile
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.engine import EngineSettings, check_draft
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.specdecode import SpecSettings
from pipeinfer_cpu.llama.runtime import MAX_SEQUENCES
from pipeinfer_cpu.modelfiles.models import check_supported, read_model_info, resolve_model
from pipeinfer_cpu.modelfiles.planning import parse_weights, split_layers
from pipeinfer_cpu.wire.transport import under_mpi


@dataclass(frozen=True)
class Topology:
    """How many stages, on which hosts, with which weights."""

    stage_hosts: tuple[str, ...]
    weights: tuple[float, ...]
    draft_host: str | None = None  # the dedicated draft rank's host, if there is one

    @property
    def placement(self) -> tuple[str, ...]:
        """Host of each MPI rank: the head beside the first stage, the stages in order, then the draft."""
        draft = (self.draft_host,) if self.draft_host else ()
        return (self.stage_hosts[0], *self.stage_hosts, *draft)


@dataclass(frozen=True)
class EngineOptions:
    """Everything the engine options say; field names are the click parameter names."""

    hostfile: Path | None = None
    model: Path | None = None
    stages: int | None = None
    weights: str | None = None
    threads: int = 0
    n_ctx: int = 2048
    n_batch: int = 256
    timeout_s: float = 60.0
    shard_dir: Path | None = None
    draft: Path | None = None
    draft_ranks: str = "dedicated"
    draft_host: str | None = None
    spec: SpecSettings = SpecSettings(Mode.PIPELINE)  # the mode and the speculation options (checked there)
    cpu_variant: str | None = None
    verbose: bool = False
    debug: bool = False

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise UserError(f"--threads must be 0 (auto) or more, got {self.threads}")
        spec = self.spec
        if self.speculative and spec.max_inflight * spec.draft_max >= self.n_ctx // 2:
            raise UserError(f"--max-inflight {spec.max_inflight} runs of --draft-max {spec.draft_max} tokens do not "
                            f"fit beside a prompt in the context (--ctx-size {self.n_ctx})")
        most = min(MAX_SEQUENCES, self.n_batch)
        if spec.kv_sequences > most:
            raise UserError(f"--max-inflight {spec.max_inflight} runs with draft token trees need "
                            f"{spec.kv_sequences} KV sequences per stage; llama.cpp allows {most} here (at most "
                            f"{MAX_SEQUENCES}, and no more than --batch-size): lower --max-inflight or turn trees off "
                            "with --p-split 1")

    @property
    def mode(self) -> Mode:
        return self.spec.mode

    @property
    def speculative(self) -> bool:
        return self.mode.speculative

    @functools.cached_property
    def topology(self) -> Topology:
        """The stages' hosts and weights, with a dedicated draft rank (on --draft-host or the first host) when one is needed."""
        hosts: tuple[Host, ...] = parse_hostfile(self.hostfile) if self.hostfile else (Host("localhost"),)
        n_stages = self.stages if self.stages is not None else len(hosts)
        if n_stages < 1:
            raise UserError(f"--stages must be at least 1, got {n_stages}")
        stage_hosts = tuple(hosts[i % len(hosts)].name for i in range(n_stages))
        weights = (parse_weights(self.weights, n_stages) if self.weights is not None
                   else tuple(hosts[i % len(hosts)].weight for i in range(n_stages)))
        dedicated = self.speculative and self.draft is not None and self.draft_ranks == "dedicated"
        return Topology(stage_hosts, weights, (self.draft_host or stage_hosts[0]) if dedicated else None)

    @property
    def settings(self) -> EngineSettings:
        # Under the user's own `mpiexec -n N` with nothing said about stages, the stages are the ranks it
        # started (an equal split), not the one-host default topology.
        said = self.hostfile is not None or self.stages is not None or self.weights is not None
        split = self.topology.weights if said or not under_mpi() else None
        return EngineSettings(model=self.model, mode=self.mode, weights=split, n_threads=self.threads,
                              n_ctx=self.n_ctx, n_batch=self.n_batch, timeout_s=self.timeout_s,
                              shard_dir=self.shard_dir, verbose=self.verbose, draft=self.draft,
                              draft_in_head=self.draft_ranks == "head", spec=self.spec,
                              cpu_variant=self.cpu_variant or None)

    def preflight(self) -> None:
        """Check what can be checked before any process starts: the model, the draft and the split."""
        info = read_model_info(resolve_model(self.model))
        check_supported(info)
        if self.speculative and self.draft is not None:
            check_draft(info, read_model_info(resolve_model(self.draft)))
        if self.mode != Mode.SINGLE:
            split_layers(info.n_layer, self.topology.weights)


def engine_options(command):
    """Add the options that say how the model runs; the command receives them as `options: EngineOptions`."""
    @functools.wraps(command)
    def wrapper(**kwargs):
        spec = SpecSettings(**{name: kwargs.pop(name) for name in _names(SpecSettings)})
        options = EngineOptions(spec=spec, **{name: kwargs.pop(name) for name in _names(EngineOptions) - {"spec"}})
        return command(options=options, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _names(cls) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


_OPTIONS = [
    click.option("--hostfile", type=click.Path(path_type=Path), help="Machines, one stage per line (MPICH/Open MPI syntax)."),
    click.option("--model", "-m", type=click.Path(path_type=Path), help="GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1)."),
    click.option("--mode", type=click.Choice([mode.value for mode in Mode]), default="pipeline", show_default=True),
    click.option("--stages", type=int, help="Pipeline stages (default: one per hostfile line)."),
    click.option("--weights", help="Comma-separated layer-split weights, one per stage (default: the hostfile's)."),
    click.option("--threads", "-t", type=int, default=0, help="Threads per rank (0: the host's cores shared by its ranks)."),
    click.option("--ctx-size", "-c", "n_ctx", type=int, default=2048, show_default=True),
    click.option("--batch-size", "-b", "n_batch", type=int, default=256, show_default=True),
    click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Seconds to wait for any rank before giving up."),
    click.option("--shard-dir", type=click.Path(path_type=Path), help="Where to write shards (default: a cache keyed by model hash and split)."),
    click.option("--draft", type=click.Path(path_type=Path), help="Draft GGUF (same vocabulary) for speculative and pipeinfer."),
    click.option("--draft-ranks", type=click.Choice(["dedicated", "head"]), default="dedicated", show_default=True,
                 help="Run the draft on a rank of its own, or inside the head's process."),
    click.option("--draft-host", help="Host of the dedicated draft rank (default: the first host)."),
    click.option("--draft-max", type=int, default=8, show_default=True, help="Draft tokens per speculative run, at most."),
    click.option("--max-inflight", type=int, default=4, show_default=True, help="pipeinfer: runs in flight, at most."),
    click.option("--p-accept", type=float, default=0.4, show_default=True, help="Stop drafting below this top-1 probability."),
    click.option("--p-recovery", type=float, default=0.05, show_default=True, help="Raise p-accept by this after a rejection."),
    click.option("--p-decay", type=float, default=0.02, show_default=True, help="Lower p-accept by this after a confirmed run."),
    click.option("--p-split", type=float, default=1.0, show_default=True,
                 help="pipeinfer, EXPERIMENTAL: branch the draft token tree where the draft's second choice is "
                      "at least this likely (1: no trees). Not yet lossless: branches reorder llama.cpp's KV "
                      "cells, which changes its CPU attention results slightly (see README)."),
    click.option("--adaptive/--fixed-length", default=True, show_default=True,
                 help="Adapt the draft length to the acceptance observed."),
    click.option("--cpu-variant", envvar="PIPEINFER_CPU_VARIANT",
                 help="Force this llama.cpp CPU backend variant on every rank, e.g. haswell (AVX2 only); "
                      "default: the best one each CPU runs (see `pipeinfer-cpu cpu`)."),
    click.option("--verbose", "-v", is_flag=True, help="Say what is being set up, and each rank's CPU backend."),
    click.option("--debug", is_flag=True, help="Tracebacks and mpiexec's own output on errors."),
]
