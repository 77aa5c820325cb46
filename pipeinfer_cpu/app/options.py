"""The options of `run` and `chat`, each kind declared once (click) and parsed once: the engine
options into `EngineOptions` (checked once, in `__post_init__`, and turned into the library's
settings and topology), the sampling options into `SamplingOptions` (what the user gave; each
command has its own defaults)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import click

from pipeinfer_cpu.app.hostfile import Host, link_map, parse_hostfile
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head.engine import EngineSettings, check_draft
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.ngram import NgramSettings
from pipeinfer_cpu.head.specdecode import SpecSettings
from pipeinfer_cpu.llama.runtime import MAX_SEQUENCES
from pipeinfer_cpu.llama.settings import FLASH_ATTN, KV_TYPES, LOAD_MODES, WIRE_DTYPES, LlamaSettings
from pipeinfer_cpu.modelfiles.models import check_supported, read_model_info
from pipeinfer_cpu.modelfiles.planning import parse_weights, split_layers
from pipeinfer_cpu.modelfiles.registry import resolve_model
from pipeinfer_cpu.sampling import LLAMA_CLI_DEFAULTS, MODEL_SAMPLING_KEYS, SamplingConfig
from pipeinfer_cpu.wire.links import LinkMap, LinkSpec
from pipeinfer_cpu.wire.transport import under_mpi


@dataclass(frozen=True)
class Topology:
    """How many stages, on which hosts, with which weights."""

    stage_hosts: tuple[str, ...]
    weights: tuple[float, ...]
    draft_host: str | None = None  # the dedicated draft rank's host, if there is one
    stage_threads: tuple[int, ...] = ()  # per stage, the hostfile's `threads=` (0: not given)

    @property
    def placement(self) -> tuple[str, ...]:
        """Host of each MPI rank: the head beside the first stage, the stages in order, then the draft."""
        draft = (self.draft_host,) if self.draft_host else ()
        return (self.stage_hosts[0], *self.stage_hosts, *draft)


# Declared here once; `bench` passes it on to its runs.
WIRE_DTYPE_OPTION = click.option(
    "--wire-dtype", type=click.Choice(list(WIRE_DTYPES)), default="f32", show_default=True,
    help="Hidden states between stages: f32 as computed (bit-exact), f16 (half the bytes; beyond +-65504 clipped) "
         "or q8 (int8 in blocks of 32 with a float32 scale, 1.125 bytes a value); f16 and q8 are lossy (see README).")


# Declared here once; `bench` passes it on to its runs, `netlab probe` uses it too.
LINK_OPTION = click.option(
    "--link", help="Emulate slow links between every pair of ranks (one host too), in the transport: "
                   "bw=RATE (bit, kbit, mbit, gbit), delay=TIME (us, ms, s), optional jitter=TIME, e.g. "
                   "bw=100mbit,delay=2ms. Hostfile lines `# link A B SETTING` set host pairs (they win).")


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
    llama: LlamaSettings = LlamaSettings()  # KV-cache type, flash attention, loading (checked there)
    link: str | None = None  # --link: every pair of ranks' emulated link (wire/links.py)
    on_failure: str = "abort"  # or "reshard": go on with the stages left when one dies (app/reshard.py)
    verbose: bool = False
    debug: bool = False

    def __post_init__(self) -> None:
        if self.link is not None:
            LinkSpec.parse(self.link)  # a bad setting is a one-line error before anything starts
        _ = self.ngram  # likewise a bad --draft ngram:N,K
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
    def ngram(self) -> NgramSettings | None:
        """The n-gram draft, when --draft names it (`ngram`, `ngram:N,K`, either before `+MODEL`)."""
        if not self.draft or not NgramSettings.is_spec(str(self.draft)):
            return None
        return NgramSettings.parse(NgramSettings.split(str(self.draft))[0])

    @property
    def draft_model(self) -> Path | None:
        """The draft model (a file or a name), when --draft names one (alone, or after `ngram+`)."""
        if self.ngram is None:
            return self.draft
        model = NgramSettings.split(str(self.draft))[1]
        return None if model is None else Path(model)

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
        dedicated = self.speculative and self.draft_model is not None and self.draft_ranks == "dedicated"
        return Topology(stage_hosts, weights, (self.draft_host or stage_hosts[0]) if dedicated else None,
                        tuple(hosts[i % len(hosts)].threads for i in range(n_stages)))

    @functools.cached_property
    def links(self) -> LinkMap | None:
        """The emulated links of the job's ranks: --link for every pair, the hostfile's `# link` lines for theirs."""
        return link_map(self.link, self.hostfile, self.topology.placement)

    @property
    def settings(self) -> EngineSettings:
        # Under the user's own `mpiexec -n N` with nothing said about stages, the stages are the ranks it
        # started (an equal split), not the one-host default topology.
        said = self.hostfile is not None or self.stages is not None or self.weights is not None
        split = self.topology.weights if said or not under_mpi() else None
        # Model names become their files here: the settings carry paths (made absolute for the head).
        model, draft = (None if name is None else resolve_model(name) for name in (self.model, self.draft_model))
        return EngineSettings(model=model, mode=self.mode, weights=split, n_threads=self.threads,
                              n_ctx=self.n_ctx, n_batch=self.n_batch, timeout_s=self.timeout_s,
                              shard_dir=self.shard_dir, verbose=self.verbose, draft=draft,
                              draft_in_head=self.draft_ranks == "head", ngram=self.ngram, spec=self.spec,
                              cpu_variant=self.cpu_variant or None, llama=self.llama,
                              stage_threads=self.topology.stage_threads if split is not None else None,
                              links=self.links)

    def preflight(self) -> None:
        """Check what can be checked before any process starts: the model, the draft and the split."""
        info = read_model_info(resolve_model(self.model))
        check_supported(info)
        if self.speculative and self.draft_model is not None:
            check_draft(info, read_model_info(resolve_model(self.draft_model)))
        if self.mode != Mode.SINGLE:
            split_layers(info.n_layer, self.topology.weights)


def engine_options(command):
    """Add the options that say how the model runs; the command receives them as `options: EngineOptions`."""
    @functools.wraps(command)
    def wrapper(**kwargs):
        spec = SpecSettings(**{name: kwargs.pop(name) for name in _names(SpecSettings)})
        llama = LlamaSettings(**{name: kwargs.pop(name) for name in _names(LlamaSettings)})
        options = EngineOptions(spec=spec, llama=llama,
                                **{name: kwargs.pop(name) for name in _names(EngineOptions) - {"spec", "llama"}})
        return command(options=options, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _names(cls) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


_OPTIONS = [
    click.option("--hostfile", type=click.Path(path_type=Path), help="Machines, one stage per line (MPICH/Open MPI syntax)."),
    click.option("--model", "-m", type=click.Path(path_type=Path), help="GGUF file or model name (`pipeinfer-cpu models`; default: the embedded SmolLM2-135M-Instruct Q4_1)."),
    click.option("--mode", type=click.Choice([mode.value for mode in Mode]), default="pipeline", show_default=True),
    click.option("--stages", type=int, help="Pipeline stages (default: one per hostfile line)."),
    click.option("--weights", help="Comma-separated layer-split weights, one per stage (default: the hostfile's)."),
    click.option("--threads", "-t", type=int, default=0, help="Threads per rank (0: the host's cores shared by its ranks)."),
    click.option("--ctx-size", "-c", "n_ctx", type=int, default=2048, show_default=True),
    click.option("--batch-size", "-b", "n_batch", type=int, default=256, show_default=True),
    click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Seconds to wait for any rank before giving up."),
    click.option("--shard-dir", type=click.Path(path_type=Path), help="Where to write shards (default: a cache keyed by model hash and split)."),
    click.option("--draft", type=click.Path(path_type=Path),
                 help="The draft of speculative and pipeinfer: a GGUF file or model name (same vocabulary), or "
                      "ngram[:N,K] (no model: the next K tokens guessed from where the last N appeared before; "
                      "default ngram:3,8), or ngram[:N,K]+MODEL (the n-gram draft where the text repeats itself, the "
                      "model where it finds nothing)."),
    click.option("--draft-ranks", type=click.Choice(["dedicated", "head"]), default="dedicated", show_default=True,
                 help="Run the draft on a rank of its own, or inside the head's process."),
    click.option("--draft-host", help="Host of the dedicated draft rank (default: the first host)."),
    click.option("--draft-max", type=int, default=8, show_default=True,
                 help="Draft tokens per speculative run, at most (pipeinfer on several target stages drafts one "
                      "per run unless --fixed-length)."),
    click.option("--max-inflight", type=int, default=4, show_default=True,
                 help="pipeinfer: runs in flight, at most (on several target stages, unless --fixed-length: at "
                      "least one per stage)."),
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
    click.option("--kv-type", type=click.Choice(list(KV_TYPES)), default="f16", show_default=True,
                 help="KV-cache element type on every stage (q8_0, q4_0: longer contexts on small nodes)."),
    click.option("--flash-attn", type=click.Choice(list(FLASH_ATTN)), default="auto", show_default=True,
                 help="llama.cpp's flash attention (a quantised KV cache needs it)."),
    click.option("--load-mode", type=click.Choice(list(LOAD_MODES)), default="mmap", show_default=True,
                 help="How stages read their weights: mmap shares the page cache; mlock keeps them in RAM."),
    click.option("--repack/--no-repack", default=True, show_default=True,
                 help="Let llama.cpp repack weights for its faster batch kernels (--no-repack: rows of batches of "
                      "up to 7 decode exactly as single rows; see README)."),
    WIRE_DTYPE_OPTION,
    LINK_OPTION,
    click.option("--on-failure", type=click.Choice(["abort", "reshard"]), default="abort", show_default=True,
                 help="When a stage's rank dies: end with an error, or start a job on the hostfile lines left "
                      "and go on with the answer where it was (see README, Faults)."),
    click.option("--verbose", "-v", is_flag=True, help="Say what is being set up, and each rank's CPU backend."),
    click.option("--debug", is_flag=True, help="Tracebacks and mpiexec's own output on errors."),
]


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling options the user gave (SamplingConfig field -> value); the others take the
    command's defaults: `run`'s are SamplingConfig's (greedy), `chat`'s come from the model or
    llama-cli (app/chat.py)."""

    given: Mapping[str, float | int]

    def __post_init__(self) -> None:
        self.over(SamplingConfig())  # each field is checked on its own, so a value bad here is bad anywhere

    def over(self, base: SamplingConfig) -> SamplingConfig:
        """`base` with the given values in its place; a bad value is a one-line UserError."""
        try:
            return dataclasses.replace(base, **self.given)
        except ValueError as exc:
            raise UserError(str(exc)) from None


def sampling_options(command):
    """Add the sampling options; the command receives them as `sampling: SamplingOptions`."""
    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in _names(SamplingConfig)}
        return command(sampling=SamplingOptions({name: v for name, v in values.items() if v is not None}), **kwargs)

    for option in reversed(_SAMPLING_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _defaults(name: str) -> str:
    """The help's default of a sampling option: `run`'s, and `chat`'s (app/chat.py)."""
    run, chat = getattr(SamplingConfig(), name), getattr(LLAMA_CLI_DEFAULTS, name)
    if name not in MODEL_SAMPLING_KEYS.values():
        return f"Default: {run:g}."
    if run == chat:
        return f"Default: {run:g}; chat: the model's recommendation if it has one."
    return f"Default: {run:g}; chat: the model's recommendation, else {chat:g}."


_SAMPLING_OPTIONS = [
    click.option("--temp", "--temperature", "temperature", type=float, help=f"0 = greedy. {_defaults('temperature')}"),
    click.option("--top-k", type=int, help=f"Keep the k likeliest tokens; 0 = off. {_defaults('top_k')}"),
    click.option("--top-p", type=float, help=f"Keep the likeliest tokens holding this much probability; 1 = off. "
                                             f"{_defaults('top_p')}"),
    click.option("--min-p", type=float, help=f"Keep tokens at least this times as likely as the likeliest; 0 = off. "
                                             f"{_defaults('min_p')}"),
    click.option("--repeat-penalty", type=float,
                 help=f"Divide the logit of each token among the last --repeat-last-n by this (multiply a negative "
                      f"one); 1 = off. {_defaults('repeat_penalty')}"),
    click.option("--repeat-last-n", type=int, help=f"Tokens the penalties look back on; 0 = off. "
                                                   f"{_defaults('repeat_last_n')}"),
    click.option("--frequency-penalty", type=float, help="Subtract this times a token's count among the last "
                                                         f"--repeat-last-n. {_defaults('frequency_penalty')}"),
    click.option("--presence-penalty", type=float, help="Subtract this from each token among the last "
                                                        f"--repeat-last-n. {_defaults('presence_penalty')}"),
    click.option("--seed", "-s", type=int, help=f"Random seed (chat's answer n samples with seed + n). {_defaults('seed')}"),
]
