"""Soak test (not in CI): hours of use through the same client the `chat` and `run` commands use.

    python scripts/soak.py --out bench-results/local-2core/soak [--turns 500] [--tokens 100000]

Phase `chat`: a conversation of --turns turns in a small context (turns overflow and are dropped),
Ctrl-C (an interrupt) at a random moment of one answer in five. Phase `pipeinfer`: fresh requests
with the n-gram draft (rejections cancel runs in flight) until --tokens tokens, one in ten
interrupted. After every request: each stage's committed KV sequence is checked against the head's
mirror (the `health` request), the RSS of every rank is sampled, and tokens/s noted. Writes
soak.json (every sample), soak.png (RSS per rank and tokens/s over time) and prints a summary table.
Anything that fails (a job that ends: counted, with its message, and started again; a stuck run: no
answer within --timeout; a KV mismatch) is counted, not hidden.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import psutil

from pipeinfer_cpu.app.client import JobClient, JobEnded
from pipeinfer_cpu.app.options import EngineOptions
from pipeinfer_cpu.conversation import Conversation, conversation_to_json
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.server import sampling_json
from pipeinfer_cpu.head.specdecode import SpecSettings
from pipeinfer_cpu.sampling import SamplingConfig

USER_TURNS = [
    "Tell me about the sea.", "What did I ask first?", "Write a haiku about rain.", "Explain recursion briefly.",
    "Give me three names for a cat.", "Summarise our chat so far.", "Write a Python function that adds two numbers.",
    "Why is the sky blue?", "Repeat your last answer, shorter.", "What is 17 times 3?",
]
PROMPTS = [
    "Write a long story about a lighthouse keeper and the sea, in many chapters.",
    "Write a Python module with a class for a bank account, with deposit, withdraw and tests.",
    "Explain, step by step and at length, how a compiler turns source code into machine code.",
]


def rank_rss(job: JobClient) -> dict[str, int]:
    """RSS of each rank of the job (by PID order: the head, the stages), in bytes."""
    try:
        procs = [p for p in psutil.Process(job.process.pid).children(recursive=True)
                 if "pipeinfer_cpu" in " ".join(p.cmdline())]
        return {f"rank{i}": p.memory_info().rss for i, p in enumerate(sorted(procs, key=lambda p: p.pid))}
    except psutil.Error:
        return {}


def ask(job: JobClient, request: dict, interrupt_after_s: float | None, timeout_s: float) -> dict:
    flag = threading.Event()
    timer = threading.Timer(interrupt_after_s, flag.set) if interrupt_after_s is not None else None
    if timer:
        timer.start()
    try:
        return job.ask(request, lambda text: None, timeout_s, flag)
    finally:
        if timer:
            timer.cancel()


def launch(options: EngineOptions) -> JobClient:
    job = JobClient.launch(options)
    job.start(600)
    return job


def ask_or_restart(job: JobClient, options: EngineOptions, request: dict, interrupt_after_s: float | None,
                   timeout_s: float) -> tuple[JobClient, dict]:
    """The answer; a job that ended is counted (an `ended` event with its message) and started again,
    so one failure does not end the soak."""
    try:
        return job, ask(job, request, interrupt_after_s, timeout_s)
    except JobEnded as exc:
        job.close()
        return launch(options), {"event": "ended", "message": str(exc)}


def sample(job: JobClient, phase: str, started: float, final: dict, timeout_s: float) -> dict:
    try:
        health = job.ask({"type": "health"}, lambda text: None, timeout_s)
    except JobEnded as exc:  # counted with the next request, which restarts the job
        health = {"message": str(exc)}
    stats = final.get("stats", {})
    times = stats.get("token_times_s") or [0.0]
    decode_s = times[-1] - times[0]
    n = stats.get("n_generated", 0)
    return {"phase": phase, "t_s": time.monotonic() - started, "event": final["event"], "message": final.get("message"),
            "stopped_by": final.get("stopped_by"), "tokens": n,
            "tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "runs_cancelled": stats.get("runs_cancelled", 0), "kv_ok": health.get("kv_ok"),
            "context_tokens": health.get("context_tokens"), "rss": rank_rss(job)}


def chat_phase(args, rng: random.Random, started: float, record) -> None:
    options = EngineOptions(hostfile=args.hostfile, n_ctx=1024, timeout_s=args.timeout, debug=args.debug)
    job = launch(options)
    conversation, first = Conversation(None, ()), 0
    for turn in range(args.turns):
        asked = conversation.with_turn("user", USER_TURNS[turn % len(USER_TURNS)])
        sampling = SamplingConfig(temperature=0.8, seed=turn)
        request = {"type": "turn", "conversation": conversation_to_json(asked), "first": first, "max_tokens": 64,
                   "sampling": sampling_json(sampling)}
        job, final = ask_or_restart(job, options, request, rng.uniform(0.05, 1.5) if rng.random() < 0.2 else None,
                                    2 * args.timeout)
        answer = final.get("answer", "")
        conversation = asked.with_turn("assistant", answer)
        first = final.get("dropped_turns", first) if final["event"] == "done" else 0  # a new job: nothing dropped yet
        record(sample(job, "chat", started, final, 2 * args.timeout))
    job.close()


def pipeinfer_phase(args, rng: random.Random, started: float, record) -> None:
    options = EngineOptions(hostfile=args.hostfile, n_ctx=4096, timeout_s=args.timeout, draft=Path("ngram"), debug=args.debug,
                            spec=SpecSettings(Mode.PIPEINFER))
    job = launch(options)
    total, index = 0, 0
    while total < args.tokens:
        request = {"type": "complete", "text": PROMPTS[index % len(PROMPTS)], "chat_template": True, "fresh": True,
                   "max_tokens": 3000, "sampling": sampling_json(SamplingConfig(repeat_penalty=1.1))}
        job, final = ask_or_restart(job, options, request, rng.uniform(1, 30) if rng.random() < 0.1 else None,
                                    2 * args.timeout)
        point = sample(job, "pipeinfer", started, final, 2 * args.timeout)
        total += point["tokens"]
        index += 1
        record(point)
    job.close()


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss_ax, speed_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ranks = sorted({rank for p in points for rank in p["rss"]})
    for phase in ("chat", "pipeinfer"):
        mine = [p for p in points if p["phase"] == phase]
        for rank in ranks:
            xs = [p["t_s"] / 60 for p in mine if rank in p["rss"]]
            rss_ax.plot(xs, [p["rss"][rank] / 2**20 for p in mine if rank in p["rss"]], label=f"{phase} {rank}")
        speed_ax.plot([p["t_s"] / 60 for p in mine if p["tok_s"]], [p["tok_s"] for p in mine if p["tok_s"]], ".",
                      label=phase, markersize=3)
    rss_ax.set_ylabel("RSS (MiB)")
    rss_ax.legend(fontsize=7, ncol=2)
    speed_ax.set_ylabel("decode tokens/s")
    speed_ax.set_xlabel("minutes")
    speed_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summary(points: list[dict]) -> list[str]:
    lines = ["| phase | requests | tokens | interrupted | runs cancelled | KV mismatches | errors | RSS first -> last (MiB, per rank) |",
             "|---|---|---|---|---|---|---|---|"]
    for phase in ("chat", "pipeinfer"):
        mine = [p for p in points if p["phase"] == phase]
        if not mine:
            continue
        ranks = sorted(mine[0]["rss"])
        rss = ", ".join(f"{mine[0]['rss'][r] / 2**20:.0f} -> {mine[-1]['rss'].get(r, 0) / 2**20:.0f}" for r in ranks)
        lines.append(f"| {phase} | {len(mine)} | {sum(p['tokens'] for p in mine)} | "
                     f"{sum(p['stopped_by'] == 'interrupt' for p in mine)} | {sum(p['runs_cancelled'] for p in mine)} | "
                     f"{sum(p['kv_ok'] is False for p in mine)} | {sum(p['event'] != 'done' for p in mine)} | {rss} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hostfile", type=Path, default=Path("hosts/local.txt"))
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="mpiexec's own output and tracebacks on stderr.")
    parser.add_argument("--phases", default="chat,pipeinfer", help="Which phases to run, in order.")
    parser.add_argument("--replot", action="store_true", help="Only redraw soak.png and the table from soak.jsonl "
                                                              "(a soak stopped early keeps its samples there).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        points = [json.loads(line) for line in (args.out / "soak.jsonl").read_text().splitlines()]
        plot(points, args.out / "soak.png")
        print("\n".join(summary(points)))
        return
    rng, started, points = random.Random(args.seed), time.monotonic(), []
    log = open(args.out / "soak.jsonl", "w")

    def record(point: dict) -> None:
        points.append(point)
        log.write(json.dumps(point) + "\n")
        log.flush()

    phases = {"chat": chat_phase, "pipeinfer": pipeinfer_phase}
    for name in args.phases.split(","):
        phases[name](args, rng, started, record)
    (args.out / "soak.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                    "minutes": (time.monotonic() - started) / 60,
                                                    "points": points}, indent=1))
    plot(points, args.out / "soak.png")
    print("\n".join(summary(points)))


if __name__ == "__main__":
    main()
