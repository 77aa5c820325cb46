"""What the HTTP layer of `pipeinfer-cpu serve` costs: the same requests through the server (streamed chat
completions, the real `openai` client) and through `pipeinfer-cpu run --chat-template`, interleaved,
--rounds each, medians.

Per request three numbers of decode speed (tokens after the first / the time between the first and the
last):
  run      the head's own statistics of `pipeinfer-cpu run` (no HTTP, no JSON lines to a front end)
  engine   the server's engine-side statistics of the same request (`timings` in the last chunk)
  client   what the HTTP client saw: chunk arrival times, SSE and JSON lines included
HTTP cost = 1 - client / run (the issue's comparison: the same requests, two ways), and 1 - client /
engine (the same request seen from both ends: no run-to-run noise). The texts must be equal (greedy).
Writes OUT/serve.json and OUT/serve.md. Run from the project's root, e.g.
    python scripts/serve_overhead.py --out bench-results/local-2core/serve -- --hostfile hosts/local.txt --stages 2
(the arguments after -- are engine options, given to both `serve` and `run`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

from pipeinfer_cpu.app.bench import DEFAULT_PROMPTS
from pipeinfer_cpu.stats import markdown_table


def start_server(engine_args: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "pipeinfer_cpu", "serve", "--port", "0", *engine_args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        sys.stderr.write(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            threading.Thread(target=lambda: [sys.stderr.write(rest) for rest in process.stderr], daemon=True).start()
            return process, found.group(1)
    raise SystemExit("the server did not start")


def via_server(client: openai.OpenAI, prompt: str, n_tokens: int) -> dict:
    times, pieces, final = [], [], None
    for chunk in client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=n_tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            pieces.append(chunk.choices[0].delta.content)
        final = chunk
    timings = final.model_extra["timings"]
    return {"text": "".join(pieces), "client_tok_s": (len(times) - 1) / (times[-1] - times[0]),
            "engine_tok_s": timings["predicted_per_second"], "n_generated": timings["predicted_n"],
            "chunks": len(times)}


def via_run(engine_args: list[str], prompt: str, n_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        command = [sys.executable, "-m", "pipeinfer_cpu", "run", *engine_args, "--chat-template", "-p", prompt,
                   "-n", str(n_tokens), "--stats-json", str(stats_path)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        stats = json.loads(stats_path.read_text())
    stats = stats[0] if isinstance(stats, list) else stats
    return {"text": done.stdout.removesuffix("\n"), "run_tok_s": stats["decode_tokens_per_s"],
            "n_generated": stats["n_generated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--n-tokens", type=int, default=96)
    parser.add_argument("engine_args", nargs="*")
    args = parser.parse_args()
    process, url = start_server(args.engine_args)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    rows = []
    try:
        for round_index in range(args.rounds):
            for prompt in DEFAULT_PROMPTS:
                served = via_server(client, prompt, args.n_tokens)
                ran = via_run(args.engine_args, prompt, args.n_tokens)
                rows.append({"round": round_index, "prompt": prompt, **served, **ran,
                             "same_text": served["text"] == ran["text"]})
                print(f"round {round_index} {prompt[:30]!r}: run {ran['run_tok_s']:.1f}, engine "
                      f"{served['engine_tok_s']:.1f}, client {served['client_tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    summary = {"run_tok_s": median("run_tok_s"), "engine_tok_s": median("engine_tok_s"),
               "client_tok_s": median("client_tok_s")}
    summary["http_cost_vs_run"] = 1 - summary["client_tok_s"] / summary["run_tok_s"]
    summary["http_cost_same_request"] = statistics.median(1 - r["client_tok_s"] / r["engine_tok_s"] for r in rows)
    summary["all_texts_equal"] = all(row["same_text"] for row in rows)
    report = {"command": " ".join(["python", "scripts/serve_overhead.py", *sys.argv[1:]]),
              "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
              "n_tokens": args.n_tokens, "rounds": args.rounds, "summary": summary, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=1))
    table = markdown_table([{"": "median decode tok/s", "run": summary["run_tok_s"],
                             "serve (engine side)": summary["engine_tok_s"],
                             "serve (HTTP client)": summary["client_tok_s"]}],
                           ["", "run", "serve (engine side)", "serve (HTTP client)"])
    text = (f"# serve against run, {args.n_tokens} tokens x {len(DEFAULT_PROMPTS)} prompts x {args.rounds} rounds, "
            f"interleaved\n\n`{report['command']}` on {report['machine']}\n\n{table}\n\n"
            f"HTTP cost: {100 * summary['http_cost_vs_run']:.1f}% of decode speed against run (medians), "
            f"{100 * summary['http_cost_same_request']:.1f}% client against engine within each request (median). "
            f"Texts equal: {summary['all_texts_equal']}.\n")
    (args.out / "serve.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
