"""A/B benchmark of two pipeinfer-cpu source trees ("old" and "new") on this machine, in one sitting.

Measures decode tokens/s and mean inter-token latency (ITL) of every mode of `python -m pipeinfer_cpu
bench`, for each suite:
  foundation         single,pipeline on the embedded default model, 2 stages, -t 1, -n 128
  speculation-2core  single,pipeline,speculative,pipeinfer on a SYNTHETIC bench pair, 1 stage, -t 1, -n 64
  ngram-2stages      pipeline,pipeinfer on the default model with --draft ngram, 2 stages, -t 1, -n 64
                     (-summary, -code: on those prompt sets)
A tree is chosen by running from its root with PYTHONPATH=<root>; the bench's own subprocesses and MPI
ranks inherit it. Rounds interleave the trees (odd rounds old then new, even rounds new then old).
Every bench.json stays under OUT/<suite>/round<r>-<tree>/; OUT/ab.json and OUT/ab.md hold the medians
over rounds and the new/old ratios per suite and mode.

Full comparison (run with the project's venv; the pair comes from `python -m pipeinfer_cpu models
bench-pair --agreement 0.6 -o /work/pairs/a0.60`):
  /work/main/.venv/bin/python /work/main/scripts/ab_bench.py --pair /work/pairs/a0.60 \
      --out /work/main/bench-results/local-2core/redesign-ab
Smoke test: add --quick (1 round, -n 8, the foundation suite unless --suites says otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import median
from typing import NamedTuple

from tabulate import tabulate


class Suite(NamedTuple):
    """One benchmark of the comparison: `bench --modes ... --stages ... -n ...`, on the pair or not."""

    modes: tuple[str, ...]
    stages: int  # target stages
    n_tokens: int  # per prompt
    uses_pair: bool  # the SYNTHETIC pair's target and draft, or the default model
    extra: tuple[str, ...] = ()  # further bench arguments


SUITES = {
    "foundation": Suite(("single", "pipeline"), 2, 128, False),
    "speculation-2core": Suite(("single", "pipeline", "speculative", "pipeinfer"), 1, 64, True),
    # pipeinfer on two target stages, the default model and the n-gram draft (in the head: no draft rank)
    "ngram-2stages": Suite(("pipeline", "pipeinfer"), 2, 64, False, ("--draft", "ngram")),
    **{f"ngram-2stages-{name}": Suite(("pipeline", "pipeinfer"), 2, 64, False,
                                      ("--draft", "ngram", "--prompt-sets", name)) for name in ("summary", "code")},
}
METRICS = ("decode_tok_s", "itl_mean_ms")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, default=Path("/work/wt-old"), help="root of the old tree")
    parser.add_argument("--new", type=Path, default=Path("/work/main"), help="root of the new tree")
    parser.add_argument("--pair", type=Path, help="folder of the SYNTHETIC bench pair (speculation-2core)")
    parser.add_argument("--out", type=Path, required=True, help="where the bench.json files, ab.json and ab.md go")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--suites", help=f"comma list from {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, -n 8, default suite foundation")
    args = parser.parse_args()
    args.suites = (args.suites or ("foundation" if args.quick else ",".join(SUITES))).split(",")
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suites: {', '.join(sorted(unknown))}")
    if args.quick:
        args.rounds = 1
    for key in ("old", "new", "pair", "out"):  # the benches run from the trees' roots
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).resolve())
    if any(SUITES[s].uses_pair for s in args.suites) and args.pair is None:
        parser.error("speculation-2core needs --pair")
    return args


def tree_env(root: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(root))


def check_tree(root: Path) -> None:
    """Fail unless a Python started the way the benchmark starts it imports pipeinfer_cpu from root."""
    found = subprocess.run([sys.executable, "-c", "import pipeinfer_cpu; print(pipeinfer_cpu.__file__)"],
                           cwd=root, env=tree_env(root), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(root):
        sys.exit(f"PYTHONPATH={root} imports pipeinfer_cpu from {found}, not from that tree")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def tree_state(root: Path) -> dict:
    """The tree's commit, whether its package differs from it, and a hash of the package's files as they are."""
    digest = hashlib.sha256()
    for path in sorted((root / "pipeinfer_cpu").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return {"root": str(root), "commit": git(root, "rev-parse", "HEAD"),
            "uncommitted_changes": bool(git(root, "status", "--porcelain", "--", "pipeinfer_cpu")),
            "package_sha256": digest.hexdigest()}


def bench_argv(suite: Suite, n_tokens: int, pair: Path | None, out_dir: Path) -> list[str]:
    argv = [sys.executable, "-m", "pipeinfer_cpu", "bench", "--hostfile", "hosts/local.txt",
            "--modes", ",".join(suite.modes), "--stages", str(suite.stages), "-t", "1", "-n", str(n_tokens),
            "--out", str(out_dir), *suite.extra]
    if suite.uses_pair:
        argv += ["--model", str(pair / "synthetic-target.gguf"), "--draft", str(pair / "synthetic-draft.gguf")]
    return argv


def run_bench(root: Path, argv: list[str], out_dir: Path) -> list[dict]:
    """Run one bench from the tree's root; return its rows' summaries, in the order of --modes."""
    print(f"ab: cd {root} && PYTHONPATH={root} {shlex.join(argv)}", file=sys.stderr, flush=True)
    subprocess.run(argv, cwd=root, env=tree_env(root), stdout=sys.stderr, check=True)
    return [row["summary"] for row in json.loads((out_dir / "bench.json").read_text())["modes"]]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def ratio(new: float | None, old: float | None) -> float | None:
    return new / old if new is not None and old else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    args = parse_args()
    trees = {"old": args.old, "new": args.new}
    for root in trees.values():
        check_tree(root)
    states = {t: tree_state(root) for t, root in trees.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    # measurements[suite][mode][tree] = one {"round", "decode_tok_s", "itl_mean_ms", "bench_json"} per round
    measurements: dict[str, dict[str, dict[str, list[dict]]]] = {
        s: {m: {t: [] for t in trees} for m in SUITES[s].modes} for s in args.suites}
    commands: list[dict] = []
    for r in range(1, args.rounds + 1):
        for name in args.suites:
            suite = SUITES[name]
            for tree in ("old", "new") if r % 2 else ("new", "old"):
                out_dir = args.out / name / f"round{r}-{tree}"
                argv = bench_argv(suite, 8 if args.quick else suite.n_tokens, args.pair, out_dir)
                commands.append({"round": r, "suite": name, "tree": tree, "cwd": str(trees[tree]),
                                 "env": {"PYTHONPATH": str(trees[tree])}, "argv": argv})
                summaries = run_bench(trees[tree], argv, out_dir)
                for mode, summary in zip(suite.modes, summaries, strict=True):
                    measurements[name][mode][tree].append(
                        {"round": r, **{k: summary.get(k) for k in METRICS}, "bench_json": str(out_dir / "bench.json")})

    results, table = [], []
    for name, modes in measurements.items():
        for mode, by_tree in modes.items():
            medians = {t: {k: median(v) if (v := [m[k] for m in runs if m[k] is not None]) else None
                           for k in METRICS} for t, runs in by_tree.items()}
            ratios = {k: ratio(medians["new"][k], medians["old"][k]) for k in METRICS}
            results.append({"suite": name, "mode": mode, "median": medians, "new_over_old": ratios,
                            "runs": by_tree})
            per_round = {t: " / ".join(fmt(m["decode_tok_s"]) for m in runs) for t, runs in by_tree.items()}
            table.append([name, mode, fmt(medians["old"]["decode_tok_s"]), fmt(medians["new"]["decode_tok_s"]),
                          fmt(ratios["decode_tok_s"], 3), fmt(medians["old"]["itl_mean_ms"]),
                          fmt(medians["new"]["itl_mean_ms"]), per_round["old"], per_round["new"]])
    headers = ["suite", "mode", "old tok/s (median)", "new tok/s (median)", "new/old", "old ITL ms (median)",
               "new ITL ms (median)", "old tok/s per round", "new tok/s per round"]
    markdown = tabulate(table, headers, tablefmt="github", disable_numparse=True)

    machine = f"{socket.gethostname()}: {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}"
    for t, root in trees.items():
        states[t]["changed_during_run"] = tree_state(root) != states[t]
        if states[t]["changed_during_run"]:
            print(f"ab: WARNING: the {t} tree {root} changed while it was measured", file=sys.stderr)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "trees": states, "rounds": args.rounds, "quick": args.quick,
              "pair": str(args.pair) if args.pair else None,
              "script": shlex.join([sys.executable, *sys.argv]), "commands": commands, "results": results}
    (args.out / "ab.json").write_text(json.dumps(report, indent=2) + "\n")
    header = "\n".join(f"- {t}: `{i['root']}` at {i['commit'][:12]}"
                       + (" + uncommitted changes" if i["uncommitted_changes"] else "")
                       + (" (CHANGED during the run)" if i["changed_during_run"] else "") for t, i in states.items())
    (args.out / "ab.md").write_text(f"## pipeinfer-cpu A/B, {report['date']}\n\n{machine}\n\n{header}\n\n"
                                    f"{args.rounds} interleaved round(s); medians over rounds.\n\n{markdown}\n")
    print(markdown)


if __name__ == "__main__":
    main()
