"""Model-free drafts side by side: our `--draft ngram` and llama.cpp's n-gram speculative decoding.

    python scripts/ngram_llamacpp.py --bin LLAMA_CPP/build/bin --out bench-results/local-2core/issue16/ngram-llamacpp
        [--model qwen2.5-coder-1.5b] [--sets code,summary] [--rounds 3] [-n 64] [-t 2] [--draft-max 2]

One sitting, the rounds interleaved: per prompt set, `pipeinfer-cpu bench` with `single`, `speculative`
and `pipeinfer` (1 target rank with T threads, the n-gram draft in the head), then llama.cpp's
`llama-speculative-simple --spec-type ngram-simple | ngram-map-k | ngram-mod | ngram-cache` and
`llama-bench` on the same prompts (each rendered with the model's chat template, as `--prompt-sets`
runs them), built from the vendored llama.cpp of the same llama-cpp-python sdist. Greedy; the draft
length capped at --draft-max for both (2: the longest lossless run on the Qwen pair, README).
Writes OUT/ngram-llamacpp.json and .md (medians of tok/s; acceptance as each tool counts it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_baseline import plain_generation, speculative  # noqa: E402

from pipeinfer_cpu.app.prompt_sets import prompt_sets  # noqa: E402
from pipeinfer_cpu.llama.runtime import Vocab  # noqa: E402
from pipeinfer_cpu.modelfiles.registry import resolve_model  # noqa: E402
from pipeinfer_cpu.stats import markdown_table  # noqa: E402

LLAMA_CPP_NGRAMS = ("ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")


def rendered(model: Path, prompts: tuple[str, ...]) -> list[str]:
    """Each prompt as one user turn in the model's chat template, as text (special tokens parsed back)."""
    vocab = Vocab(model)
    try:
        return [vocab.apply_chat_template([("user", p)]) for p in prompts]
    finally:
        vocab.close()


def ours(model: str, name: str, out: Path, n: int, threads: int, draft_max: int) -> list[dict]:
    command = [sys.executable, "-m", "pipeinfer_cpu", "bench", "--model", model, "--draft", "ngram",
               "--modes", "single,speculative,pipeinfer", "--stages", "1", "-t", str(threads), "-n", str(n),
               "--draft-max", str(draft_max), "--prompt-sets", name, "--out", str(out)]
    print(" ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads((out / "bench.json").read_text())["modes"]
    return [{"label": row["label"].split("] ", 1)[1], "decode_tok_s": row["summary"]["decode_tok_s"],
             "acceptance": row["summary"].get("acceptance"), "command": row["command"]} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--sets", default="code,summary")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("-t", type=int, default=2)
    parser.add_argument("--draft-max", type=int, default=2)
    args = parser.parse_args()
    model = resolve_model(args.model)
    sets = prompt_sets(args.sets)
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in sets}
    for index in range(args.rounds):
        for name, prompts in sets.items():
            rows = ours(args.model, name, args.out / f"r{index}-{name}", args.n, args.t, args.draft_max)
            texts = rendered(model, prompts)
            rows += [speculative(args.bin, model, None, texts, args.n, args.t, args.draft_max, kind)
                     for kind in LLAMA_CPP_NGRAMS]
            rows.append(plain_generation(args.bin, model, args.n, args.t))
            for row in rows:
                runs[name].setdefault(row["label"], []).append(row)
    table = [{"set": name, "row": label, "tok/s (median)": statistics.median(r["decode_tok_s"] for r in rows),
              "rounds": len(rows), "acceptance": rows[-1].get("acceptance")}
             for name, by_label in runs.items() for label, rows in by_label.items()]
    report = {"model": str(model), "rounds": args.rounds, "n": args.n, "threads": args.t,
              "draft_max": args.draft_max, "table": table, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ngram-llamacpp.json").write_text(json.dumps(report, indent=1))
    text = (f"# Model-free drafts, {Path(model).name}, {args.t} threads, draft max {args.draft_max}, "
            f"{args.n} tokens x 4 prompts, {args.rounds} interleaved rounds\n\n{markdown_table(table, list(table[0]))}\n")
    (args.out / "ngram-llamacpp.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
