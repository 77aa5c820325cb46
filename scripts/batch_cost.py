"""How much one decode of k tokens costs against one token, per GGUF: what speculation can sell.

    python scripts/batch_cost.py MODEL.gguf [MODEL.gguf ...] [--threads 1]

Verifying k draft tokens in one run pays only when k tokens cost much less than k single-token
runs. Prints the median time of a k-token decode (every row an output, as in verification) after a
40-token prompt, and its ratio to one token, for k = 1, 2, 3, 4, 6, 8.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipeinfer_cpu.llama.runtime import Stage, StageConfig

SIZES = (1, 2, 3, 4, 6, 8)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for path in args.models:
        costs = batch_costs_ms(path, args.threads)
        cells = " ".join(f"{k}: {ms:.1f} ms ({ms / costs[1]:.2f}x)" for k, ms in costs.items())
        print(f"{path.name} ({path.stat().st_size >> 20} MiB): {cells}", flush=True)


if __name__ == "__main__":
    main()
