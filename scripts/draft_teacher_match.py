"""How closely the torch copy of a target (dequantised from its GGUF by gguf-py, as `draft distill`'s
training uses it) matches llama.cpp's own logits, teacher-forced over the target's greedy answers.

    python scripts/draft_teacher_match.py [--target T.gguf] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pipeinfer_cpu.app.prompt_sets import PROMPT_SETS
from pipeinfer_cpu.draftmake import evaluate
from pipeinfer_cpu.draftmake.net import Decoder, causal_mask, positions_of
from pipeinfer_cpu.draftmake.targetfile import open_target, read_weights
from pipeinfer_cpu.modelfiles.registry import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target")
    parser.add_argument("--out", type=Path)
    parser.add_argument("-n", type=int, default=48)
    args = parser.parse_args()
    target = resolve_model(args.target)
    reader, shape = open_target(target)
    model = Decoder(shape, read_weights(reader))
    prompts = [prompts[0] for prompts in PROMPT_SETS.values()]
    stage = evaluate.whole_model(target, 1024, 1)
    rows = []
    for _, tokens in evaluate.held_out_sequences(target, prompts, args.n):
        theirs = evaluate.sequence_logits(stage, tokens)
        ids = torch.tensor([tokens])
        valid = torch.ones_like(ids, dtype=torch.bool)
        with torch.no_grad():
            ours = model(ids, positions_of(valid), causal_mask(valid))[0].numpy()
        rows.append({"positions": len(tokens), "rel_l2": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
                     "max_abs": float(np.abs(ours - theirs).max()), "logit_std": float(theirs.std()),
                     "argmax_agreement": float((ours.argmax(1) == theirs.argmax(1)).mean())})
    report = {"target": str(target), "prompts": rows,
              "argmax_agreement": sum(r["argmax_agreement"] * r["positions"] for r in rows)
              / sum(r["positions"] for r in rows)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
