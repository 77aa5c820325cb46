"""The same installed files at several CPU backend levels on one machine: equal outputs, and speed.

    python scripts/cpu_variants.py --out DIR [--model M] [--configs auto,haswell,native=/path/to/lib]
        [--rounds 3] [--threads T] [-n 64] [--hostfile hosts/local.txt] [--check]

A config is `auto` (each rank's best variant), a variant name (forced with PIPEINFER_CPU_VARIANT), or
`NAME=DIR`: llama.cpp's libraries from DIR (LLAMA_CPP_LIB_PATH), e.g. a -march=native build of the
same sdist. `--check`: per config, greedy pipeline output (2 and 3 stages) must equal `single`'s token
for token with bit-identical first logits. Speed: `pipeinfer-cpu bench --modes plain,single` per
config, interleaved (round 1 of every config, then round 2, ...), medians of decode tok/s.
Writes DIR/cpu-variants.json and DIR/cpu-variants.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeinfer_cpu.files import atomic_write_text
from pipeinfer_cpu.stats import markdown_table

PROMPT = "The capital of France is"


def config_env(config: str) -> dict[str, str]:
    name, _, lib = config.partition("=")
    env = dict(os.environ, PIPEINFER_CPU_VARIANT="" if name == "auto" or lib else name)
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    return env


def cli(config: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeinfer_cpu", *args], capture_output=True, text=True,
                          env=config_env(config), timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"{config}: pipeinfer-cpu {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done


def check(config: str, model: list[str], hostfile: str, out: Path) -> dict:
    runs = {}
    for mode, stages in (("single", 1), ("pipeline", 2), ("pipeline", 3)):
        stats, logits = out / f"{mode}{stages}.json", out / f"{mode}{stages}.npy"
        cli(config, "run", "--hostfile", hostfile, *model, "--mode", mode, "--stages", str(stages), "-p", PROMPT,
            "-n", "64", "--stats-json", str(stats), "--save-logits", str(logits))
        runs[(mode, stages)] = (json.loads(stats.read_text()), np.load(logits))
    single_stats, single_logits = runs[("single", 1)]
    return {str(stages): {"tokens_equal": stats["tokens"] == single_stats["tokens"],
                          "logits_bit_identical": bool(np.array_equal(logits, single_logits)),
                          "variants": sorted({b["variant"] for b in stats["cpu_backends"]})}
            for (mode, stages), (stats, logits) in runs.items() if mode == "pipeline"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model")
    parser.add_argument("--configs", default="auto,haswell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", "-t", type=int, default=1)
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--hostfile", default="hosts/local.txt")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    model = ["--model", args.model] if args.model else []
    report: dict = {"model": args.model or "default (SmolLM2-135M-Instruct Q4_1)", "threads": args.threads,
                    "n_tokens": args.n, "rounds": args.rounds, "configs": {}}
    for config in configs:
        backend = json.loads(cli(config, "cpu", "--json").stdout)
        report["configs"][config] = {"backend": backend}
        if args.check:
            folder = args.out / "check" / config.partition("=")[0]
            folder.mkdir(parents=True, exist_ok=True)
            report["configs"][config]["check"] = check(config, model, args.hostfile, folder)
    speeds: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    for round_ in range(args.rounds):
        for config in configs:
            folder = args.out / f"round{round_}-{config.partition('=')[0]}"
            cli(config, "bench", "--modes", "plain,single", *model, "-t", str(args.threads), "-n", str(args.n),
                "--out", str(folder))
            for row in json.loads((folder / "bench.json").read_text())["modes"]:
                speeds[config].setdefault(row["label"], []).append(row["summary"]["decode_tok_s"])
    rows = []
    for config in configs:
        report["configs"][config]["decode_tok_s"] = speeds[config]
        medians = {mode: statistics.median(values) for mode, values in speeds[config].items()}
        report["configs"][config]["median_decode_tok_s"] = medians
        rows.append({"config": config.partition("=")[0], "variant": report["configs"][config]["backend"]["variant"],
                     **{f"{mode} tok/s (median of {args.rounds})": round(v, 1) for mode, v in medians.items()}})
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "cpu-variants.json", json.dumps(report, indent=1))
    table = markdown_table(rows, list(rows[0]))
    cpu = report["configs"][configs[0]]["backend"]["cpu"]
    atomic_write_text(args.out / "cpu-variants.md", f"{cpu}, {args.threads} thread(s), {report['model']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
