"""Issue 16 on the lent 16-core machine: speculation against its bound, the PipeInfer reference beside it.

    python scripts/spec_16core.py pairs --root R               # SYNTHETIC pairs, agreement 0.6, R = 3.4 and 10
    python scripts/spec_16core.py agreement --root R           # the draft's agreement on the bench text itself
    python scripts/spec_16core.py rounds --root R --rounds 3   # pipeline/speculative/pipeinfer, interleaved
    python scripts/spec_16core.py variants --root R --rounds 2 # pipeinfer with one draft token per run beside
    python scripts/spec_16core.py drafts --root R [--distilled D.gguf]  # the default model, its drafts, prompt sets
    python scripts/spec_16core.py reference --root R --pipeinfer DIR   # the PipeInfer reference, same pairs
    python scripts/spec_16core.py report --root R --out OUT    # OUT/spec-16core.json and .md

The settings: 4 target stages at cost ratio R = 3.4 and R = 10, and 8 target stages at R = 10, one
draft rank each, 1 thread per rank (every rank pinned to a core by PIPEINFER_MPIEXEC_ARGS). The R = 10
target is the R = 3.4 target padded with more zero-norm layers and the draft is the same file, so
both share one measured agreement (zero-norm layers add exactly nothing to the text).

The bound (issue 16): runs carry one decided token plus drafts; with per-token acceptance a, S target
stages and draft cost ratio R, a pipeline without overhead launches a run every max(T/S, T/R) (T: one
token through the whole target) and waits a whole T after each miss, so pipeinfer is at most
1 / ((1 - a) + a * max(1/S, 1/R)) times `pipeline`. Both inputs are measured where the benchmark runs: a is
the draft's teacher-forced agreement on the bench prompts' own text (`agreement`; --text-agreement), R the
pipeline's time per token over the draft's (--draft-ms), since a pipeline token also pays its hops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeinfer_cpu.app.benchpair import DRAFT_NAME, batched_source, build_bench_pair, extra_layers_for, make_target
from pipeinfer_cpu.modelfiles.models import open_gguf, read_model_info
from pipeinfer_cpu.modelfiles.shards import write_gguf
from pipeinfer_cpu.stats import markdown_table

AGREEMENT = 0.6
SETTINGS = (("R3.4-S4", 3.4, 4), ("R10-S4", 10.0, 4), ("R10-S8", 10.0, 8))
MODES = "pipeline,speculative,pipeinfer"


def bound(a: float, stages: int, cost_ratio: float) -> float:
    """pipeinfer's best speed over `pipeline` without overhead (module docstring)."""
    return 1.0 / ((1.0 - a) + a * max(1.0 / stages, 1.0 / cost_ratio))


def hostfile(root: Path, stages: int) -> Path:
    path = root / f"hosts{stages}.txt"
    path.write_text("localhost\n" * stages)
    return path


def bench(out: Path, *args: str) -> list[dict]:
    command = [sys.executable, "-m", "pipeinfer_cpu", "bench", *args, "--out", str(out)]
    print(" ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())["modes"]


def pair_dir(root: Path, cost_ratio: float) -> Path:
    return root / f"pair-r{cost_ratio:g}"


# -- steps --------------------------------------------------------------------------------------


def make_pairs(root: Path) -> None:
    """The R = 3.4 pair by calibration; the R = 10 target by padding its source further, same draft."""
    source = batched_source(root)
    small = build_bench_pair(3.4, AGREEMENT, pair_dir(root, 3.4), source=source,
                             progress=lambda text: print(text, file=sys.stderr, flush=True))
    big = pair_dir(root, 10.0)
    big.mkdir(parents=True, exist_ok=True)
    n_layer = read_model_info(source).n_layer
    make_target(source, extra_layers_for(10.0, n_layer), big / "synthetic-target.gguf")
    shutil.copy(small.draft, big / DRAFT_NAME)
    info = json.loads((pair_dir(root, 3.4) / "pair.json").read_text())
    (root / "pairs.json").write_text(json.dumps({"agreement_measured": info["agreement_measured"],
                                                 "sigma": info["sigma"], "n_layer": n_layer,
                                                 "extra_layers": {"3.4": extra_layers_for(3.4, n_layer),
                                                                  "10": extra_layers_for(10.0, n_layer)}}))


def text_agreement(root: Path, n_tokens: int) -> float:
    """The draft's teacher-forced top-1 agreement on the target's own greedy text for the bench prompts
    (the bound's a for these runs; the pair was calibrated on other prompts). The source stands in for
    the target: its zero-norm layers change nothing."""
    from pipeinfer_cpu.app.bench import DEFAULT_PROMPTS
    from pipeinfer_cpu.app.benchpair import continuations, draft_agreement
    from pipeinfer_cpu.llama.runtime import Vocab

    source = batched_source(root)
    vocab = Vocab(source)
    try:
        prompts = [vocab.tokenize(p) for p in DEFAULT_PROMPTS]
    finally:
        vocab.close()
    texts = continuations(source, prompts, n_tokens, 1)
    agreement = draft_agreement(pair_dir(root, 3.4) / DRAFT_NAME, texts, 1)
    print(f"teacher-forced agreement on the bench prompts' {sum(len(t.tokens) for t in texts)} tokens: "
          f"{agreement:.3f}")
    return agreement


def run_rounds(root: Path, rounds: int, n_tokens: int, settings: list[str]) -> None:
    """Each round runs every setting once (modes in one bench call), so the settings interleave."""
    for index in range(rounds):
        for name, cost_ratio, stages in SETTINGS:
            if name not in settings:
                continue
            pair = pair_dir(root, cost_ratio)
            out = root / "rounds" / name / f"r{index}"
            if (out / "bench.json").is_file():
                continue  # resumable: a call of the lent machine may end between rounds
            bench(out, "--hostfile", str(hostfile(root, stages)), "--model", str(pair / "synthetic-target.gguf"),
                  "--draft", str(pair / DRAFT_NAME), "--modes", MODES, "--stages", str(stages), "-t", "1",
                  "-n", str(n_tokens))


def run_drafts(root: Path, rounds: int, n_tokens: int, stages: int, distilled: Path | None) -> None:
    """The default model (SmolLM2-135M Q4_1) on every prompt set, 4 target stages, interleaved rounds:
    each round `single` and `pipeline` once, then `speculative` and `pipeinfer` with the n-gram draft
    and, given one, with the distilled draft (whose cost ratio on this CPU is measured first)."""
    common = ("--hostfile", str(hostfile(root, stages)), "--stages", str(stages), "-t", "1", "-n", str(n_tokens),
              "--prompt-sets", "all")
    if distilled is not None and not (root / "drafts" / "cost.json").is_file():
        (root / "drafts").mkdir(parents=True, exist_ok=True)
        (root / "drafts" / "cost.json").write_text(json.dumps(draft_cost(distilled)))
    calls = [("ngram", "ngram", "single,pipeline,speculative,pipeinfer")]
    if distilled is not None:
        calls.append(("distilled", str(distilled), "speculative,pipeinfer"))
    for index in range(rounds):
        for kind, draft, modes in calls:
            out = root / "drafts" / kind / f"r{index}"
            if not (out / "bench.json").is_file():  # resumable across calls of the lent machine
                bench(out, *common, "--draft", draft, "--modes", modes)


def draft_cost(draft: Path) -> dict:
    """The draft's and the default model's plain greedy speed, 1 thread, llama.cpp (`draft evaluate`'s)."""
    from pipeinfer_cpu.app.prompt_sets import prompt_sets
    from pipeinfer_cpu.draftmake.evaluate import chat_prompt, cost_ratio
    from pipeinfer_cpu.modelfiles.registry import resolve_model

    target = resolve_model(None)
    story = prompt_sets("story")["story"][0]
    return cost_ratio(target, draft, chat_prompt(target, story), 64, 1)


def run_variants(root: Path, rounds: int, n_tokens: int, settings: list[str]) -> None:
    """pipeline, pipeinfer as it is, and pipeinfer with one draft token per run and a run in flight per
    stage (`--fixed-length --draft-max 1 --max-inflight max(4, S)`: what the performance model,
    `plan`, finds best here), interleaved, each round all settings."""
    from pipeinfer_cpu.app.bench import DEFAULT_PROMPTS, ModeSpec, run_mode

    prompts = root / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in DEFAULT_PROMPTS))
    for index in range(rounds):
        for name, cost_ratio, stages in SETTINGS:
            out = root / "variants" / name / f"r{index}.json"
            if name not in settings or out.is_file():
                continue
            pair = pair_dir(root, cost_ratio)
            common = ("--hostfile", str(hostfile(root, stages)), "--model", str(pair / "synthetic-target.gguf"),
                      "--stages", str(stages), "-t", "1")
            spec = ("--draft", str(pair / DRAFT_NAME))
            one = ("--fixed-length", "--draft-max", "1", "--max-inflight", str(max(4, stages)))
            rows = [run_mode(ModeSpec(label, args), prompts, n_tokens, common, 900) for label, args in (
                ("pipeline", ("--mode", "pipeline")), ("pipeinfer", ("--mode", "pipeinfer", *spec)),
                ("pipeinfer-1", ("--mode", "pipeinfer", *spec, *one)))]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows))
            print(name, index, [(r["label"], round(r["summary"]["decode_tok_s"], 2)) for r in rows], file=sys.stderr)


# -- the PipeInfer reference ----------------------------------------------------------------------


def with_output_weight(source: Path, out: Path) -> Path:
    """The reference's llama.cpp (late 2023) needs an explicit output.weight: add the tied embedding."""
    if out.is_file():
        return out
    reader = open_gguf(source)
    tensors = [(t.name, t) for t in reader.tensors]
    if "output.weight" not in {name for name, _ in tensors}:
        tensors.append(("output.weight", next(t for t in reader.tensors if t.name == "token_embd.weight")))
    field = reader.fields["general.architecture"]
    write_gguf(reader, bytes(field.parts[field.data[0]]).decode(), out, tensors, {})
    return out


def reference_run(binary: Path, target: Path, draft: Path, stages: int, prompt: str, n_tokens: int) -> dict:
    """One greedy generation by the reference's `speculative` (S target ranks + 1 draft rank, 1 thread each)."""
    split = ",".join([f"{1 / stages:.6f}"] * stages) + "/1.0"
    ranks = stages + 1
    threads = ",".join(["1"] * ranks)
    mpiexec = os.environ.get("REFERENCE_MPIEXEC", "mpiexec --allow-run-as-root --oversubscribe --bind-to core")
    command = [*mpiexec.split(), "-n", str(ranks), str(binary), "-m", str(target), "-md", str(draft),
               "--mpi-layer-split", split, "-p", prompt, "-n", str(n_tokens), "--ignore-eos", "--temp", "-1.0",
               "--repeat-last-n", "0", "--draft", "4",
               "-t", threads, "-tb", threads, "-c", "2048", "-np", str(ranks), "-pa", "0.001", "-ps", "0.8",
               "-pr", "0.4", "-pd", "0.01"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=binary.parent)
    log = done.stderr
    decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
    accept = re.search(r"accept\s+=\s+([\d.]+)%", log)
    return {"returncode": done.returncode, "wall_s": time.perf_counter() - started, "text": done.stdout,
            "decode_tok_s": float(decoded[3]) if decoded else None, "tokens": int(decoded[1]) if decoded else None,
            "acceptance": float(accept[1]) / 100 if accept else None, "command": " ".join(command),
            "log_tail": log[-1500:] if decoded is None else ""}


def our_texts(target: Path, prompts: list[str], n_tokens: int) -> list[str]:
    """Our `single` greedy text for each prompt (the target's own text, which every mode reproduces;
    it stops at an end-of-generation token, the reference is run with --ignore-eos)."""
    texts = []
    for prompt in prompts:
        done = subprocess.run([sys.executable, "-m", "pipeinfer_cpu", "run", "--mode", "single", "-t", "1",
                               "--model", str(target), "-n", str(n_tokens), "-p", prompt],
                              capture_output=True, text=True, check=True, timeout=300)
        texts.append(done.stdout)
    return texts


def same_prefix(theirs: str, ours: str) -> bool:
    """Equal as far as the shorter goes (ours may have stopped at the end-of-generation token)."""
    theirs, ours = theirs.strip(), ours.strip()
    shorter = min(len(theirs), len(ours))
    return shorter > 0 and theirs[:shorter] == ours[:shorter]


def run_reference(root: Path, pipeinfer: Path, n_tokens: int, settings: list[str]) -> None:
    from pipeinfer_cpu.app.bench import DEFAULT_PROMPTS

    binary = pipeinfer / "speculative"
    results = json.loads((root / "reference.json").read_text()) if (root / "reference.json").is_file() else {}
    for name, cost_ratio, stages in SETTINGS:
        if name not in settings or name in results:
            continue
        pair = pair_dir(root, cost_ratio)
        target = with_output_weight(pair / "synthetic-target.gguf", pair / "reference-target.gguf")
        draft = with_output_weight(pair / DRAFT_NAME, pair / "reference-draft.gguf")
        runs = [reference_run(binary, target, draft, stages, p, n_tokens) for p in DEFAULT_PROMPTS]
        ours = our_texts(pair / "synthetic-target.gguf", list(DEFAULT_PROMPTS), n_tokens)
        for run, text in zip(runs, ours):
            run["ours"] = text
            run["equal_to_ours"] = same_prefix(run["text"], text)
        results[name] = runs
        (root / "reference.json").write_text(json.dumps(results, indent=1))
        print(name, [(r["decode_tok_s"], r["acceptance"], r["equal_to_ours"]) for r in runs], file=sys.stderr)


# -- report ---------------------------------------------------------------------------------------


def _median_speeds(rows: list[dict]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for row in rows:
        mode = row["label"].split(" ")[0]
        found.setdefault(mode, []).append(row["summary"]["decode_tok_s"])
        if mode != "pipeline":
            found.setdefault(mode + "_acceptance", []).append(row["summary"].get("acceptance") or 0.0)
    return found


def _variants_table(root: Path, a_text: float, draft_ms: float) -> list[dict]:
    """Medians of the `variants` rounds, each pipeinfer against the pipeline and the bound at the
    measured agreement on the benchmark's own text and the measured cost ratio."""
    table = []
    for name, cost_ratio, stages in SETTINGS:
        speeds: dict[str, list[float]] = {}
        for path in sorted((root / "variants" / name).glob("r*.json")):
            for row in json.loads(path.read_text()):
                speeds.setdefault(row["label"], []).append(row["summary"]["decode_tok_s"])
        if not speeds:
            continue
        med = {label: statistics.median(values) for label, values in speeds.items()}
        measured_ratio = 1000.0 / med["pipeline"] / draft_ms
        top = bound(a_text, stages, measured_ratio)
        table.append({"setting": f"{stages} target stages, R = {cost_ratio:g} (measured {measured_ratio:.1f})",
                      "rounds": len(speeds["pipeline"]), "pipeline": med["pipeline"],
                      "pipeinfer (as before)": med["pipeinfer"], "pipeinfer, 1 token/run": med["pipeinfer-1"],
                      "bound": top, "before / pipeline": med["pipeinfer"] / med["pipeline"],
                      "1 token/run / pipeline": med["pipeinfer-1"] / med["pipeline"],
                      "before, of the bound": med["pipeinfer"] / med["pipeline"] / top,
                      "1 token/run, of the bound": med["pipeinfer-1"] / med["pipeline"] / top})
    return table


def _json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _reference_cells(runs: list[dict]) -> dict:
    """The PipeInfer reference's mean tok/s and acceptance over the prompts, and how often its text was ours."""
    done = [r for r in runs if r.get("decode_tok_s")]
    return {"reference tok/s": statistics.mean(r["decode_tok_s"] for r in done) if done else None,
            "reference accept": statistics.mean(r["acceptance"] for r in done) if done else None,
            "reference text = ours": f"{sum(bool(r.get('equal_to_ours')) for r in runs)}/{len(runs)}" if runs else None}


def _rounds_table(root: Path, a_text: float, draft_ms: float) -> list[dict]:
    """Medians of the `rounds` runs, pipeinfer against the pipeline, speculative and the bound (at the
    measured agreement on the bench text and the measured cost ratio), the reference beside them."""
    reference = _json(root / "reference.json", {})
    table = []
    for name, cost_ratio, stages in SETTINGS:
        rows = [row for path in sorted((root / "rounds" / name).glob("r*/bench.json"))
                for row in json.loads(path.read_text())["modes"]]
        if not rows:
            continue
        speeds = _median_speeds(rows)
        med = {mode: statistics.median(values) for mode, values in speeds.items()}
        over = med["pipeinfer"] / med["pipeline"]
        by_round = [p / q for p, q in zip(speeds["pipeinfer"], speeds["pipeline"])]  # one bench call a round
        measured_ratio = 1000.0 / med["pipeline"] / draft_ms
        top = bound(a_text, stages, measured_ratio)
        table.append({"setting": f"{stages} target stages + 1 draft rank, R = {cost_ratio:g} "
                                 f"(measured {measured_ratio:.1f})",
                      "rounds": len(speeds["pipeline"]), "pipeline": med["pipeline"],
                      "speculative": med["speculative"], "pipeinfer": med["pipeinfer"],
                      "pipeinfer accept": med["pipeinfer_acceptance"], "pipeinfer / pipeline": over,
                      "by round": ", ".join(f"{r:.2f}" for r in by_round), "bound": top,
                      "of the bound": over / top, "pipeinfer / speculative": med["pipeinfer"] / med["speculative"],
                      **_reference_cells(reference.get(name, []))})
    return table


def _table_text(table: list[dict]) -> str:
    return markdown_table(table, list(table[0])) if table else ""


def report(root: Path, out: Path, a_text: float = 0.692, draft_ms: float = 14.1) -> None:
    """OUT/spec-16core.json and .md from whatever steps have run under ROOT. Every bound is taken at
    a = `a_text` (`agreement`) and R = the pipeline's time per token over the draft's `draft_ms`."""
    out.mkdir(parents=True, exist_ok=True)
    calibrated = _json(root / "pairs.json", {}).get("agreement_measured")
    machines = [json.loads(path.read_text()).get("machine") for path in sorted(root.glob("*/*/r*/bench.json"))]
    data = {"machine": next((m for m in machines if m), f"{os.cpu_count()} CPUs"),
            "agreement_calibrated": calibrated, "agreement_bench_text": a_text, "draft_ms": draft_ms,
            "settings": _rounds_table(root, a_text, draft_ms), "variants": _variants_table(root, a_text, draft_ms),
            "drafts": _drafts_table(root), "draft_cost": _json(root / "drafts" / "cost.json", {}),
            "reference": _json(root / "reference.json", {})}
    (out / "spec-16core.json").write_text(json.dumps(data, indent=1))
    text = (f"# Speculation on {data['machine']} (SYNTHETIC pairs; medians of interleaved rounds; bounds at the "
            f"draft's agreement on the bench text, {a_text}, and R = the pipeline's time per token / the "
            f"draft's {draft_ms} ms)\n\n{_table_text(data['settings'])}\n\n"
            f"## One draft token per run (second sitting)\n\n{_table_text(data['variants'])}\n\n"
            f"## The default model with its drafts, 4 target stages\n\n{_table_text(data['drafts'])}\n")
    (out / "spec-16core.md").write_text(text)
    print(text)


def _draft_rounds(root: Path) -> tuple[dict[tuple[str, str, str], list[float]], dict[tuple[str, str], list[float]]]:
    """The `drafts` rounds' tok/s by (prompt set, draft or 'none', mode), and by (prompt set, draft) the
    share of pipeinfer's tokens that came from accepted guesses."""
    speeds: dict[tuple[str, str, str], list[float]] = {}
    from_draft: dict[tuple[str, str], list[float]] = {}
    for kind in ("ngram", "distilled"):
        for path in sorted((root / "drafts" / kind).glob("r*/bench.json")):
            for row in json.loads(path.read_text())["modes"]:
                mode = row["label"].split("] ")[1].split(" ")[0]
                draft = kind if mode in ("speculative", "pipeinfer") else "none"
                speeds.setdefault((row["prompt_set"], draft, mode), []).append(row["summary"]["decode_tok_s"])
                if mode == "pipeinfer":
                    runs = row["runs"]
                    from_draft.setdefault((row["prompt_set"], kind), []).append(
                        sum(r["accepted"] for r in runs) / max(1, sum(r["n_generated"] for r in runs)))
    return speeds, from_draft


def _drafts_table(root: Path) -> list[dict]:
    """Per prompt set and draft: medians over the rounds of the four modes, pipeinfer against `pipeline`
    and against the bound at a = the share of tokens the draft gave in pipeinfer (the n-gram draft
    proposes only where the context repeats) and R = the pipeline's time per token over the draft's
    (infinite for the n-gram draft, which costs nothing)."""
    speeds, from_draft = _draft_rounds(root)
    cost = _json(root / "drafts" / "cost.json", {})
    med = {key: statistics.median(values) for key, values in speeds.items()}
    table = []
    for (prompt_set, kind), shares in from_draft.items():
        pipeline = med[(prompt_set, "none", "pipeline")]
        draft_tok_s = cost.get("draft_tok_s") if kind == "distilled" else None
        ratio = draft_tok_s / pipeline if draft_tok_s else float("inf")
        a = statistics.median(shares)
        over = med[(prompt_set, kind, "pipeinfer")] / pipeline
        top = bound(a, 4, ratio)
        table.append({"set": prompt_set, "draft": kind, "rounds": len(shares),
                      "single": med[(prompt_set, "none", "single")], "pipeline": pipeline,
                      "speculative": med[(prompt_set, kind, "speculative")],
                      "pipeinfer": med[(prompt_set, kind, "pipeinfer")], "tokens from the draft": a,
                      "R": ratio, "pipeinfer / pipeline": over, "pipeinfer / single": over * pipeline /
                      med[(prompt_set, "none", "single")], "bound": top, "of the bound": over / top})
    return sorted(table, key=lambda row: (row["set"], row["draft"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["pairs", "agreement", "rounds", "variants", "drafts", "reference", "report"])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--n-tokens", type=int, default=48)
    parser.add_argument("--settings", default=",".join(name for name, _, _ in SETTINGS))
    parser.add_argument("--distilled", type=Path, help="drafts: the distilled draft GGUF (else n-gram only).")
    parser.add_argument("--pipeinfer", type=Path, help="The built PipeInfer reference (its `speculative`).")
    parser.add_argument("--text-agreement", type=float, default=0.692,
                        help="report: the draft's teacher-forced agreement on the bench prompts' own text.")
    parser.add_argument("--draft-ms", type=float, default=14.1, help="report: the draft's time per token, ms.")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    settings = args.settings.split(",")
    if args.step == "pairs":
        make_pairs(args.root)
    elif args.step == "agreement":
        text_agreement(args.root, args.n_tokens)
    elif args.step == "rounds":
        run_rounds(args.root, args.rounds, args.n_tokens, settings)
    elif args.step == "variants":
        run_variants(args.root, args.rounds, args.n_tokens, settings)
    elif args.step == "drafts":
        run_drafts(args.root, args.rounds, args.n_tokens, 4, args.distilled)
    elif args.step == "reference":
        run_reference(args.root, args.pipeinfer, args.n_tokens, settings)
    else:
        report(args.root, args.out or args.root, args.text_agreement, args.draft_ms)


if __name__ == "__main__":
    main()
