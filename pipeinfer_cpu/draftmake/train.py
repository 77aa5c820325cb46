"""The GPU step of `draft distill`: the target writes its own text, then the draft learns the target's
next-token distribution on it (KL divergence on the target's logits). Resumable: the draft's weights
go to the state folder as they improve, and a later run starts from them.

Run by `pipeinfer-cpu draft distill` (any torch device) or alone where only torch, numpy and gguf
exist: `python -m pipeinfer_cpu.draftmake.train STATE_DIR [--minutes M]`. The state folder holds
`prompts.npz` and `settings.json` (written by `draft distill --stage prepare`) and the target GGUF."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeinfer_cpu.draftmake.net import Decoder, causal_mask, draft_weights, positions_of, spread_layers
from pipeinfer_cpu.draftmake.settings import TrainSettings
from pipeinfer_cpu.draftmake.targetfile import DecoderShape, open_target, read_weights
from pipeinfer_cpu.draftmake.weightfiles import load_draft, save_weights

TEMPERATURES = (0.0, 0.5, 0.8, 1.0)  # greedy text is what drafts meet most; sampled text widens it


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# -- generation --------------------------------------------------------------------------------

def _left_padded(rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):], valid[i, width - len(row):] = row, True
    return torch.as_tensor(tokens, device=device), torch.as_tensor(valid, device=device)


def _sample(logits: torch.Tensor, temps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    greedy = logits.argmax(-1)
    probs = torch.softmax(logits.float() / temps.clamp(min=1e-3)[:, None], -1)
    sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.where(temps > 0, sampled, greedy)


@torch.no_grad()
def generate(model: Decoder, prompts: list[np.ndarray], n_new: int, temps: np.ndarray, ends: torch.Tensor,
             generator: torch.Generator) -> list[np.ndarray]:
    """Each prompt followed by the model's answer, cut after its first end token (one batch, KV cache)."""
    device = ends.device
    tokens, valid = _left_padded(prompts, device)
    b, width = tokens.shape
    cache = model.new_cache(b, width + n_new)
    positions = positions_of(valid)
    logits = model.head(model.hidden(tokens, positions, causal_mask(valid), cache, 0)[:, -1])  # the last only
    temps_t = torch.as_tensor(temps, device=device, dtype=torch.float32)
    position = positions[:, -1]
    out, keys_valid = [], valid
    for step in range(n_new):
        token = _sample(logits, temps_t, generator)
        out.append(token)
        position = position + 1
        keys_valid = torch.cat([keys_valid, torch.ones(b, 1, dtype=torch.bool, device=device)], 1)
        logits = model(token[:, None], position[:, None], keys_valid[:, None, None, :], cache, width + step)[:, -1]
    answers = torch.stack(out, 1).cpu().numpy()
    return [np.concatenate([p, _until_end(a, ends.cpu().numpy())]) for p, a in zip(prompts, answers)]


def _until_end(answer: np.ndarray, ends: np.ndarray) -> np.ndarray:
    hits = np.flatnonzero(np.isin(answer, ends))
    return answer if len(hits) == 0 else answer[:hits[0] + 1]


def _in_batches(model, prompts, n_new, temps, ends, generator, batch) -> list[np.ndarray]:
    out = []
    for start in range(0, len(prompts), batch):
        out += generate(model, prompts[start:start + batch], n_new, temps[start:start + batch], ends, generator)
        log(f"generated {len(out)}/{len(prompts)}")
    return out


def write_corpus(model: Decoder, prompts: dict, settings: TrainSettings, device) -> list[np.ndarray]:
    """The target's own text: its answers to the templated prompts (each `copies` times, each time at a
    temperature drawn from TEMPERATURES) and to questions it first writes itself."""
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    ends = torch.as_tensor(prompts["ends"], device=device)
    before, after = prompts["question_before"], prompts["question_after"]
    asked = _in_batches(model, [before] * settings.questions, 48, np.full(settings.questions, 1.0), ends,
                        generator, settings.gen_batch)
    # a question counts when the target ended it within 48 tokens; its end token makes way for the frame
    finished = [q for q in asked if np.isin(q[-1], prompts["ends"]) and len(q) > len(before) + 3]
    questions = [np.concatenate([q[:-1], after]) for q in finished]
    templated = [row[:n] for row, n in zip(prompts["tokens"], prompts["lengths"])]
    templated = templated[:settings.max_prompts or len(templated)] * settings.copies
    everything = templated + questions
    temps = np.array(TEMPERATURES)[rng.integers(0, len(TEMPERATURES), len(everything))]
    log(f"{len(questions)} self-written questions, {len(everything)} prompts in all")
    return _in_batches(model, everything, settings.answer_tokens, temps, ends, generator, settings.gen_batch)


def as_rows(texts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 rows and their lengths."""
    width = max(len(t) for t in texts)
    rows = np.zeros((len(texts), width), dtype=np.int64)
    for i, t in enumerate(texts):
        rows[i, :len(t)] = t
    return rows, np.array([len(t) for t in texts])


# -- distillation ------------------------------------------------------------------------------

def kl_to_target(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of KL(target || draft), in nats."""
    target_logp = torch.log_softmax(target_logits.float(), -1)
    draft_logp = torch.log_softmax(draft_logits.float(), -1)
    kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def _batch(rows, lengths, index, device):
    tokens = torch.as_tensor(rows[index], device=device)
    row_lengths = torch.as_tensor(lengths[index], device=device)
    valid = torch.arange(rows.shape[1], device=device)[None, :] < row_lengths[:, None]
    width = int(lengths[index].max())
    return tokens[:, :width], valid[:, :width]


def _forward(model: Decoder, tokens, valid) -> torch.Tensor:
    with torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16, enabled=tokens.device.type == "cuda"):
        return model(tokens, positions_of(valid), causal_mask(valid))


@torch.no_grad()
def agreement(target: Decoder, draft: Decoder, rows, lengths, device, batch: int) -> float:
    """Teacher-forced top-1 agreement over every real position of the rows."""
    agreed = total = 0
    for start in range(0, len(rows), batch):
        tokens, valid = _batch(rows, lengths, np.arange(start, min(start + batch, len(rows))), device)
        same = _forward(target, tokens, valid).argmax(-1) == _forward(draft, tokens, valid).argmax(-1)
        agreed += int((same & valid).sum())
        total += int(valid.sum())
    return agreed / max(total, 1)


def _lr(settings: TrainSettings, step: int, elapsed: float, budget: float) -> float:
    """Warm-up, then a cosine over the run's time budget (steps are timed, not counted in advance)."""
    warm = min(1.0, (step + 1) / settings.warmup)
    return settings.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))


def distil(target: Decoder, draft: Decoder, rows, lengths, settings: TrainSettings, device, save,
           deadline: float = math.inf) -> dict:
    """Train `draft` until the time budget (or the `deadline`, a perf_counter time) is spent; `save(draft)`
    now and then and at the end."""
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.98),
                                  fused=device.startswith("cuda"))
    rng = np.random.default_rng(settings.seed + 1)
    started, step, losses = time.perf_counter(), 0, []
    budget = min(settings.minutes * 60, deadline - started)
    while (elapsed := time.perf_counter() - started) < budget and (settings.steps == 0 or step < settings.steps):
        for group in optimiser.param_groups:
            group["lr"] = _lr(settings, step, elapsed, budget)
        tokens, valid = _batch(rows, lengths, rng.integers(0, len(rows), settings.train_batch), device)
        with torch.no_grad():
            target_logits = _forward(target, tokens, valid)
        loss = kl_to_target(_forward(draft, tokens, valid), target_logits, valid.float())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 200 == 0:
            log(f"step {step} kl {np.mean(losses[-200:]):.4f} lr {optimiser.param_groups[0]['lr']:.2e}")
        if step % 2000 == 0:
            save(draft)
    save(draft)
    return {"steps": step, "seconds": time.perf_counter() - started, "kl_last_200": float(np.mean(losses[-200:]))}


# -- state -------------------------------------------------------------------------------------

def _own_weights(draft: Decoder) -> dict[str, np.ndarray]:
    """The draft's trained weights (not the embedding: that is the target's)."""
    return {n: w.detach().float().cpu().numpy() for n, w in draft.named_weights().items() if n != "token_embd.weight"}


def _draft(target_weights, shape: DecoderShape, settings: TrainSettings, state: Path, device) -> Decoder:
    saved = load_draft(state)
    if saved is None:
        weights = draft_weights(target_weights, spread_layers(shape.n_layer, settings.draft_layers))
        log(f"draft from target blocks {spread_layers(shape.n_layer, settings.draft_layers)}")
    else:
        weights = {"token_embd.weight": target_weights["token_embd.weight"], **saved}
        log("draft resumed from the state folder")
    return Decoder(shape.with_layers(settings.draft_layers), weights).to(device)


def run(state: Path, target_path: Path, settings: TrainSettings, device: str, deadline: float = math.inf) -> dict:
    """Generate the corpus (or reuse the one in `state`), distil, save; a summary."""
    torch.manual_seed(settings.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    reader, shape = open_target(target_path)
    target_weights = read_weights(reader)
    target = Decoder(shape, target_weights).to(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    target.requires_grad_(False)
    corpus = state / "corpus.npz"
    if corpus.exists():
        data = np.load(corpus)
        rows, lengths = data["rows"].astype(np.int64), data["lengths"]
    else:
        rows, lengths = as_rows(write_corpus(target, dict(np.load(state / "prompts.npz")), settings, device))
        np.savez(corpus, rows=rows.astype(np.int32), lengths=lengths)
    n_check = max(1, len(rows) // 50)  # the last 2% of the target's text: held out from training
    log(f"corpus: {len(rows)} texts, {int(lengths.sum())} tokens")
    draft = _draft(target_weights, shape, settings, state, device)
    summary = distil(target, draft, rows[:-n_check], lengths[:-n_check], settings, device,
                     lambda d: save_weights(_own_weights(d), state), deadline)
    summary["held_out_agreement"] = agreement(target, draft, rows[-n_check:], lengths[-n_check:], device,
                                              settings.train_batch)
    summary["corpus_tokens"] = int(lengths.sum())
    log(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state", type=Path)
    parser.add_argument("--target", type=Path, help="The target GGUF (default: target.gguf in the state folder).")
    parser.add_argument("--minutes", type=float, help="Training time (overrides settings.json).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--wall-minutes", type=float, default=math.inf,
                        help="End training so that the whole run ends within this (a lease's limit per call).")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.wall_minutes * 60 - 60  # a minute for the held-out check and saving
    settings = TrainSettings.load(args.state)
    if args.minutes is not None:
        settings = TrainSettings(**{**asdict(settings), "minutes": args.minutes})
    summary = run(args.state, args.target or args.state / "target.gguf", settings, args.device, deadline)
    (args.state / "train-summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
