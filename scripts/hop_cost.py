"""What a hop between ranks costs in software, and what splitting costs end to end.

1. hop: a 4-stage `pipeline` on a SYNTHETIC tiny model (4 layers of width 64, 2,048-token vocabulary),
   whose stages compute for a few tens of microseconds, so the inter-token latency is almost all hops:
   per hop = (ITL mean - sum over stages of their compute per run) / (stages + 1)   [head -> 1 -> ... -> head]
   with each stage's compute per run from the run's statistics (the prompt is 4 tokens, so the prefill
   run hardly counts). Also the idle ranks' CPU use (cores' worth while waiting).
2. split (with --model): `single` against `pipeline --stages 4` on that model, decode tok/s and ITL, and
   the pipeline's compute per token (its stages' compute per run, summed): what its ITL would be if hops
   were free, against single's ITL, is what splitting the model costs in llama.cpp itself.

Each measurement is repeated --rounds times (interleaved) and the median reported. Writes OUT/hop.json
and OUT/hop.md. Run from the project's root with the tree to measure on PYTHONPATH, e.g.
    PYTHONPATH=. python scripts/hop_cost.py --out /tmp/hop-new [--model M.gguf] [--label new]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "the a of and"
THREADS = "1"


def tiny_model(folder: Path) -> Path:
    from pipeinfer_cpu.modelfiles.tinymodel import VARIED, write_tiny_llama
    from dataclasses import replace

    path = folder / "tiny-hop.gguf"
    if not path.exists():
        write_tiny_llama(path, replace(VARIED, n_vocab=2048, n_layer=4), seed=0)
    return path


def run(model: Path, mode: str, stages: int, n_tokens: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        hosts = Path(tmp) / "hosts"
        hosts.write_text("localhost\n" * stages)
        command = [sys.executable, "-m", "pipeinfer_cpu", "run", "--hostfile", str(hosts), "--model", str(model),
                   "--mode", mode, "--stages", str(stages), "-t", THREADS, "-n", str(n_tokens), "--raw",
                   "-p", PROMPT, "--stats-json", str(stats), *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-2000:]}")
        record = json.loads(stats.read_text())
    return record | {"command": " ".join(command[3:])}


def compute_per_run_s(record: dict) -> float:
    """The stages' compute for one run, summed over the stages."""
    return sum(s["compute_s"] / s["runs_computed"] for s in record["stages"] if s["runs_computed"])


def hop_time_s(record: dict) -> float:
    n_stages = sum(1 for s in record["stages"] if s["runs_computed"])
    return (record["itl_mean_s"] - compute_per_run_s(record)) / (n_stages + 1)


def idle_cpu(record: dict) -> float:
    fractions = [s["idle_cpu_s"] / s["idle_wall_s"] for s in record["stages"] if s["idle_wall_s"] > 0]
    return max(fractions) if fractions else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="also compare single with a 4-stage pipeline on this model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--label", default=os.environ.get("HOP_LABEL", "tree"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = tiny_model(args.out)
    rows: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        rows.setdefault("hop", []).append(run(tiny, "pipeline", args.stages, args.n, []))
        if args.model:
            rows.setdefault("single", []).append(run(args.model, "single", 1, args.n, []))
            rows.setdefault("pipeline", []).append(run(args.model, "pipeline", args.stages, args.n, []))
    median = statistics.median
    summary = {
        "label": args.label, "machine": f"{os.cpu_count()} cores, {platform.machine()}", "rounds": args.rounds,
        "per_hop_ms": median(hop_time_s(r) for r in rows["hop"]) * 1e3,
        "tiny_itl_ms": median(r["itl_mean_s"] for r in rows["hop"]) * 1e3,
        "idle_rank_cpu": median(idle_cpu(r) for r in rows["hop"]),
        "commands": {k: v[0]["command"] for k, v in rows.items()},
    }
    for mode in ("single", "pipeline"):
        if mode in rows:
            summary[f"{mode}_tok_s"] = median(r["decode_tokens_per_s"] for r in rows[mode])
            summary[f"{mode}_itl_ms"] = median(r["itl_mean_s"] for r in rows[mode]) * 1e3
            summary[f"{mode}_idle_rank_cpu"] = median(idle_cpu(r) for r in rows[mode])
    if "pipeline" in rows:  # the ITL a pipeline would have with free hops: its stages' compute
        summary["pipeline_compute_ms"] = median(compute_per_run_s(r) for r in rows["pipeline"]) * 1e3
    (args.out / "hop.json").write_text(json.dumps(summary, indent=1) + "\n")
    shown = {k: v for k, v in summary.items() if k != "commands"}
    table = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
             "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in shown.values()) + " |"]
    commands = [f"- {k}: `pipeinfer-cpu {v}`" for k, v in summary["commands"].items()]
    (args.out / "hop.md").write_text("\n".join(table + ["", *commands]) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
