"""How much do the lossy wire dtypes (--wire-dtype f16, q8) change a real model's output?

    python scripts/wire_fidelity.py [--model NAME ...] [--tokens 2048] [--batch-size 256] [--generate 200]
        [--threads 2] [--out bench-results/local-2core/wire-fidelity]

Each model is split into two stages in this process (the shards the pipeline runs, modelfiles/shards.py;
llama/runtime.py's Stage; no MPI). Stage 1 runs once; its hidden states go through each wire dtype's
encode and decode (wire/hidden.py, exactly what a run message carries) into one stage-2 context per dtype.

* Teacher forcing: the first --tokens tokens of real text (this repository's README.md and docs/, tokenized
  by the model; the text's SHA-256 is recorded) in chunks of --batch-size with the KV cache. Per dtype,
  against f32: top-1 agreement (positions whose argmax is f32's), max and mean |logit difference|, mean
  KL(f32 || dtype), and the perplexity of the text.
* Greedy generation: --generate tokens from each prompt with f32 and with the dtype; the first index where
  the tokens differ (none: the same tokens).

f32 is the reference; a two-stage f32 pipeline equals the whole model bit for bit (tests/test_wire_dtype.py).
A control row, f32+1ulp, moves every hidden value by one float32 ulp: the floor that any change reaches.
Writes wire-fidelity.json and table.md (with the command) to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeinfer_cpu.app.bench import machine_description
from pipeinfer_cpu.llama.runtime import Stage, StageConfig, Vocab
from pipeinfer_cpu.llama.settings import WIRE_DTYPES
from pipeinfer_cpu.modelfiles.models import check_supported, read_model_info
from pipeinfer_cpu.modelfiles.planning import split_layers
from pipeinfer_cpu.modelfiles.registry import EMBEDDED_NAME, resolve_model
from pipeinfer_cpu.modelfiles.shards import shard_model
from pipeinfer_cpu.wire import hidden as H

REPO = Path(__file__).resolve().parent.parent
TEXT_FILES = ("README.md", "docs/compress.md")
PROMPTS = (
    "The printing press changed Europe because",
    "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
)
# Not a wire dtype: every value moved by one ulp (float32's smallest step, 1.2e-7 relative), the least
# change at all. llama.cpp quantises a Q4/Q5/Q8 model's activations to 8 bits before its matrix products,
# so a change this small already moves logits; the lossy dtypes are read against this floor.
ULP = "f32+1ulp"
VARIANTS = (*WIRE_DTYPES, ULP)


def over_the_wire(hidden: np.ndarray, dtype: str) -> np.ndarray:
    """What the next stage receives (for ULP: the control above)."""
    if dtype == ULP:
        return np.nextafter(hidden, np.float32(np.inf)).astype(np.float32)
    return H.decode(H.encode(hidden, dtype), dtype, hidden.shape)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class Split:
    """The model as two in-process stages: one stage 1, one stage 2 per variant (the same shard, mmap'd)."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int, n_threads: int) -> None:
        info = read_model_info(path)
        check_supported(info)
        self.plan = shard_model(info, split_layers(info.n_layer, (1.0, 1.0)))
        first, second = self.plan.shards
        self.n_batch = n_batch
        self.vocab = Vocab(path)
        self.first = Stage(StageConfig(Path(first.path), True, False, n_ctx, n_batch, n_threads))
        self.second = {d: Stage(StageConfig(Path(second.path), False, True, n_ctx, n_batch, n_threads))
                       for d in VARIANTS}

    def clear(self) -> None:
        for stage in (self.first, *self.second.values()):
            stage.clear()

    def close(self) -> None:
        self.vocab.close()
        for stage in (self.first, *self.second.values()):
            stage.close()


def teacher_forced(split: Split, tokens: list[int]) -> dict:
    """Every position's logits under each dtype, compared with f32's chunk by chunk."""
    split.clear()
    sums = {d: {"agree": 0, "abs_sum": 0.0, "abs_max": 0.0, "kl_sum": 0.0, "nll_sum": 0.0} for d in VARIANTS}
    codec_s = {d: 0.0 for d in VARIANTS}
    hidden_max, clipped, n_values = 0.0, 0, 0
    for start in range(0, len(tokens), split.n_batch):
        chunk = tokens[start:start + split.n_batch]
        positions, seqs = range(start, start + len(chunk)), [(0,)] * len(chunk)
        hidden = split.first.decode(positions, seqs, tokens=chunk)
        hidden_max = max(hidden_max, float(np.abs(hidden).max()))
        clipped += int((np.abs(hidden) > H.F16_MAX).sum())
        n_values += hidden.size
        targets = np.array(tokens[start + 1:start + len(chunk) + 1])  # the last position of the text has none
        reference = None
        for dtype in VARIANTS:
            began = time.perf_counter()
            received = over_the_wire(hidden, dtype)
            codec_s[dtype] += time.perf_counter() - began
            logits = split.second[dtype].decode(positions, seqs, hidden=received, outputs=[True] * len(chunk))
            logp = log_softmax(logits)
            cell = sums[dtype]
            cell["nll_sum"] -= float(logp[np.arange(len(targets)), targets].sum())
            if reference is None:
                reference = (logits, logp)
            ref_logits, ref_logp = reference
            diff = np.abs(logits - ref_logits)
            cell["agree"] += int((logits.argmax(1) == ref_logits.argmax(1)).sum())
            cell["abs_sum"] += float(diff.sum(dtype=np.float64))
            cell["abs_max"] = max(cell["abs_max"], float(diff.max()))
            cell["kl_sum"] += float((np.exp(ref_logp) * (ref_logp - logp)).sum(dtype=np.float64))
    n, n_vocab = len(tokens), split.second["f32"].n_vocab
    by_dtype = {d: {"top1_agreement": c["agree"] / n, "max_abs_dlogit": c["abs_max"],
                    "mean_abs_dlogit": c["abs_sum"] / (n * n_vocab), "mean_kl": c["kl_sum"] / n,
                    "perplexity": float(np.exp(c["nll_sum"] / (n - 1))),
                    "codec_us_per_token": codec_s[d] / n * 1e6}
                for d, c in sums.items()}
    return {"positions": n, "hidden_abs_max": hidden_max, "f16_clipped_values": clipped,
            "hidden_values": n_values, "by_dtype": by_dtype}


def greedy(split: Split, dtype: str, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy continuation through stage 1 -> the wire in `dtype` -> stage 2 (stops at an end token)."""
    split.first.clear()
    second = split.second[dtype]
    second.clear()
    logits = None
    for start in range(0, len(prompt), split.n_batch):
        chunk = prompt[start:start + split.n_batch]
        positions, seqs = range(start, start + len(chunk)), [(0,)] * len(chunk)
        hidden = split.first.decode(positions, seqs, tokens=chunk)
        outputs = [False] * (len(chunk) - 1) + [True]
        logits = second.decode(positions, seqs, hidden=over_the_wire(hidden, dtype), outputs=outputs)
    out: list[int] = []
    for position in range(len(prompt), len(prompt) + n_tokens):
        out.append(int(np.argmax(logits[-1])))
        if split.vocab.is_end(out[-1]):
            break
        hidden = split.first.decode([position], [(0,)], tokens=out[-1:])
        logits = second.decode([position], [(0,)], hidden=over_the_wire(hidden, dtype))
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(name: str, args: argparse.Namespace, text: str) -> dict:
    path = resolve_model(None if name == EMBEDDED_NAME else name)
    split = Split(path, n_ctx=args.tokens + args.generate + 64, n_batch=args.batch_size, n_threads=args.threads)
    try:
        tokens = split.vocab.text_tokens(text, parse_special=False)[: args.tokens]
        if len(tokens) < args.tokens:
            raise SystemExit(f"the text has only {len(tokens)} tokens for {name}; fewer --tokens, or more text")
        began = time.perf_counter()
        forced = teacher_forced(split, tokens)
        forced["seconds"] = time.perf_counter() - began
        generations = []
        for prompt in PROMPTS:
            ids = split.vocab.text_tokens(prompt)
            runs = {d: greedy(split, d, ids, args.generate) for d in VARIANTS}
            generations.append({"prompt": prompt, "tokens_f32": len(runs["f32"]),
                                "first_difference": {d: first_difference(runs["f32"], runs[d]) for d in VARIANTS}})
    finally:
        split.close()
    first, second = split.plan.shards
    return {"model": name, "file": path.name, "arch": split.plan.arch, "n_layer": split.plan.n_layer,
            "n_embd": split.first.n_embd, "n_vocab": split.second["f32"].n_vocab,
            "stages": [[first.start, first.end], [second.start, second.end]],
            "bytes_per_token": {d: H.encoded_nbytes((1, split.first.n_embd), d) for d in WIRE_DTYPES},
            "teacher_forced": forced, "greedy": generations}


def table(results: list[dict], command: str, machine: str, text_note: str) -> str:
    lines = ["# Wire dtype fidelity (hidden states between two stages)", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ", f"Text: {text_note}", "",
             "| model | wire | bytes/token | top-1 agreement | max \\|Δlogit\\| | mean \\|Δlogit\\| | mean KL | "
             "perplexity | greedy: first differing token |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        forced = r["teacher_forced"]
        for dtype in VARIANTS:
            m = forced["by_dtype"][dtype]
            diverged = ", ".join("none" if g["first_difference"][dtype] is None else str(g["first_difference"][dtype])
                                 for g in r["greedy"])
            size = r["bytes_per_token"].get(dtype, "(control)")
            lines.append(f"| {r['model']} ({r['arch']}, n_embd {r['n_embd']}) | {dtype} | {size} "
                         f"| {m['top1_agreement']:.4f} | {m['max_abs_dlogit']:.3g} | {m['mean_abs_dlogit']:.3g} "
                         f"| {m['mean_kl']:.2g} | {m['perplexity']:.3f} | {diverged} |")
    lines += ["", f"Teacher-forced positions per model: {results[0]['teacher_forced']['positions']}. Greedy: the "
              f"first differing index of each of the {len(PROMPTS)} prompts' continuations (up to "
              f"{results[0]['generate']} tokens; none: the same tokens as f32). {ULP}: not a wire dtype but "
              "a control, every hidden value moved by one float32 ulp: the floor any change at all reaches.", ""]
    for r in results:
        forced = r["teacher_forced"]
        lines.append(f"- {r['model']}: stages {r['stages']}; largest |hidden value| {forced['hidden_abs_max']:.0f}; "
                     f"values clipped by f16 {forced['f16_clipped_values']} of {forced['hidden_values']}; "
                     f"f32 greedy lengths {[g['tokens_f32'] for g in r['greedy']]}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help=f"model name or GGUF (repeatable; default: {EMBEDDED_NAME})")
    parser.add_argument("--tokens", type=int, default=2048, help="teacher-forced tokens of text (at least 1000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--generate", type=int, default=200, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results/local-2core/wire-fidelity")
    args = parser.parse_args()
    if args.tokens < 1000:
        parser.error("--tokens must be at least 1000")
    text = "\n\n".join((REPO / name).read_text() for name in TEXT_FILES)
    digest = hashlib.sha256(text.encode()).hexdigest()
    results = []
    for name in args.model or [EMBEDDED_NAME]:
        print(f"wire fidelity: {name} ...", file=sys.stderr, flush=True)
        results.append({**measure(name, args, text), "generate": args.generate})
    command = "python scripts/wire_fidelity.py " + " ".join(sys.argv[1:])
    machine = f"{machine_description()}; {args.threads} threads per stage, stages run in turn"
    text_note = f"{' + '.join(TEXT_FILES)} (sha256 {digest[:16]}), first {args.tokens} tokens"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "machine": machine, "text_files": TEXT_FILES, "text_sha256": digest,
              "tokens": args.tokens, "batch_size": args.batch_size, "prompts": PROMPTS, "results": results}
    (args.out / "wire-fidelity.json").write_text(json.dumps(report, indent=2))
    markdown = table(results, command, machine, text_note)
    (args.out / "table.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
