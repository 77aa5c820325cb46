"""Benchmarks: the same prompts through several modes, each as its own real job; JSON + markdown.

Speed is measured here, never asserted in tests. Every row says which command produced it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from pipeinfer_cpu.app.prompts import escape
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_write_text
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.ngram import NgramSettings
from pipeinfer_cpu.stats import markdown_table, write_json

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write a Python function that checks whether a number is prime.",
    "Once upon a time, in a small village by the sea,",
    "Explain in two sentences why the sky is blue.",
)


@dataclass(frozen=True)
class BenchConfig:
    """What every benchmark row shares: hosts, modes, split, threads, prompts."""

    hostfile: Path
    modes: tuple[str, ...]
    stages: int
    threads: int
    n_tokens: int
    prompts: tuple[str, ...]
    draft_max: int | None = None  # speculative modes' --draft-max (None: run's default)
    wire_dtype: str = "f32"  # the pipelined modes' --wire-dtype
    link: str | None = None  # the pipelined modes' --link (emulated links between their ranks)
    chat_template: bool = False  # each prompt a user turn in the model's chat template (the prompt sets)


@dataclass(frozen=True)
class ModeSpec:
    """One benchmark row: a label and the `pipeinfer-cpu run` arguments that define it."""

    label: str
    args: tuple[str, ...]


def run_mode(spec: ModeSpec, prompts_file: Path, n_tokens: int, common: tuple[str, ...], timeout_s: float) -> dict:
    """Run one mode over all prompts in one job; return its per-prompt statistics and the command."""
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        command = ["pipeinfer-cpu", "run", *common, *spec.args, "--prompts-file", str(prompts_file),
                   "-n", str(n_tokens), "--stats-json", str(stats_path)]
        done = subprocess.run([sys.executable, "-m", "pipeinfer_cpu", *command[1:]], capture_output=True,
                              text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise UserError(f"benchmark mode {spec.label} failed: {done.stderr.strip().splitlines()[-1:]}")
        data = json.loads(stats_path.read_text())
    runs = data["runs"] if "runs" in data else [data]
    shown = ["pipeinfer-cpu", "run", *common, *spec.args, "--prompts-file", "PROMPTS", "-n", str(n_tokens)]
    return {"label": spec.label, "command": " ".join(shown), "runs": runs, "summary": summarize(runs)}


def mode_spec(mode: str, config: BenchConfig, draft: Path | None = None) -> ModeSpec:
    threads = ("-t", str(config.threads))
    if mode == "single":
        return ModeSpec(f"single ({config.threads} thread{'s' if config.threads > 1 else ''})",
                        ("--mode", "single", *threads))
    wire = () if config.wire_dtype == "f32" else ("--wire-dtype", config.wire_dtype)
    stages = ("--stages", str(config.stages), *wire)
    label = f"{mode} ({config.stages} target stage{'s' if config.stages > 1 else ''}"
    label += f", {config.wire_dtype} wire" if wire else ""
    if config.link is not None:
        stages += ("--link", config.link)
        label += f", link {config.link}"
    if mode == "pipeline":
        return ModeSpec(label + ")", ("--mode", "pipeline", *stages, *threads))
    draft_max = ("--draft-max", str(config.draft_max)) if config.draft_max else ()
    ngram, model = NgramSettings.split(str(draft)) if draft is not None and NgramSettings.is_spec(str(draft)) else (None, draft)
    drafting = " + n-gram draft" * (ngram is not None) + " + 1 draft rank" * (model is not None) + ")"
    return ModeSpec(label + drafting, ("--mode", mode, *stages, *threads, *draft_max))


def run_modes(config: BenchConfig, model: Path | None, draft: Path | None, label: str) -> list[dict]:
    """One row per mode, each its own job, on the same prompts, split and seed."""
    common = ("--hostfile", str(config.hostfile)) + (("--model", str(model)) if model else ())
    common += ("--chat-template",) if config.chat_template else ()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.txt"
        prompts_file.write_text("".join(escape(prompt) + "\n" for prompt in config.prompts))
        for mode in config.modes:
            print(f"bench: {label}{mode} ...", file=sys.stderr, flush=True)
            if mode == "plain":
                rows.append(plain_row(model, config))
                continue
            extra = ("--draft", str(draft)) if Mode(mode).speculative else ()
            spec = mode_spec(mode, config, draft)
            rows.append(run_mode(ModeSpec(label + spec.label, spec.args + extra), prompts_file, config.n_tokens,
                                 common, timeout_s=1800))
    return rows


def run_prompt_sets(config: BenchConfig, sets: dict[str, tuple[str, ...]], model: Path | None,
                    draft: Path | None) -> list[dict]:
    """`run_modes` on each prompt set (chat template on), the rows labelled `[set] mode` and tagged with it."""
    rows = []
    for name, prompts in sets.items():
        set_config = dataclasses.replace(config, prompts=prompts, chat_template=True)
        rows += [{**row, "prompt_set": name} for row in run_modes(set_config, model, draft, f"[{name}] ")]
    return rows


def plain_row(model: Path | None, config: BenchConfig) -> dict:
    """A bare llama-cpp-python greedy loop on the same model and threads: the yardstick for `single`."""
    from pipeinfer_cpu.llama.runtime import Vocab, plain_greedy_tokens_per_s
    from pipeinfer_cpu.modelfiles.registry import resolve_model

    path = resolve_model(model)
    vocab = Vocab(path)
    try:
        prompts = [vocab.tokenize(p) for p in config.prompts]
    finally:
        vocab.close()
    speeds = [plain_greedy_tokens_per_s(path, prompt, config.n_tokens, config.threads) for prompt in prompts]
    command = f"llama_cpp.Llama(n_threads={config.threads}).eval() + argmax loop (llama.runtime.plain_greedy_tokens_per_s)"
    return {"label": f"plain llama-cpp-python ({config.threads} thread)", "command": command, "runs": [],
            "summary": {"decode_tok_s": mean(speeds), "tokens": config.n_tokens * len(config.prompts)}}


def agreement_sweep(config: BenchConfig, levels: list[float], cost_ratio: float, out_dir: Path) -> str:
    """Build a SYNTHETIC bench pair per agreement level and benchmark every mode on it."""
    from pipeinfer_cpu.app.benchpair import batched_source, build_bench_pair, check_request

    for level in levels:
        check_request(cost_ratio, level)
    rows, pairs = [], []
    (out_dir / "pairs").mkdir(parents=True, exist_ok=True)
    source = batched_source(out_dir / "pairs")
    for level in levels:
        pair = build_bench_pair(cost_ratio, level, out_dir / "pairs" / f"a{level:.2f}-r{cost_ratio:.2f}",
                                source=source, progress=lambda text: print(text, file=sys.stderr, flush=True))
        pairs.append({"agreement_requested": level, "agreement_measured": pair.agreement_measured,
                      "sigma": pair.sigma, "n_extra_layers": pair.n_extra_layers, "target": str(pair.target),
                      "draft": str(pair.draft)})
        label = f"[synthetic pair, agreement {pair.agreement_measured:.2f}] "
        for row in run_modes(config, pair.target, pair.draft, label):
            rows.append({**row, "agreement": pair.agreement_measured})
    title = (f"pipeinfer-cpu bench, SYNTHETIC bench pairs (cost ratio {cost_ratio}), "
             f"{config.n_tokens} tokens x {len(config.prompts)} prompts")
    extra = {"machine": machine_description(), "n_tokens": config.n_tokens, "pairs": pairs}
    markdown = write_report(out_dir, title, rows, extra)
    plot_sweep(rows, out_dir / "bench.png", title)
    return markdown


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    """Tokens/s and mean ITL per mode against the measured agreement of each synthetic pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in sorted({r["label"].split("] ", 1)[-1] for r in rows}):
        points = sorted(((r["agreement"], r["summary"]) for r in rows if r["label"].endswith("] " + mode)),
                        key=lambda point: point[0])
        xs = [a for a, _ in points]
        speed.plot(xs, [s["decode_tok_s"] for _, s in points], marker="o", label=mode)
        latency.plot(xs, [s.get("itl_mean_ms") for _, s in points], marker="o", label=mode)
    speed.set(xlabel="draft top-1 agreement (synthetic pair)", ylabel="decode tokens/s")
    latency.set(xlabel="draft top-1 agreement (synthetic pair)", ylabel="mean inter-token latency (ms)")
    speed.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        figure.savefig(Path(tmp) / path.name, dpi=110)
        os.replace(Path(tmp) / path.name, path)
    plt.close(figure)


def summarize(runs: list[dict]) -> dict:
    """Means over prompts of the per-prompt figures."""
    def avg(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return mean(values) if values else None

    stages = [s for r in runs for s in r["stages"]]
    idle_cpu = [s["idle_cpu_fraction"] for s in stages if s.get("idle_cpu_fraction") is not None]
    return {
        "decode_tok_s": avg("decode_tokens_per_s"), "itl_mean_ms": _ms(avg("itl_mean_s")),
        "itl_p50_ms": _ms(avg("itl_p50_s")), "itl_p95_ms": _ms(avg("itl_p95_s")), "ttft_ms": _ms(avg("ttft_s")),
        "acceptance": avg("acceptance_rate"), "bytes_per_token": avg("bytes_per_token"),
        "decode_bytes_per_token": avg("decode_bytes_per_token"),
        "idle_cpu_max": max(idle_cpu) if idle_cpu else None,
        "peak_rss_mb": max(s["peak_rss_bytes"] for s in stages) / 1e6 if stages else None,
        "tokens": sum(r["n_generated"] for r in runs),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def machine_description() -> str:
    return f"{socket.gethostname()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, {platform.system()}"


def write_report(out_dir: Path, title: str, rows: list[dict], extra: dict) -> str:
    """Write bench.json and bench.md under out_dir; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["mode", "decode tok/s", "ITL mean ms", "ITL p50 ms", "ITL p95 ms", "TTFT ms", "accept",
               "idle-rank CPU", "peak RSS MB", "bytes/token"]
    keys = {"decode tok/s": "decode_tok_s", "ITL mean ms": "itl_mean_ms", "ITL p50 ms": "itl_p50_ms",
            "ITL p95 ms": "itl_p95_ms", "TTFT ms": "ttft_ms", "accept": "acceptance",
            "idle-rank CPU": "idle_cpu_max", "peak RSS MB": "peak_rss_mb", "bytes/token": "bytes_per_token"}
    table_rows = [{"mode": r["label"], **{column: r["summary"].get(key) for column, key in keys.items()}}
                  for r in rows]
    table = markdown_table(table_rows, columns)
    commands = "\n".join(f"- {r['label']}: `{r['command']}`" for r in rows)
    markdown = f"## {title}\n\n{extra.get('machine', '')}\n\n{table}\n\nCommands:\n{commands}\n"
    write_json({"title": title, **extra, "modes": rows}, out_dir / "bench.json")
    atomic_write_text(out_dir / "bench.md", markdown)
    return markdown


def merge_reports(paths: list[Path], out_dir: Path) -> str:
    """One report (and plot) from several sweep reports of the same machine, e.g. split runs."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows = sorted((row for report in reports for row in report["modes"]), key=lambda r: r.get("agreement", 0))
    extra = {key: reports[0][key] for key in ("machine", "n_tokens") if key in reports[0]}
    extra["pairs"] = [pair for report in reports for pair in report.get("pairs", [])]
    extra["merged_from"] = [str(p) for p in paths]
    title = reports[0]["title"]
    markdown = write_report(out_dir, title, rows, extra)
    if all("agreement" in row for row in rows):
        plot_sweep(rows, out_dir / "bench.png", title)
    return markdown
