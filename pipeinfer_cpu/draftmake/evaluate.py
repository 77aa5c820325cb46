"""How good a draft is, measured with llama.cpp through our own runtime: teacher-forced top-1
agreement with the target on held-out prompts, and the cost ratio (target time per token over the
draft's)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeinfer_cpu.llama.runtime import Stage, StageConfig, Vocab, plain_greedy_tokens_per_s


@dataclass(frozen=True)
class Agreement:
    positions: int
    agreed: int

    @property
    def rate(self) -> float:
        return self.agreed / max(self.positions, 1)


def whole_model(path: Path, n_ctx: int, n_threads: int) -> Stage:
    """A llama.cpp context over a whole model (one stage, first and last), 64-token batches."""
    return Stage(StageConfig(path=path, is_first=True, is_last=True, n_ctx=n_ctx, n_batch=64, n_threads=n_threads))


def sequence_logits(stage: Stage, tokens: Sequence[int]) -> np.ndarray:
    """Logits at every position of `tokens` [n, n_vocab], fed in batches into a fresh cache."""
    stage.clear()
    step, rows = stage.config.n_batch, []
    for start in range(0, len(tokens), step):
        chunk = list(tokens[start:start + step])
        rows.append(stage.decode(list(range(start, start + len(chunk))), [[0]] * len(chunk), tokens=chunk))
    return np.concatenate(rows)


def greedy_continuation(stage: Stage, prompt: Sequence[int], n_tokens: int, is_end) -> list[int]:
    """The prompt followed by the model's own greedy answer (up to `n_tokens`, stopping at an end token)."""
    tokens = list(prompt)
    logits = sequence_logits(stage, tokens)[-1]
    for _ in range(n_tokens):
        token = int(np.argmax(logits))
        if is_end(token):
            break
        tokens.append(token)
        logits = stage.decode([len(tokens) - 1], [[0]], tokens=[token])[-1]
    return tokens


def chat_prompt(target: Path, text: str) -> list[int]:
    """One user turn in the target's chat template, as token ids."""
    vocab = Vocab(target)
    try:
        return vocab.chat_tokens([("user", text)])
    finally:
        vocab.close()


def held_out_sequences(target: Path, prompts: Sequence[str], n_tokens: int,
                       n_threads: int = 1) -> list[tuple[int, list[int]]]:
    """(prompt length, prompt + the target's greedy answer) for each chat prompt."""
    vocab, stage = Vocab(target), whole_model(target, 1024, n_threads)
    try:
        out = []
        for prompt in prompts:
            tokens = vocab.chat_tokens([("user", prompt)])
            out.append((len(tokens), greedy_continuation(stage, tokens, n_tokens, vocab.is_end)))
        return out
    finally:
        stage.close()
        vocab.close()


def agreement(target: Path, draft: Path, sequences: Sequence[tuple[int, list[int]]], n_threads: int = 1) -> Agreement:
    """Teacher-forced top-1 agreement over the answer positions (the last prompt token onwards: those
    are the positions a draft predicts the answer from)."""
    positions = agreed = 0
    stages = [whole_model(path, 1024, n_threads) for path in (target, draft)]
    try:
        for n_prompt, tokens in sequences:
            picks = [sequence_logits(stage, tokens)[n_prompt - 1:].argmax(1) for stage in stages]
            positions += len(picks[0])
            agreed += int((picks[0] == picks[1]).sum())
    finally:
        for stage in stages:
            stage.close()
    return Agreement(positions, agreed)


def cost_ratio(target: Path, draft: Path, prompt: list[int], n_tokens: int, n_threads: int, repeats: int = 3) -> dict:
    """Plain greedy decode speed of each (interleaved runs, medians) and target ms/token over draft ms/token."""
    runs: dict[str, list[float]] = {"target": [], "draft": []}
    for _ in range(repeats):
        for name, path in (("target", target), ("draft", draft)):
            runs[name].append(plain_greedy_tokens_per_s(path, prompt, n_tokens, n_threads))
    speeds = {name: statistics.median(values) for name, values in runs.items()}
    return {"target_tok_s": speeds["target"], "draft_tok_s": speeds["draft"],
            "cost_ratio": speeds["draft"] / speeds["target"], "runs": runs, "threads": n_threads}
