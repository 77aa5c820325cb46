"""Benchmarks: the same prompts through several modes, each as its own real job; JSON + markdown.

Speed is measured here, never asserted in tests. Every row says which command produced it.
"""

from __future__ import annotations

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

from .errors import UserError
from .shards import atomic_write_text
from .stats import markdown_table, write_json

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write a Python function that checks whether a number is prime.",
    "Once upon a time, in a small village by the sea,",
    "Explain in two sentences why the sky is blue.",
)


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
