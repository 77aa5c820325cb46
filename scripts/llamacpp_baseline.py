"""llama.cpp's own programs on the same models and prompts, beside `pipeinfer-cpu bench`'s rows.

    python scripts/llamacpp_baseline.py --bin LLAMA_CPP/build/bin --model TARGET.gguf --draft DRAFT.gguf \
        --prompts-file PROMPTS.txt [-n 64] [-t 2] [--draft-max 16] [--out DIR]

Build the programs from the vendored llama.cpp of the installed llama-cpp-python sdist, e.g.
`cmake -B build -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON && cmake --build build --target
llama-bench llama-speculative-simple`. Rows:

* `llama-bench -p 0 -n N -t T`: plain token generation speed of the target (its `tg` test).
* `llama-speculative-simple --spec-type draft-simple --temp 0` per prompt: llama.cpp's synchronous
  speculative decoding with the draft, greedy; decoded tokens over decode time (prompt excluded),
  and drafted/accepted tokens summed over the prompts.

Prompts are given as raw text, one per line (`\\n` stands for a newline), read by both programs
with special-token parsing, as `pipeinfer-cpu run` reads them. Writes llamacpp.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_COUNTS = {key: re.compile(rf"{key}\s*=\s*(\d+)") for key in ("n_draft", "n_drafted", "n_accept")}


def read_prompts(path: Path) -> list[str]:
    return [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]


def plain_generation(binary: Path, model: Path, n_tokens: int, threads: int) -> dict:
    command = [str(binary / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(n_tokens), "-t", str(threads),
               "-r", "3", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)[0]
    return {"label": f"llama-bench tg{n_tokens} ({threads} threads)", "command": " ".join(command),
            "decode_tok_s": result["avg_ts"]}


def speculative(binary: Path, model: Path, draft: Path | None, prompts: list[str], n_tokens: int, threads: int,
                draft_max: int, spec_type: str = "draft-simple") -> dict:
    """llama-speculative-simple, greedy, over the prompts: with a draft model (`draft-simple`) or
    one of llama.cpp's model-free drafts (`ngram-simple`, `ngram-map-k`, `ngram-mod`, `ngram-cache`)."""
    tokens = seconds = drafted = accepted = 0
    program = [str(binary / "llama-speculative-simple"), "-m", str(model)]
    drafting = ["-md", str(draft), "-td", str(threads)] if draft is not None else []
    settings = [*drafting, "-n", str(n_tokens), "-t", str(threads), "--temp", "0", "--spec-type", spec_type,
                "--spec-draft-n-max", str(draft_max), "-c", "2048"]
    for prompt in prompts:
        done = subprocess.run([*program, "-p", prompt, *settings], capture_output=True, text=True, check=True)
        log = done.stdout + done.stderr
        decoded = _DECODED.search(log)
        if decoded is None:
            raise RuntimeError(f"no timing line in llama-speculative-simple's output:\n{log[-2000:]}")
        tokens += int(decoded[1])
        seconds += float(decoded[2])
        drafted += int(_COUNTS["n_drafted"].search(log)[1])
        accepted += int(_COUNTS["n_accept"].search(log)[1])
    shown = " ".join([*program, "-p", "PROMPT", *settings])
    return {"label": f"llama-speculative-simple {spec_type}, draft max {draft_max} ({threads} threads)",
            "command": shown, "decode_tok_s": tokens / seconds, "tokens": tokens, "drafted": drafted,
            "accepted": accepted, "acceptance": accepted / drafted if drafted else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--prompts-file", type=Path, required=True)
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("-t", type=int, default=2)
    parser.add_argument("--draft-max", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prompts = read_prompts(args.prompts_file)
    rows = [plain_generation(args.bin, args.model, args.n, args.t),
            speculative(args.bin, args.model, args.draft, prompts, args.n, args.t, args.draft_max)]
    for row in rows:
        acceptance = f", acceptance {row['acceptance']:.2f}" if row.get("acceptance") is not None else ""
        print(f"{row['label']}: {row['decode_tok_s']:.1f} tok/s{acceptance}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "llamacpp.json").write_text(json.dumps({"prompts": prompts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
