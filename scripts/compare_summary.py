"""Mean and standard deviation per method of scripts/gpu_compare.sh's fine-tuned runs (issue 18, items 2-3).

    python scripts/compare_summary.py RUN --out OUT [--name methods] [--baseline CHECKPOINT] [--control-acc C]

Reads RUN/s<seed>/finetune_<method>.log, whose last line `compress finetune` writes as
"test accuracy A% -> B% after N epochs (...), F of the MACs -> FILE"; A is after BatchNorm
recalibration, so `keepall` (the control that keeps every channel and is fine-tuned without
distillation) has an A below the baseline's own test accuracy, which the baseline's checkpoint holds.
Each method is compared with that baseline and with the control after its fine-tuning (keepall's B in
RUN, or --control-acc for a run without one).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from pipeinfer_cpu.stats import markdown_table

RESULT = re.compile(r"test accuracy ([\d.]+)% -> ([\d.]+)% after (\d+) epochs .*?, ([\d.]+) of the MACs")


def read_runs(run: Path) -> dict[str, list[dict]]:
    """Per method, one entry per seed that finished: accuracy before and after fine-tuning, MACs kept."""
    runs: dict[str, list[dict]] = {}
    for log in sorted(run.glob("s*/finetune_*.log")):
        found = RESULT.findall(log.read_text())
        if not found:
            continue
        before, after, epochs, macs = found[-1]
        method = log.stem.removeprefix("finetune_")
        runs.setdefault(method, []).append({"seed": log.parent.name.removeprefix("s"), "before": float(before),
                                            "after": float(after), "epochs": int(epochs), "macs": float(macs)})
    return runs


def baseline_test_acc(checkpoint: Path) -> float:
    from compress.store import load_checkpoint  # torch: imported only when asked

    return float(load_checkpoint(str(checkpoint))[1]["meta"]["test_acc"])


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _difference(value: float, reference: float | None) -> float | None:
    return None if reference is None else round(value - reference, 2)


def summary_table(runs: dict[str, list[dict]], baseline_acc: float | None = None,
                  control_acc: float | None = None) -> list[dict]:
    """One row per method: means over seeds, the standard deviation after fine-tuning, and the mean's
    difference to the baseline's test accuracy and to the control's (keepall's mean unless given)."""
    if control_acc is None and runs.get("keepall"):
        control_acc = statistics.mean(r["after"] for r in runs["keepall"])
    table = []
    for method, rows in runs.items():
        after = [r["after"] for r in rows]
        table.append({"method": method, "seeds": len(rows), "MACs kept": statistics.mean(r["macs"] for r in rows),
                      "before fine-tuning": statistics.mean(r["before"] for r in rows),
                      "after, mean": statistics.mean(after), "after, sd": _sd(after),
                      "vs the baseline": _difference(statistics.mean(after), baseline_acc),
                      "vs the control": _difference(statistics.mean(after), control_acc)})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="compare", help="The output files' name.")
    parser.add_argument("--baseline", type=Path, help="The unpruned checkpoint: its test accuracy.")
    parser.add_argument("--control-acc", type=float, help="The control's accuracy, where RUN has none.")
    args = parser.parse_args()
    runs = read_runs(args.run)
    table = summary_table(runs, baseline_test_acc(args.baseline) if args.baseline else None, args.control_acc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"runs": runs, "table": table}, indent=1))
    text = markdown_table(table, list(table[0])) if table else "no finished runs\n"
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
