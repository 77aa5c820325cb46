"""The head's library API: load a model (whole, or sharded across the worker ranks) and generate.

    with Engine.start(settings, transport) as engine:
        generation, stats = engine.generate(engine.encode("Hello"), max_tokens=64, sampling=...)

`single` mode runs the whole model in this process; `pipeline` mode shards it across the worker
ranks of the MPI job and feeds one token at a time through all stages.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.head import pipeinfer, speculative
from pipeinfer_cpu.head.clock import RealClock
from pipeinfer_cpu.head.cluster import Cluster, StageSettings
from pipeinfer_cpu.head.decoding import Decoder, Generation
from pipeinfer_cpu.head.draft_clients import LocalDraftClient, NgramFirstDraftClient, RemoteDraftClient
from pipeinfer_cpu.head.executors import Executor, LocalExecutor, PipelineExecutor
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.ngram import NgramDrafter, NgramSettings
from pipeinfer_cpu.head.session import Context
from pipeinfer_cpu.head.specdecode import DraftClient, Request, SpecCounters, SpecSettings
from pipeinfer_cpu.head.speculation import SpeculationSwitch
from pipeinfer_cpu.llama.cpubackend import BackendReport, NoUsableVariant
from pipeinfer_cpu.llama.drafter import Drafter
from pipeinfer_cpu.llama.kvcache import COMMITTED_SEQ
from pipeinfer_cpu.llama.runtime import Stage, StageConfig, Vocab, cpu_backend
from pipeinfer_cpu.llama.settings import LlamaSettings
from pipeinfer_cpu.modelfiles.models import ModelInfo, check_supported, read_model_info
from pipeinfer_cpu.modelfiles.planning import split_layers
from pipeinfer_cpu.modelfiles.registry import resolve_model
from pipeinfer_cpu.modelfiles.shards import shard_model
from pipeinfer_cpu.sampling import SamplingConfig
from pipeinfer_cpu.stats import RunStats, StageStats, peak_rss_bytes
from pipeinfer_cpu.wire.links import LinkMap
from pipeinfer_cpu.wire.runs import HEAD
from pipeinfer_cpu.wire.transport import Transport


@dataclass(frozen=True)
class EngineSettings:
    """Everything about how the model runs; nothing about what to generate."""

    model: Path | None = None
    mode: Mode = Mode.PIPELINE  # a plain name becomes a Mode
    weights: tuple[float, ...] | None = None  # one per stage; None = equal
    n_threads: int = 0  # 0 = this host's cores shared among the stages on it
    n_ctx: int = 2048
    n_batch: int = 256
    timeout_s: float = 60.0
    shard_dir: Path | None = None
    verbose: bool = False
    draft: Path | None = None  # a draft model
    draft_in_head: bool = False  # draft in the head's process instead of a dedicated rank
    ngram: NgramSettings | None = None  # the model-free n-gram draft instead (always in the head)
    spec: SpecSettings | None = None
    cpu_variant: str | None = None  # a llama.cpp CPU backend variant to force on every rank (None: auto)
    llama: LlamaSettings = LlamaSettings()  # KV-cache type, flash attention, loading: every stage alike
    stage_threads: tuple[int, ...] | None = None  # per stage, threads the hostfile asks for (0: n_threads)
    links: LinkMap | None = None  # emulated slow links between the ranks (None: the real network)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise UserError(f"unknown mode {self.mode!r} (choose from {', '.join(m.value for m in Mode)})") from None
        if self.mode.speculative and self.draft is None and self.ngram is None:
            raise UserError(f"mode {self.mode} needs a draft (--draft FILE.gguf, a model name, or ngram)")
        if self.n_ctx < 16:
            raise UserError(f"--ctx-size must be at least 16, got {self.n_ctx}")
        if self.n_batch < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.n_batch}")

    @property
    def speculation(self) -> SpecSettings:
        """The speculation settings (defaults when none were given)."""
        return self.spec or SpecSettings(self.mode)

    def to_json(self) -> dict:
        """As JSON data for the head of a job; paths made absolute here, in the user's directory."""
        data = dataclasses.asdict(self)
        for name in _PATHS:
            data[name] = None if data[name] is None else str(Path(data[name]).resolve())
        data["links"] = None if self.links is None else self.links.to_json()
        return data

    @staticmethod
    def from_json(data: dict) -> "EngineSettings":
        data = dict(data)
        for name in _PATHS:
            data[name] = None if data[name] is None else Path(data[name])
        data["weights"] = None if data["weights"] is None else tuple(data["weights"])
        data["spec"] = None if data["spec"] is None else SpecSettings(**data["spec"])
        data["llama"] = LlamaSettings(**data["llama"])
        data["stage_threads"] = None if data["stage_threads"] is None else tuple(data["stage_threads"])
        data["links"] = None if data.get("links") is None else LinkMap.from_json(data["links"])
        data["ngram"] = None if data.get("ngram") is None else NgramSettings(**data["ngram"])
        return EngineSettings(**data)


_PATHS = ("model", "shard_dir", "draft")


@dataclass(frozen=True)
class ShardSetup:
    """How the stages got their shards: written now or found in the cache, sent or already there."""

    written: int  # shard files written now (0: this split was in the cache)
    sent: int  # shard files sent to ranks that lacked them
    seconds: float  # from splitting to every stage loaded

    def describe(self) -> str:
        where = f"{self.written} shard{'s' * (self.written != 1)} written" if self.written else "shards from the cache"
        return f"{where}, {self.sent or 'none'} sent, stages loaded in {self.seconds:.1f} s"


class Engine:
    """A loaded model ready to generate; owns the workers' lifetime in pipeline mode."""

    def __init__(self, settings: EngineSettings, info: ModelInfo, vocab: Vocab, executor: Executor,
                 cluster: Cluster | None, stage_ranks: list[int], local_stage: Stage | None,
                 draft: DraftClient | None = None, backends: dict[int, BackendReport] | None = None,
                 shards: ShardSetup | None = None) -> None:
        self.settings = settings
        self.shards = shards  # how the stages got their shards (None: one process, no shards)
        self.backends = backends or {}  # rank -> the llama.cpp CPU backend it runs
        self.info = info
        self.vocab = vocab
        self.executor = executor
        self.cluster = cluster
        self.stage_ranks = stage_ranks
        self._local_stage = local_stage
        self.draft = draft
        self.context = Context(executor, RealClock(cluster.transport if cluster else None))  # the committed tokens and the run ids, for every loop
        self.decoder = Decoder(self.context, settings.n_batch, settings.n_ctx)
        # what pipeinfer learnt about feeding this pipeline, kept across requests
        self.switch = SpeculationSwitch.for_stages(max(1, len(stage_ranks)))

    @staticmethod
    def start(settings: EngineSettings, transport: Transport | None = None) -> "Engine":
        info = read_model_info(resolve_model(settings.model))
        check_supported(info)
        draft_info = None if settings.draft is None else read_model_info(resolve_model(settings.draft))
        if draft_info is not None:
            check_draft(info, draft_info)
        if settings.mode == Mode.SINGLE:
            engine = Engine._start_single(settings, info)
        elif transport is None or transport.size < 2:
            raise UserError("pipeline mode needs at least one worker rank (start it with --hostfile or mpiexec)")
        else:
            engine = Engine._start_pipeline(settings, info, draft_info, transport)
        if settings.verbose:
            for line in engine.backend_lines():
                print(line, file=sys.stderr, flush=True)
        return engine

    @staticmethod
    def _start_single(settings: EngineSettings, info: ModelInfo) -> "Engine":
        head = _head_backend(settings.cpu_variant)
        # the first host's `threads=` from the hostfile, as a stage there would get
        threads = (settings.stage_threads or (0,))[0] or settings.n_threads or _default_threads(1)
        stage = Stage(StageConfig(info.path, True, True, settings.n_ctx, settings.n_batch, threads, 1,
                                  settings.llama))
        vocab = Vocab(info.path)
        return Engine(settings, info, vocab, LocalExecutor(stage), None, [], stage, backends={HEAD: head})

    def backend_lines(self) -> list[str]:
        """One line per rank: its host, CPU, the CPU backend variant it loaded and its features."""
        return [f"rank {rank} ({self._host(rank)}): {report.summary()}" for rank, report in sorted(self.backends.items())]

    def backends_json(self) -> list[dict]:
        return [{"rank": rank, "host": self._host(rank), **report.to_json()}
                for rank, report in sorted(self.backends.items())]

    def rank_names(self) -> dict[str, str]:
        """Every rank of the job in words (by rank number, as JSON keys): what names the rank behind
        mpiexec's word that a process died."""
        head = {str(HEAD): f"rank {HEAD} (the head, on {socket.gethostname()})"}
        if self.cluster is None:
            return head
        return {**head, **{str(rank): self.cluster.describe(rank) for rank in self.cluster.workers}}

    def _host(self, rank: int) -> str:
        return socket.gethostname() if rank == HEAD or self.cluster is None else self.cluster.host(rank)

    @staticmethod
    def _start_pipeline(settings: EngineSettings, info: ModelInfo, draft_info: ModelInfo | None,
                        transport: Transport) -> "Engine":
        cluster = Cluster(transport, settings.timeout_s)
        dedicated_draft = settings.mode.speculative and settings.draft is not None and not settings.draft_in_head
        stage_ranks = list(range(1, transport.size - (1 if dedicated_draft else 0)))
        if not stage_ranks:
            raise UserError("no rank left for the target's stages (the draft takes the last rank)")
        weights = settings.weights or (1.0,) * len(stage_ranks)
        if len(weights) != len(stage_ranks):
            raise UserError(f"{len(weights)} stage weights for {len(stage_ranks)} stages")
        ranges = split_layers(info.n_layer, weights)
        cluster.greet(settings.cpu_variant, settings.links)  # first: a worker that cannot run llama.cpp is named before anything else starts
        backends = {HEAD: _head_backend(settings.cpu_variant), **cluster.backends}
        started, written = time.monotonic(), []
        plan = shard_model(info, ranges, out_dir=settings.shard_dir, progress=_progress(settings.verbose, written))
        cancellation = settings.mode == Mode.PIPEINFER
        stage_settings = StageSettings(settings.n_ctx, settings.n_batch, settings.n_threads,
                                       settings.speculation.kv_sequences, cancellation, settings.llama,
                                       settings.stage_threads)
        cluster.load_stages(plan, stage_ranks, stage_settings)
        draft: DraftClient | None = None
        if settings.mode.speculative:
            model = None if draft_info is None else _start_draft(settings, draft_info, cluster, stage_settings,
                                                                 dedicated_draft)
            ngram = None if settings.ngram is None else NgramDrafter(settings.ngram)
            draft = NgramFirstDraftClient(ngram, model) if ngram and model else model or LocalDraftClient(ngram)
        vocab = Vocab(info.path)
        executor = PipelineExecutor(cluster, stage_ranks, settings.timeout_s)
        shards = ShardSetup(len(written), cluster.files_sent, time.monotonic() - started)
        return Engine(settings, info, vocab, executor, cluster, stage_ranks, None, draft, backends, shards)

    # -- text ---------------------------------------------------------------------------------

    def encode(self, text: str, chat: bool = False, system: str | None = None, parse_special: bool = True) -> list[int]:
        """Tokens for a prompt: raw text, or one user turn rendered with the model's chat template."""
        if chat:
            return self.vocab.chat_tokens(([("system", system)] if system else []) + [("user", text)])
        return self.vocab.text_tokens(text, parse_special)

    @property
    def context_tokens(self) -> tuple[int, ...]:
        """The tokens whose KV entries every stage holds (the committed context)."""
        return self.context.tokens

    def reset_context(self) -> None:
        """Forget the committed context on every stage."""
        self.context.reset()

    def truncate_context(self, n_keep: int) -> None:
        """Keep only the first `n_keep` committed tokens on every stage."""
        self.context.truncate(n_keep)

    def kv_check(self, settle_s: float = 5.0) -> dict[int, int]:
        """Where each stage's committed KV sequence ends (rank -> last position), waiting up to
        `settle_s` for them all to end where the head's mirror does (len(context) - 1). The query is
        control, which reaches a later stage straight from the head and is answered first, while a
        request's last KV clean-up travels with the runs through the stages before it: ask again
        until it has arrived. What a soak test compares after every turn."""
        if self.cluster is None:
            assert self._local_stage is not None
            return {HEAD: self._local_stage.seq_pos_max(COMMITTED_SEQ)}
        expected = len(self.context_tokens) - 1
        deadline = time.monotonic() + settle_s
        while True:
            ends = {rank: self.cluster.kv_usage(rank, [COMMITTED_SEQ])[COMMITTED_SEQ][1] for rank in self.stage_ranks}
            if all(end == expected for end in ends.values()) or time.monotonic() > deadline:
                return ends
            time.sleep(0.05)

    def check_fits(self, n_prompt: int) -> int:
        """Raise if the prompt does not fit; return how many tokens may follow it in the context."""
        room = self.settings.n_ctx - len(self.context_tokens)
        if n_prompt >= room:
            raise UserError(f"the prompt has {n_prompt} tokens but the context has room for {room - 1} "
                            f"(--ctx-size {self.settings.n_ctx})")
        return room - n_prompt - 1

    # -- generation ---------------------------------------------------------------------------

    def generate(self, tokens: list[int], max_tokens: int, sampling: SamplingConfig,
                 on_token: Callable[[int], None] = lambda token: None,
                 should_stop: Callable[[], bool] = lambda: False,
                 keep_first_logits: bool = False, replay: Sequence[int] = ()) -> tuple[Generation, RunStats]:
        """Generate after the committed context with the mode's loop; the statistics are made the
        same way in every mode (the speculative loops add their counters).

        `replay`: the first tokens of this answer, decided by a job that failed (app/reshard.py).
        They are fed as that job fed them, not streamed again, and the answer goes on after them;
        the Generation holds them, the statistics only what this job decided.
        """
        if replay:
            return self._resume(tokens, list(replay), max_tokens, sampling, on_token, should_stop)
        return self._generate(tokens, max_tokens, sampling, on_token, should_stop, keep_first_logits)

    def _resume(self, prompt: list[int], replay: list[int], max_tokens: int, sampling: SamplingConfig,
                on_token: Callable[[int], None], should_stop: Callable[[], bool]) -> tuple[Generation, RunStats]:
        """Rebuild the stages' KV cache in the shapes the failed job built it (llama.cpp's sums depend
        on batch shapes): the prompt in the same chunks, then each decided token in a run of its own,
        the way the plain loop feeds them; then the rest of the answer, after the last one."""
        self.check_fits(len(prompt) + len(replay))
        self.decoder.prefill(prompt, want_logits=False)
        for token in replay[:-1]:
            self.decoder.launch_step(token, want_logits=False)
            self.executor.wait()
        rest = max_tokens - len(replay)
        if rest < 1:  # the failed job had decided every token: the last stays pending, as after any answer
            generation, stats = Generation((), (), 0.0, ()), None
        else:
            generation, stats = self._generate([replay[-1]], rest, sampling, on_token, should_stop, drawn=len(replay))
        whole = dataclasses.replace(generation, prompt_tokens=tuple(prompt), tokens=(*replay, *generation.tokens))
        return whole, stats or self._stats(generation, 0)

    def _generate(self, tokens: list[int], max_tokens: int, sampling: SamplingConfig,
                  on_token: Callable[[int], None], should_stop: Callable[[], bool],
                  keep_first_logits: bool = False, drawn: int = 0) -> tuple[Generation, RunStats]:
        max_tokens = min(max_tokens, self.check_fits(len(tokens)))  # generation never overruns the context
        if self.cluster is not None:
            self.cluster.reset_stats()
        bytes_before = self._head_bytes()
        decode_from: list[int] = []  # the head's bytes_sent when decoding started (the first token)
        user_on_token = on_token

        def on_token(token: int) -> None:
            if not decode_from:
                if self.cluster is not None:
                    self.cluster.mark_decode(self.stage_ranks)
                decode_from.append(self._head_bytes())
            user_on_token(token)

        counters = None
        if self.draft is None:
            generation = self.decoder.generate(tokens, max_tokens, sampling, self.vocab.is_end, on_token,
                                               should_stop, keep_first_logits, drawn)
        else:
            request = Request(tuple(tokens), max_tokens, sampling, self.vocab.is_end, on_token, should_stop, drawn)
            spec, n_batch, timeout_s = self.settings.speculation, self.settings.n_batch, self.settings.timeout_s
            if spec.mode == Mode.SPECULATIVE:
                generation, counters = speculative.generate(self.context, self.draft, spec, request, n_batch,
                                                            timeout_s)
            else:
                generation, counters = pipeinfer.generate(self.context, self.draft, spec, request, n_batch,
                                                          timeout_s, self.switch)
        head_decode = self._head_bytes() - decode_from[0] if decode_from else None
        return generation, self._stats(generation, self._head_bytes() - bytes_before, counters, head_decode)

    def _head_bytes(self) -> int:
        return self.cluster.transport.bytes_sent if self.cluster is not None else 0

    def _stats(self, generation: Generation, head_bytes: int, counters: SpecCounters | None = None,
               head_decode_bytes: int | None = None) -> RunStats:
        """The request's statistics; `counters` are a speculative loop's; `head_decode_bytes`, what the
        head sent after the first token (None: no token)."""
        if self.cluster is None:
            stages = (self._local_stage_stats(generation),)
            worker_bytes, worker_decode = 0, 0
        else:
            stages = self.cluster.stage_stats(self.stage_ranks)
            worker_bytes, worker_decode = self.cluster.worker_bytes_sent(), self.cluster.worker_decode_bytes_sent()
        decode_bytes = None if head_decode_bytes is None or worker_decode is None else head_decode_bytes + worker_decode
        times = generation.token_times_s
        return RunStats(mode=self.settings.mode, n_prompt=len(generation.prompt_tokens),
                        n_generated=len(generation.tokens), prefill_s=generation.prefill_s,
                        ttft_s=times[0] if times else 0.0, token_times_s=times,
                        bytes_sent=head_bytes + worker_bytes, decode_bytes_sent=decode_bytes, stages=stages,
                        head_peak_rss_bytes=peak_rss_bytes(),
                        **(counters.stats_fields() if counters is not None else {}))

    def _local_stage_stats(self, generation: Generation) -> StageStats:
        assert isinstance(self.executor, LocalExecutor)
        wall = generation.token_times_s[-1] if generation.token_times_s else generation.prefill_s
        compute = self.executor.compute_s
        self.executor.compute_s = 0.0
        return StageStats(rank=0, host=socket.gethostname(), layers=(0, self.info.n_layer),
                          compute_s=compute, wall_s=wall, peak_rss_bytes=peak_rss_bytes(),
                          prefill_tokens=len(generation.prompt_tokens))

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        if self._local_stage is not None:
            self._local_stage.close()
            self._local_stage = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # on an error the caller stops every rank at once (runner._stop_all): no goodbyes to wait for


def check_draft(target: ModelInfo, draft: ModelInfo) -> None:
    """Refuse a draft that cannot serve this target."""
    check_supported(draft)
    if draft.vocab_sha256 != target.vocab_sha256:
        sizes = (f"both {draft.n_vocab} tokens, but other token strings" if draft.n_vocab == target.n_vocab
                 else f"{draft.n_vocab} tokens against {target.n_vocab}")
        raise UserError(f"the draft {draft.path.name} has a different vocabulary from the target "
                        f"{target.path.name} ({sizes}): its token ids would mean other text")
    if draft.size_bytes > target.size_bytes:
        raise UserError(f"the draft {draft.path.name} ({draft.size_bytes / 1e6:.0f} MB) is larger than the "
                        f"target {target.path.name} ({target.size_bytes / 1e6:.0f} MB)")


def _start_draft(settings: EngineSettings, draft: ModelInfo, cluster: Cluster, stage_settings: StageSettings,
                 dedicated: bool) -> DraftClient:
    if dedicated:
        rank = cluster.transport.size - 1
        cluster.load_draft(rank, draft, stage_settings)
        return RemoteDraftClient(cluster.transport, rank)
    threads = settings.n_threads or 1
    stage = Stage(StageConfig(draft.path, True, True, settings.n_ctx, settings.n_batch, threads, 1,
                              settings.llama))
    return LocalDraftClient(Drafter(stage, settings.n_batch))


def _head_backend(cpu_variant: str | None) -> BackendReport:
    """Load the head's own CPU backend; a failure names this host like a worker's would."""
    try:
        return cpu_backend(cpu_variant)
    except NoUsableVariant as exc:
        raise NoUsableVariant(f"rank {HEAD} ({socket.gethostname()}): {exc}") from None


def _default_threads(stages_here: int) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // stages_here)


def _progress(verbose: bool, written: list[str]) -> Callable[[str], None]:
    """shard_model's progress: each shard written is noted in `written` (and said, when verbose)."""
    def note(text: str) -> None:
        written.append(text)
        if verbose:
            print(text, file=sys.stderr, flush=True)
    return note
