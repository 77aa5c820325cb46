"""`pipeinfer-cpu plan`: predict decode speed per mode from calibrated (or given) costs, and
`plan project`: a PROJECTION for a large model on N nodes from memory bandwidth alone."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeinfer_cpu.errors import PipeinferError, UserError, one_line_errors
from pipeinfer_cpu.llama.settings import WIRE_DTYPES
from pipeinfer_cpu.plan.inputs import ModelInputs, link_text, parse_bytes, parse_bytes_per_s, parse_link

friendly_errors = one_line_errors(PipeinferError)
MODE_NAMES = ("pipeline", "speculative", "pipeinfer")


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown or not modes:
        raise UserError(f"--modes takes some of {', '.join(MODE_NAMES)}, got {text!r}")
    return modes


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{name} takes comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{name} takes whole numbers of at least 1, got {text!r}")
    return values


@click.group("plan", invoke_without_command=True)
@click.option("--calibration", type=click.Path(path_type=Path), help="Timings from `hosts calibrate`.")
@click.option("--hosts", "host_names", help="With --calibration: the host of each stage, comma-separated (default: its hosts in order).")
@click.option("--split", type=click.Choice(["equal", "speed"]), default="equal", show_default=True,
              help="With --calibration: layers split equally, or by each host's speed.")
@click.option("--layer-ms", type=float, help="Instead of --calibration: one layer's time for one token, ms.")
@click.option("--output-ms", type=float, default=0.0, show_default=True, help="With --layer-ms: the output layer's time for one token, ms.")
@click.option("--layers", type=int, help="With --layer-ms: the model's layers.")
@click.option("--extra-token-cost", type=float, default=0.25, show_default=True,
              help="With --layer-ms: what each further token of a run adds, as a fraction of a one-token run (1: compute-bound).")
@click.option("--model", "-m", "model", type=click.Path(path_type=Path), help="Read n_embd, n_vocab and the layers from this GGUF.")
@click.option("--n-embd", type=int, help="Hidden size (bytes per token between stages = n_embd x the wire dtype's bytes).")
@click.option("--n-vocab", type=int, help="Vocabulary size.")
@click.option("--stages", type=int, help="Target stages.")
@click.option("--link", default="bw=1gbit,delay=0.1ms", show_default=True, help="Every hop between ranks: bw=RATE,delay=TIME (`local`: free).")
@click.option("--head-remote", is_flag=True, help="The head is on a host of its own (default: beside stage 0, a free hop).")
@click.option("--draft-link", help="Head <-> draft rank (default: --link).")
@click.option("--wire-dtype", type=click.Choice(WIRE_DTYPES), default="f32", show_default=True)
@click.option("--acceptance", type=float, default=0.6, show_default=True, help="Probability that the target agrees with a draft token.")
@click.option("--draft-ms", type=float, default=0.0, show_default=True, help="Draft time per drafted token, ms.")
@click.option("--draft-call-ms", type=float, default=0.0, show_default=True, help="Draft time per request on top, ms.")
@click.option("--head-ms", type=float, default=0.1, show_default=True, help="Head time per run (sending it, taking its result), ms.")
@click.option("--draft-max", type=int, default=8, show_default=True)
@click.option("--max-inflight", type=int, default=4, show_default=True)
@click.option("--modes", default=",".join(MODE_NAMES), show_default=True)
@click.option("-n", "n_tokens", type=int, default=256, show_default=True, help="Tokens per simulated request.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which draft tokens are right.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--debug", is_flag=True)
@click.pass_context
@friendly_errors
def plan(ctx, calibration, host_names, split, layer_ms, output_ms, layers, extra_token_cost, model, n_embd, n_vocab,
         stages, link, head_remote, draft_link, wire_dtype, acceptance, draft_ms, draft_call_ms, head_ms, draft_max,
         max_inflight, modes, n_tokens, seed, as_json, debug):
    """Predict decode tokens/s of each mode, and the bottleneck, with the head's own scheduler on a
    simulated pipeline (a model: check it against `bench`)."""
    if ctx.invoked_subcommand is not None:
        return
    from pipeinfer_cpu.head.specdecode import SpecSettings
    from pipeinfer_cpu.plan.predict import predict

    wanted = _modes(modes)
    if stages is None or stages < 1:
        raise UserError("give --stages (at least 1)")
    if model is not None:
        from pipeinfer_cpu.modelfiles.models import read_model_info
        from pipeinfer_cpu.modelfiles.registry import resolve_model

        info = read_model_info(resolve_model(model))
        n_embd, n_vocab, layers = n_embd or info.n_embd, n_vocab or info.n_vocab, layers or info.n_layer
    if n_embd is None or n_vocab is None:
        raise UserError("give --model, or --n-embd and --n-vocab")
    the_link = parse_link(link)
    rest = dict(acceptance=acceptance, draft_token_s=draft_ms / 1e3, draft_call_s=draft_call_ms / 1e3,
                draft_link=parse_link(draft_link) if draft_link else the_link, head_send_s=head_ms / 2e3,
                head_receive_s=head_ms / 2e3, wire_dtype=wire_dtype)
    if calibration is not None:
        from pipeinfer_cpu.timings import load_calibration

        hosts = [h.strip() for h in host_names.split(",")] if host_names else None
        inputs = ModelInputs.from_calibration(load_calibration(calibration), stages, the_link, n_embd, n_vocab,
                                              hosts, split, head_local=not head_remote, **rest)
    elif layer_ms is not None and layers is not None:
        inputs = ModelInputs.uniform(layers, stages, layer_ms / 1e3, output_ms / 1e3, the_link, n_embd, n_vocab,
                                     extra_token_cost, head_local=not head_remote, **rest)
    else:
        raise UserError("give --calibration FILE, or --layer-ms with --layers (or --model)")
    results = []
    for mode in wanted:
        spec = None if mode == "pipeline" else SpecSettings(mode, draft_max=draft_max, max_inflight=max_inflight)
        results.append(predict(inputs, mode, n_tokens=n_tokens, spec=spec, seed=seed))
    if as_json:
        click.echo(json.dumps({"kind": "prediction (performance model)", "inputs": _inputs_json(inputs),
                               "predictions": [p.to_json() for p in results]}, indent=1))
        return
    layers_text = "+".join(str(s.layers) for s in inputs.stages)
    click.echo(f"PREDICTION (performance model, not measured): {len(inputs.stages)} stages ({layers_text} layers), "
               f"link {link_text(the_link)}, wire {wire_dtype}, acceptance {acceptance:g}, draft {draft_ms:g} ms/token")
    click.echo(f"{'mode':<12} {'tok/s':>9} {'ITL ms mean/p50/p95':>22} {'accept':>7}  bottleneck; time by kind")
    for p in results:
        itl = f"{p.itl_mean_s * 1e3:.1f}/{p.itl_p50_s * 1e3:.1f}/{p.itl_p95_s * 1e3:.1f}"
        accept = "-" if p.acceptance is None else f"{p.acceptance:.2f}"
        shares = ", ".join(f"{kind} {share:.0%}" for kind, share in p.shares().items())
        state = "saturated" if p.saturated else "latency-bound"
        click.echo(f"{p.mode:<12} {p.tokens_per_s:>9.2f} {itl:>22} {accept:>7}  "
                   f"{p.bottleneck} ({p.occupancy[p.bottleneck]:.0%} busy, {state}); {shares}")


def _inputs_json(inputs: ModelInputs) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(inputs), default=str))


@plan.command("project")
@click.option("--params", default="70b", show_default=True, help="The target: 70b, 8b or 1b (Q4_K_M shapes).")
@click.option("--draft-params", default="1b", show_default=True, help="The draft of the speculative modes.")
@click.option("--nodes", default="2,4,8", show_default=True, help="Node counts, comma-separated.")
@click.option("--cores", type=int, default=16, show_default=True, help="Cores per node.")
@click.option("--mem-bw", default="40GB/s", show_default=True,
              help="EFFECTIVE memory bandwidth per node that decoding reaches (about 60-70%% of STREAM).")
@click.option("--mem", "mem_size", default="64GB", show_default=True, help="Memory per node.")
@click.option("--core-gflops", type=float, default=30.0, show_default=True, help="Quantised matmul GFLOP/s per core (batch compute roofline).")
@click.option("--link", "links", multiple=True, default=("1gbit", "100mbit"), show_default=True,
              help="Links to compare: bare rates, comma-separated, or one bw=...,delay=... per --link.")
@click.option("--delay", default="0.1ms", show_default=True, help="One-way delay of the bare-rate links.")
@click.option("--acceptance", type=float, default=0.6, show_default=True)
@click.option("--wire-dtype", type=click.Choice(WIRE_DTYPES), default="f32", show_default=True)
@click.option("--modes", default=",".join(MODE_NAMES), show_default=True)
@click.option("-n", "n_tokens", type=int, default=128, show_default=True, help="Tokens per simulated request.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Write projection.{json,md,png} here.")
@click.option("--debug", is_flag=True)
@friendly_errors
def plan_project(params, draft_params, nodes, cores, mem_bw, mem_size, core_gflops, links, delay, acceptance,
                 wire_dtype, modes, n_tokens, out_dir, debug):
    """A PROJECTION for a model on N alike nodes: per-layer time from memory bandwidth (decode on CPU
    is memory-bound), then the best number of stages per mode, its tokens/s and bottleneck."""
    from pipeinfer_cpu.plan.projection import PRESETS, Node, project, write_report

    if params not in PRESETS or draft_params not in PRESETS:
        raise UserError(f"--params and --draft-params take one of {', '.join(PRESETS)}")
    if cores < 1 or core_gflops <= 0:
        raise UserError("--cores and --core-gflops must be above 0")
    specs = []
    for text in links:
        specs += [text] if "=" in text else [f"bw={rate.strip()},delay={delay}" for rate in text.split(",") if rate.strip()]
    node = Node(cores, parse_bytes_per_s(mem_bw), parse_bytes(mem_size), core_gflops * 1e9)
    rows = project(PRESETS[params], node, _ints(nodes, "--nodes"), [parse_link(s) for s in specs],
                   PRESETS[draft_params], acceptance, _modes(modes), n_tokens, wire_dtype)
    paths = write_report(rows, PRESETS[params], node, PRESETS[draft_params], acceptance, out_dir)
    click.echo(paths[1].read_text(), nl=False)
    click.echo("wrote " + ", ".join(str(p) for p in paths))
