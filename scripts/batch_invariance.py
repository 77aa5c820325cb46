"""Are a model's logits for a row the same whatever the batch it is decoded in? Speculation needs it.

    python scripts/batch_invariance.py MODEL.gguf [MODEL.gguf ...] [--threads 1] [--tokens 32] [--no-repack]
        [--out bench-results/.../batch-invariance.json]

Verifying draft tokens decodes k rows in one batch; `speculative` and `pipeinfer` reproduce
`single`'s text only if every row's logits equal those of one-token decoding. For each prompt this
decodes a greedy continuation one token at a time (the reference), then teacher-forces the same
tokens in chunks of k = 2..8 from a fresh cache and compares every row: the largest absolute logit
difference, and how many rows change their argmax. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipeinfer_cpu.llama.runtime import Stage, StageConfig, Vocab
from pipeinfer_cpu.llama.settings import LlamaSettings

PROMPTS = (
    "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences why the sky is blue.",
    "import numpy as np\n\n# moving average of an array\ndef moving_average(x, window):\n",
)
CHUNKS = (2, 3, 4, 5, 6, 7, 8)


def reference_rows(stage: Stage, prompt: list[int], n_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation one token at a time, and the logits row of every forced position."""
    n = len(prompt)
    rows = [stage.decode(range(n), [(0,)] * n, tokens=prompt, outputs=[False] * (n - 1) + [True])[-1]]
    tokens = []
    for position in range(n, n + n_tokens):
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(stage.decode([position], [(0,)], tokens=tokens[-1:])[-1])
    return tokens, np.stack(rows[1:])


def chunked_rows(stage: Stage, prompt: list[int], tokens: list[int], chunk: int) -> np.ndarray:
    """The same forced tokens decoded `chunk` rows at a time (every row an output)."""
    n = len(prompt)
    stage.decode(range(n), [(0,)] * n, tokens=prompt, outputs=[False] * (n - 1) + [True])
    rows = []
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]
        rows.append(stage.decode(range(n + start, n + start + len(part)), [(0,)] * len(part), tokens=part))
    return np.concatenate(rows)


def measure(path: Path, n_threads: int, n_tokens: int, llama: LlamaSettings) -> dict:
    vocab = Vocab(path)
    prompts = [vocab.text_tokens(p) for p in PROMPTS]
    vocab.close()
    stage = Stage(StageConfig(path, is_first=True, is_last=True, n_ctx=512, n_batch=64, n_threads=n_threads,
                              llama=llama))
    results = {k: {"max_abs_diff": 0.0, "argmax_changes": 0, "rows": 0} for k in CHUNKS}
    try:
        for prompt in prompts:
            stage.clear()
            tokens, reference = reference_rows(stage, prompt, n_tokens)
            for chunk in CHUNKS:
                stage.clear()
                rows = chunked_rows(stage, prompt, tokens, chunk)
                cell = results[chunk]
                cell["max_abs_diff"] = max(cell["max_abs_diff"], float(np.abs(rows - reference).max()))
                cell["argmax_changes"] += int((rows.argmax(1) != reference.argmax(1)).sum())
                cell["rows"] += len(tokens)
    finally:
        stage.close()
    return {"model": path.name, "size_bytes": path.stat().st_size, "threads": n_threads, "repack": llama.repack,
            "prompts": len(prompts), "tokens_per_prompt": n_tokens, "by_chunk": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-repack", dest="repack", action="store_false",
                        help="without llama.cpp's repacked weights (llama/settings.py)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    llama = LlamaSettings(repack=args.repack)
    report = [measure(path, args.threads, args.tokens, llama) for path in args.models]
    for entry in report:
        print(f"{entry['model']}: {entry['prompts']} prompts x {entry['tokens_per_prompt']} forced tokens, "
              f"{entry['threads']} threads, repacked weights {'on' if entry['repack'] else 'off'}")
        for chunk, cell in entry["by_chunk"].items():
            print(f"  batch {chunk}: max |logit diff| {cell['max_abs_diff']:.3g}, "
                  f"argmax changed in {cell['argmax_changes']} of {cell['rows']} rows")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
