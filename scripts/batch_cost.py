"""How much one decode of k tokens costs against one token, per GGUF: what speculation can sell.

    python scripts/batch_cost.py MODEL.gguf [MODEL.gguf ...] [--threads 1] [--json OUT.json]
        [--acceptance A [A ...] --cost-ratio R --draft-max D]

Verifying k draft tokens in one run pays only when k tokens cost much less than k single-token
runs. Prints the median time of a k-token decode (every row an output, as in verification) after a
40-token prompt, and its ratio c(k) to one token, for k = 1 to 8.

With --acceptance, also the bound for ONE target rank: a run of one decided token + d draft tokens
costs c(d + 1) token-times and yields E(d) = 1 + a + ... + a^d tokens (per-token acceptance a,
independent), and the d draft tokens cost d / R token-times (R: the target's time per token over
the draft's; `inf` for the n-gram draft, which costs nothing). Synchronous speculation pays both
in turn, E(d) / (c(d + 1) + d / R); a draft on its own core that overlaps perfectly (pipeinfer's
best case) pays the larger, E(d) / max(c(d + 1), d / R); each is the speed-up over one-token
decoding, maximised over d = 0..--draft-max (d = 0: not speculating, 1.0; --draft-max: the longest
lossless draft for the model's kernels).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeinfer_cpu.llama.runtime import Stage, StageConfig

SIZES = (1, 2, 3, 4, 5, 6, 7, 8)
PROMPT = list(range(100, 140))


def batch_costs_ms(path: Path, n_threads: int, repeats: int = 6) -> dict[int, float]:
    stage = Stage(StageConfig(path, is_first=True, is_last=True, n_ctx=512, n_batch=64, n_threads=n_threads))
    try:
        n = len(PROMPT)
        stage.decode(range(n), [[0]] * n, tokens=PROMPT, outputs=[False] * (n - 1) + [True])
        costs = {}
        for k in SIZES:
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                stage.decode(range(n, n + k), [[0]] * k, tokens=[200 + i for i in range(k)], outputs=[True] * k)
                times.append(time.perf_counter() - started)
                stage.seq_rm(0, n)  # back to the prompt
            costs[k] = float(np.median(times[1:])) * 1e3  # the first is a warm-up
        return costs
    finally:
        stage.close()


def bounds(ratios: dict[int, float], acceptance: float, cost_ratio: float, draft_max: int) -> dict[str, tuple]:
    """(best d, speed-up over one-token decoding) for synchronous and perfectly overlapped drafting."""
    def tokens(d: int) -> float:
        return sum(acceptance ** i for i in range(d + 1))

    drafts = range(0, min(draft_max, max(ratios) - 1) + 1)
    sync = max((tokens(d) / (ratios[d + 1] + d / cost_ratio), d) for d in drafts)
    overlapped = max((tokens(d) / max(ratios[d + 1], d / cost_ratio), d) for d in drafts)
    return {"synchronous": (sync[1], sync[0]), "overlapped": (overlapped[1], overlapped[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="Write the costs (and bounds) here.")
    parser.add_argument("--acceptance", type=float, nargs="*", default=[])
    parser.add_argument("--cost-ratio", type=float, default=float("inf"))
    parser.add_argument("--draft-max", type=int, default=7)
    args = parser.parse_args()
    report = []
    for path in args.models:
        costs = batch_costs_ms(path, args.threads)
        ratios = {k: ms / costs[1] for k, ms in costs.items()}
        cells = " ".join(f"{k}: {ms:.1f} ms ({ratios[k]:.2f}x)" for k, ms in costs.items())
        print(f"{path.name} ({path.stat().st_size >> 20} MiB, {args.threads} thread(s)): {cells}", flush=True)
        found = {a: bounds(ratios, a, args.cost_ratio, args.draft_max) for a in args.acceptance}
        for a, bound in found.items():
            print(f"  a = {a:.2f}, R = {args.cost_ratio:g}, d <= {args.draft_max}: synchronous at most "
                  f"{bound['synchronous'][1]:.2f}x (d = {bound['synchronous'][0]}), overlapped at most "
                  f"{bound['overlapped'][1]:.2f}x (d = {bound['overlapped'][0]})")
        report.append({"model": str(path), "threads": args.threads, "costs_ms": costs, "ratios": ratios,
                       "bounds": [{"acceptance": a, "cost_ratio": args.cost_ratio, "draft_max": args.draft_max,
                                   **{k: {"draft": d, "speedup": x} for k, (d, x) in b.items()}}
                                  for a, b in found.items()]})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
