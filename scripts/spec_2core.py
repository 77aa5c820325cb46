"""Issue 16 on a small machine: what speculation gives with ONE target rank, against the bound.

    python scripts/spec_2core.py --out bench-results/local-2core/issue16 [--rounds 3] [-n 64]

One sitting, nothing else running:
  1. the target's cost for batches of 1-8 tokens, 1 thread (scripts/batch_cost.py);
  2. acceptance per prompt set (`bench --prompt-sets all`, `speculative`) for the n-gram draft and
     the Qwen2.5-Coder-0.5B draft, at --draft-max 2 (the longest lossless draft on this pair:
     README, "The Qwen2.5-Coder pair");
  3. the code set, --rounds interleaved rounds: `single` with 1 and 2 threads, `speculative` and
     `pipeinfer` with each draft (1 target rank, 1 thread; the 0.5B draft on a rank of its own);
  4. the bound for one target rank at each draft's measured acceptance on the code set (batch_cost.py's
     `bounds`: a free n-gram draft, R = inf; the 0.5B draft, R measured as the two models' batch-1 costs).
Writes OUT/spec-2core.json and OUT/spec-2core.md (medians over the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from batch_cost import batch_costs_ms, bounds  # noqa: E402

from pipeinfer_cpu.modelfiles.registry import resolve_model  # noqa: E402
from pipeinfer_cpu.stats import markdown_table  # noqa: E402

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
DRAFTS = {"n-gram": "ngram", "0.5B": DRAFT}


def bench(out: Path, *args: str) -> list[dict]:
    command = [sys.executable, "-m", "pipeinfer_cpu", "bench", "--model", TARGET, *args, "--out", str(out)]
    print(" ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())["modes"]


def spec_args(draft: str, n: int, modes: str, sets: str) -> tuple[str, ...]:
    return ("--draft", draft, "--modes", modes, "--stages", "1", "-t", "1", "-n", str(n), "--draft-max", "2",
            "--prompt-sets", sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--n-tokens", type=int, default=64)
    parser.add_argument("--report-only", action="store_true", help="Rewrite the report from OUT/spec-2core.json.")
    args = parser.parse_args()
    if args.report_only:
        write_report(args.out, json.loads((args.out / "spec-2core.json").read_text()))
        return
    out, n = args.out, args.n_tokens
    out.mkdir(parents=True, exist_ok=True)

    target_costs = batch_costs_ms(resolve_model(TARGET), 1)
    draft_costs = batch_costs_ms(resolve_model(DRAFT), 1)
    ratios = {k: ms / target_costs[1] for k, ms in target_costs.items()}
    cost_ratio = target_costs[1] / draft_costs[1]

    acceptance = {name: {row["prompt_set"]: row["summary"]["acceptance"]
                         for row in bench(out / f"accept-{name}", *spec_args(draft, n, "speculative", "all"))}
                  for name, draft in DRAFTS.items()}

    speeds: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        rows = bench(out / f"r{round_index}-single1", "--modes", "single", "-t", "1", "-n", str(n),
                     "--prompt-sets", "code")
        rows += bench(out / f"r{round_index}-single2", "--modes", "single", "-t", "2", "-n", str(n),
                      "--prompt-sets", "code")
        for name, draft in DRAFTS.items():
            rows += bench(out / f"r{round_index}-{name}", *spec_args(draft, n, "speculative,pipeinfer", "code"))
        for row in rows:
            speeds.setdefault(row["label"], []).append(row["summary"]["decode_tok_s"])

    report = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
              "rounds": args.rounds, "target_costs_ms": target_costs, "draft_costs_ms": draft_costs,
              "batch_cost_ratios": ratios, "draft_cost_ratio": cost_ratio, "acceptance": acceptance,
              "speeds": speeds}
    write_report(out, report)


def write_report(out: Path, report: dict) -> None:
    """OUT/spec-2core.json and .md: medians, and each speculative row against its bound."""
    speeds, acceptance = report["speeds"], report["acceptance"]
    ratios = {int(k): v for k, v in report["batch_cost_ratios"].items()}
    cost_ratio = report["draft_cost_ratio"]
    single1 = statistics.median(speeds["[code] single (1 thread)"])
    code_bounds = {name: bounds(ratios, acceptance[name]["code"], float("inf") if name == "n-gram" else cost_ratio, 2)
                   for name in DRAFTS}
    table = []
    for label, values in speeds.items():
        name = "n-gram" if "n-gram draft" in label else "0.5B" if "draft rank" in label else None
        bound = code_bounds[name]["synchronous" if "speculative" in label else "overlapped"] if name else None
        speedup = statistics.median(values) / single1
        table.append({"code set": label, "tok/s (median)": statistics.median(values), "runs": len(values),
                      "over single 1 thread": speedup, "bound": bound[1] if bound else None,
                      "best d": bound[0] if bound else None, "of the bound": speedup / bound[1] if bound else None})
    report = {**report, "bounds_code": code_bounds, "table": table}
    (out / "spec-2core.json").write_text(json.dumps(report, indent=1))
    accept_table = markdown_table([{"prompt set": s, **{name: acceptance[name][s] for name in DRAFTS}}
                                   for s in acceptance["n-gram"]], ["prompt set", *DRAFTS])
    costs = ", ".join(f"{k}: {ratios[k]:.2f}" for k in ratios)
    text = (f"# One target rank on {report['machine']}\n\nTarget {TARGET} batch costs c(k) (1 thread, x one token): "
            f"{costs}; draft cost ratio R = {cost_ratio:.2f}.\n\nAcceptance, speculative, --draft-max 2:\n\n"
            f"{accept_table}\n\nCode set, {report['rounds']} interleaved rounds (bound: best d of 0..2, "
            f"d = 0 meaning plain decoding):\n\n{markdown_table(table, list(table[0]))}\n")
    (out / "spec-2core.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
