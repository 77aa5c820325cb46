"""The `pipeinfer-cpu` command: a thin layer over the library (engine, shards, launcher, bench)."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .errors import PipeinferError, UserError, exit_with_error, one_line_errors
from .hostfile import Host, parse_hostfile
from .transport import under_mpi

if TYPE_CHECKING:
    from .engine import EngineSettings


friendly_errors = one_line_errors(PipeinferError)


class _Commands(click.Group):
    """Adds `compress`, from the optional compress package, only when it is asked for (it imports torch)."""

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), "compress"})

    def get_command(self, ctx, name):
        if name != "compress":
            return super().get_command(ctx, name)
        try:
            from compress.cli import compress_group
        except ImportError as exc:
            return _compress_missing(str(exc))
        return compress_group


def _compress_missing(reason: str) -> click.Command:
    @click.command("compress", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def compress_missing():
        """Prune vision CNNs (needs: pip install 'pipeinfer-cpu[compress]')."""
        exit_with_error(f"compress needs its optional dependencies ({reason}): pip install 'pipeinfer-cpu[compress]'")
    return compress_missing


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeinfer-cpu")
def main() -> None:
    """Run a GGUF language model split layer-wise across the CPU machines of an MPI job."""


# -- shared options -----------------------------------------------------------------------------

def engine_options(command):
    """Add the options that say how the model runs; the command receives them as `setup: Setup`."""
    options = [
        click.option("--hostfile", type=click.Path(path_type=Path), help="Machines, one stage per line (MPICH/Open MPI syntax)."),
        click.option("--model", "-m", type=click.Path(path_type=Path), help="GGUF model (default: the embedded SmolLM2-135M-Instruct Q4_1)."),
        click.option("--mode", type=click.Choice(["single", "pipeline", "speculative", "pipeinfer"]),
                     default="pipeline", show_default=True),
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

    @functools.wraps(command)
    def wrapper(**kwargs):
        keys = ("hostfile", "model", "mode", "stages", "weights", "threads", "n_ctx", "n_batch", "timeout_s",
                "shard_dir", "draft", "draft_ranks", "draft_host", "draft_max", "max_inflight", "p_accept",
                "p_recovery", "p_decay", "p_split", "adaptive", "verbose", "cpu_variant")
        engine = {key: kwargs.pop(key) for key in keys}
        return command(setup=make_setup(debug=kwargs.pop("debug"), **engine), **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@dataclass(frozen=True)
class Setup:
    """Everything the engine options say: how the model runs and where."""

    settings: "EngineSettings"
    topology: "Topology"
    debug: bool

    def start_job(self, argv: list[str], stdin=None) -> int:
        """Outside MPI: check what can be checked here, then re-run `argv` as the MPI job."""
        import subprocess

        from .launcher import launch

        preflight(self.settings, self.topology)
        return launch(self.topology.placement, argv, self.debug, stdin if stdin is not None else subprocess.DEVNULL)


def make_setup(hostfile, model, mode, stages, weights, threads, n_ctx, n_batch, timeout_s, shard_dir, draft,
               draft_ranks, draft_host, draft_max, max_inflight, p_accept, p_recovery, p_decay, p_split, adaptive,
               verbose, debug, cpu_variant=None) -> Setup:
    topo = speculative_topology(hostfile, stages, weights, mode, draft, draft_ranks, draft_host)
    # Under the user's own `mpiexec -n N` with nothing said about stages, the stages are the ranks it
    # started (an equal split), not the one-host default topology.
    from .launcher import LAUNCHED_ENV

    own_mpiexec = under_mpi() and not os.environ.get(LAUNCHED_ENV)
    split = None if own_mpiexec and hostfile is None and stages is None and weights is None else topo.weights
    settings = engine_settings(model, mode, split, threads, n_ctx, n_batch, timeout_s, shard_dir, verbose,
                               draft, draft_ranks, draft_max, max_inflight, p_accept, p_recovery, p_decay, adaptive,
                               p_split)
    return Setup(dataclasses.replace(settings, cpu_variant=cpu_variant or None), topo, debug)


def sampling_options(command):
    """Add the sampling options; the command receives them as `sampling: SamplingConfig`."""
    options = [
        click.option("--temp", "temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off."),
        click.option("--seed", "-s", type=int, default=0, show_default=True),
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        from .sampling import SamplingConfig

        values = {key: kwargs.pop(key) for key in ("temperature", "top_k", "top_p", "seed")}
        try:
            sampling = SamplingConfig(**values)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return command(sampling=sampling, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


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


def topology(hostfile: Path | None, stages: int | None, weights: str | None, draft_host: str | None = None) -> Topology:
    from .planning import parse_weights

    hosts: tuple[Host, ...] = parse_hostfile(hostfile) if hostfile else (Host("localhost"),)
    n_stages = stages if stages is not None else len(hosts)
    if n_stages < 1:
        raise UserError(f"--stages must be at least 1, got {n_stages}")
    stage_hosts = tuple(hosts[i % len(hosts)].name for i in range(n_stages))
    if weights is not None:
        return Topology(stage_hosts, parse_weights(weights, n_stages), draft_host)
    return Topology(stage_hosts, tuple(hosts[i % len(hosts)].weight for i in range(n_stages)), draft_host)


def speculative_topology(hostfile, stages, weights, mode, draft, draft_ranks, draft_host) -> Topology:
    """The topology, with a dedicated draft rank (on --draft-host or the first host) when one is needed."""
    topo = topology(hostfile, stages, weights)
    if mode in ("speculative", "pipeinfer") and draft is not None and draft_ranks == "dedicated":
        return Topology(topo.stage_hosts, topo.weights, draft_host or topo.stage_hosts[0])
    return topo


def engine_settings(model, mode, weights, threads, n_ctx, n_batch, timeout_s, shard_dir, verbose, draft=None,
                    draft_ranks="dedicated", draft_max=8, max_inflight=4, p_accept=0.4, p_recovery=0.05,
                    p_decay=0.02, adaptive=True, p_split=1.0):
    from .engine import EngineSettings
    from .llamacpp import MAX_SEQUENCES
    from .specdecode import SpecSettings

    if threads < 0:
        raise UserError(f"--threads must be 0 (auto) or more, got {threads}")
    if draft_max < 1:
        raise UserError(f"--draft-max must be at least 1, got {draft_max}")
    if max_inflight < 1:
        raise UserError(f"--max-inflight must be at least 1, got {max_inflight}")
    if mode in ("speculative", "pipeinfer") and max_inflight * draft_max >= n_ctx // 2:
        raise UserError(f"--max-inflight {max_inflight} runs of --draft-max {draft_max} tokens do not fit "
                        f"beside a prompt in the context (--ctx-size {n_ctx})")
    for name, value in (("--p-accept", p_accept), ("--p-recovery", p_recovery), ("--p-decay", p_decay)):
        if not 0 <= value < 1:
            raise UserError(f"{name} must be in [0, 1), got {value}")
    if not 0 < p_split <= 1:
        raise UserError(f"--p-split must be in (0, 1] (1 turns draft token trees off), got {p_split}")
    spec = SpecSettings(mode, draft_max, max_inflight, p_accept, p_recovery, p_decay, adaptive, p_split)
    most = min(MAX_SEQUENCES, n_batch)
    if spec.kv_sequences > most:
        raise UserError(f"--max-inflight {max_inflight} runs with draft token trees need {spec.kv_sequences} KV "
                        f"sequences per stage; llama.cpp allows {most} here (at most {MAX_SEQUENCES}, and no more "
                        f"than --batch-size): lower --max-inflight or turn trees off with --p-split 1")
    return EngineSettings(model=model, mode=mode, weights=weights, n_threads=threads, n_ctx=n_ctx,
                          n_batch=n_batch, timeout_s=timeout_s, shard_dir=shard_dir, verbose=verbose,
                          draft=draft, draft_in_head=draft_ranks == "head", spec=spec)


def preflight(settings, topo: Topology) -> None:
    """Check what can be checked before any process starts: the model and the split."""
    from .models import check_supported, read_model_info, resolve_model
    from .planning import split_layers

    from .engine import check_draft

    info = read_model_info(resolve_model(settings.model))
    check_supported(info)
    if settings.draft is not None:
        check_draft(info, read_model_info(resolve_model(settings.draft)))
    if settings.mode != "single":
        split_layers(info.n_layer, topo.weights)


def read_prompts(prompt: str | None, prompt_file: Path | None, prompts_file: Path | None) -> tuple[str, ...]:
    """The prompt(s) to answer: --prompt, the whole of --prompt-file, or one per line of --prompts-file."""
    given = [x for x in (prompt, prompt_file, prompts_file) if x is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --prompt TEXT, --prompt-file FILE or --prompts-file FILE")
    if prompt is not None:
        return (prompt,)
    path = prompt_file or prompts_file
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if prompt_file is not None:
        return (text,)
    prompts = tuple(line for line in text.splitlines() if line.strip())
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


# -- run ------------------------------------------------------------------------------------------

@main.command()
@friendly_errors
@engine_options
@sampling_options
@click.option("--prompt", "-p", help="Prompt text.")
@click.option("--prompt-file", "-f", type=click.Path(path_type=Path), help="Read the prompt from a file.")
@click.option("--prompts-file", type=click.Path(path_type=Path), help="One prompt per line, each answered afresh.")
@click.option("--n-predict", "-n", "max_tokens", type=int, default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--chat-template/--raw", default=False, help="Wrap the prompt as a user turn in the model's chat template.")
@click.option("--system", help="System message (with --chat-template).")
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the statistics (and token ids) as JSON.")
@click.option("--save-logits", type=click.Path(path_type=Path), help="Save the logits of the last prompt token (.npy).")
def run(setup: Setup, sampling, prompt, prompt_file, prompts_file, max_tokens, chat_template, system, stats_json,
        save_logits):
    """Generate text from a prompt, streaming it to stdout."""
    from .runner import GenerateRequest, run_job

    if max_tokens < 1:
        raise UserError(f"-n must be at least 1, got {max_tokens}")
    prompts = read_prompts(prompt, prompt_file, prompts_file)
    request = GenerateRequest(prompts, max_tokens, sampling, chat_template, system, stats_json, save_logits)
    if under_mpi() or setup.settings.mode == "single":
        sys.exit(run_job(setup.settings, request, setup.debug))
    sys.exit(setup.start_job(sys.argv[1:]))


# -- shard ----------------------------------------------------------------------------------------

@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--stages", type=int, required=True)
@click.option("--weights", help="Comma-separated weights, one per stage.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--debug", is_flag=True)
@friendly_errors
def shard(model, stages, weights, out_dir, debug):
    """Write one GGUF per stage (contiguous layer ranges) and a manifest."""
    from .models import check_supported, read_model_info, resolve_model
    from .planning import parse_weights, split_layers
    from .shards import shard_model

    info = read_model_info(resolve_model(model))
    check_supported(info)
    ranges = split_layers(info.n_layer, parse_weights(weights, stages))
    plan = shard_model(info, ranges, out_dir=out_dir, progress=lambda text: click.echo(text, err=True))
    for s in plan.shards:
        click.echo(f"stage {s.index}: layers [{s.start}, {s.end})  {s.size_bytes / 1e6:.1f} MB  {s.path}")
    click.echo(f"manifest: {out_dir / 'manifest.json'}")


@main.command("cpu")
@click.option("--cpu-variant", envvar="PIPEINFER_CPU_VARIANT", help="Check this variant instead of choosing one.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--debug", is_flag=True)
@friendly_errors
def cpu(cpu_variant, as_json, debug):
    """Which llama.cpp CPU backend this machine runs, and why (run it on each node)."""
    import json

    from .llamacpp import LIB_DIR, cpu_backend
    from .cpubackend import installed_variants

    report = cpu_backend(cpu_variant or None)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
        return
    click.echo(report.summary())
    click.echo(f"installed variants: {' '.join(v.name for v in installed_variants(LIB_DIR)) or 'none (built in)'}")


# -- models ---------------------------------------------------------------------------------------

@main.group()
def models() -> None:
    """Models available on this machine."""


@models.command("list")
@click.option("--dir", "dirs", multiple=True, type=click.Path(path_type=Path), help="Also list GGUF files here.")
def models_list(dirs):
    """Show the embedded default model and any GGUF files in the given folders."""
    from .models import VERIFIED_ARCHITECTURES, list_local_models

    infos = list_local_models(tuple(dirs) + (Path("models"),))
    if not infos:
        click.echo("no models found", err=True)
        sys.exit(1)
    for info in infos:
        verified = "verified" if info.arch in VERIFIED_ARCHITECTURES else "unverified arch"
        click.echo(f"{info.name:32s} {info.arch:8s} {info.n_layer:4d} layers  {info.size_bytes / 1e6:8.1f} MB  "
                   f"{verified:15s} {info.path}")


@models.command("bench-pair")
@friendly_errors
@click.option("--cost-ratio", type=float, default=3.4, show_default=True, help="Target cost / draft cost.")
@click.option("--agreement", type=float, required=True, help="Wanted top-1 agreement of draft and target (0-1).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quant", type=click.Choice(["q4_0", "source"]), default="q4_0", show_default=True,
              help="q4_0: build on a pure Q4_0 copy of the model (llama.cpp has a batched CPU kernel for it); "
                   "source: on the model as shipped (Q4_1).")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--debug", is_flag=True)
def models_bench_pair(cost_ratio, agreement, seed, quant, out_dir, debug):
    """Build a SYNTHETIC target/draft pair of known cost ratio and agreement (for benchmarks only)."""
    from .benchpair import batched_source, build_bench_pair, check_request

    check_request(cost_ratio, agreement)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = batched_source(out_dir) if quant == "q4_0" else None
    pair = build_bench_pair(cost_ratio, agreement, out_dir, seed, source=source,
                            progress=lambda text: click.echo(text, err=True))
    click.echo(f"SYNTHETIC bench pair (not a real draft model):\n  target {pair.target} "
               f"({pair.n_extra_layers} extra zero-norm layers)\n  draft  {pair.draft} (norm noise sigma "
               f"{pair.sigma:.4f}, seed {pair.seed})\n  agreement measured {pair.agreement_measured:.3f} "
               f"(asked {pair.agreement_requested})")


# -- bench ----------------------------------------------------------------------------------------

BENCH_MODES = ("plain", "single", "pipeline", "speculative", "pipeinfer")


@main.command()
@friendly_errors
@click.option("--hostfile", type=click.Path(path_type=Path), default=Path("hosts/local.txt"), show_default=True)
@click.option("--model", "-m", type=click.Path(path_type=Path), help="Target (default: the embedded model).")
@click.option("--draft", type=click.Path(path_type=Path), help="Draft for speculative and pipeinfer.")
@click.option("--agreements", help="Sweep SYNTHETIC bench pairs of these top-1 agreements (e.g. 0.2,0.4,0.6,0.8) "
              "instead of --model/--draft.")
@click.option("--cost-ratio", type=float, default=3.4, show_default=True, help="Target/draft cost of the synthetic pairs.")
@click.option("--modes", default="plain,single,pipeline", show_default=True, help=f"Comma-separated from {', '.join(BENCH_MODES)}.")
@click.option("--stages", type=int, default=2, show_default=True, help="Target stages of the pipelined modes.")
@click.option("--threads", "-t", type=int, default=1, show_default=True, help="Threads per rank.")
@click.option("--n-predict", "-n", "n_tokens", type=int, default=64, show_default=True)
@click.option("--prompts-file", type=click.Path(path_type=Path), help="One prompt per line (default: four built-in).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--merge", "merge", multiple=True, type=click.Path(path_type=Path, exists=True),
              help="Instead of running: merge these bench.json reports (e.g. a sweep split over several runs).")
@click.option("--debug", is_flag=True)
def bench(hostfile, model, draft, agreements, cost_ratio, modes, stages, threads, n_tokens, prompts_file, out_dir,
          merge, debug):
    """Run the same prompts through several modes; write bench.json, bench.md (and bench.png for sweeps)."""
    from . import bench as B

    if merge:
        click.echo(B.merge_reports(list(merge), out_dir))
        return
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = set(wanted) - set(BENCH_MODES)
    if unknown:
        raise UserError(f"unknown benchmark modes: {', '.join(sorted(unknown))}")
    if {"speculative", "pipeinfer"} & set(wanted) and draft is None and agreements is None:
        raise UserError("speculative and pipeinfer need --draft or --agreements")
    prompts = read_prompts(None, None, prompts_file) if prompts_file else B.DEFAULT_PROMPTS
    config = B.BenchConfig(hostfile, tuple(wanted), stages, threads, n_tokens, prompts)
    if agreements is None:
        rows = B.run_modes(config, model, draft, label="")
        title = f"pipeinfer-cpu bench, {n_tokens} tokens x {len(prompts)} prompts"
        click.echo(B.write_report(out_dir, title, rows, {"machine": B.machine_description(), "n_tokens": n_tokens}))
        return
    levels = [float(a) for a in agreements.split(",")]
    click.echo(B.agreement_sweep(config, levels, cost_ratio, out_dir))


# -- chat -----------------------------------------------------------------------------------------

@main.command()
@friendly_errors
@engine_options
@sampling_options
@click.option("--system", help="System message for the conversation.")
@click.option("--transcript", type=click.Path(path_type=Path), help="Append every completed turn to this file (JSON lines).")
@click.option("--n-predict", "-n", "max_tokens", type=int, default=512, show_default=True, help="Longest answer, in tokens.")
@click.option("--serve", is_flag=True, hidden=True, help="Internal: the MPI job's head speaks JSON lines on stdio.")
def chat(setup: Setup, sampling, system, transcript, max_tokens, serve):
    """Talk to the model in the terminal; the cluster stays up between turns."""
    from .chatui import ChatOptions, run_chat

    if max_tokens < 1:
        raise UserError(f"-n must be at least 1, got {max_tokens}")
    sys.exit(run_chat(setup, ChatOptions(system, transcript, max_tokens, sampling), sys.argv[1:]))
