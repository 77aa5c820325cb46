"""`pipeinfer-cpu draft`: make a draft model for a target that has none (`draft distill`) and measure a
draft against its target (`draft evaluate`). A thin layer over pipeinfer_cpu/draftmake."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeinfer_cpu.errors import PipeinferError, one_line_errors

friendly_errors = one_line_errors(PipeinferError)


@click.group()
def draft() -> None:
    """Draft models for `speculative` and `pipeinfer`."""


@draft.command("distill")
@click.option("--target", "-m", help="Target GGUF file or model name (default: the embedded model).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="The draft GGUF to write (the export stage).")
@click.option("--state", type=click.Path(path_type=Path),
              help="Working folder shared by the stages (default: OUT with .distill appended).")
@click.option("--stage", "stages", type=click.Choice(["all", "prepare", "train", "export"]), multiple=True,
              default=("all",), show_default=True, help="Run only these stages (repeatable).")
@click.option("--layers", type=int, help="Draft blocks, taken evenly from the target's to start from [6].")
@click.option("--minutes", type=float, help="Training time [7].")
@click.option("--steps", type=int, help="Stop training after this many steps (0: when the minutes are spent).")
@click.option("--quant", type=click.Choice(["q8_0", "f16", "q4_0"]), default="q8_0", show_default=True,
              help="The draft's block matrices (the embedding stays the target's own).")
@click.option("--device", default="auto", show_default=True, help="Torch device for training (auto: cuda if any).")
@click.option("--debug", is_flag=True)
@friendly_errors
def distill(target, out, state, stages, layers, minutes, steps, quant, device, debug):
    """Distil a small draft from TARGET: same architecture family and tokenizer, the target's own embedding,
    blocks initialised from some of the target's and trained so that the draft's next-token distribution
    matches the target's (KL on the target's logits) over text the target writes itself from varied prompts.

    \b
    The stages meet in the --state folder, so each can run on its own machine:
      prepare  check the target (llama family), tokenise the prompts, write settings.json   (CPU, seconds)
      train    the target writes its text, the draft learns it; resumes from saved weights  (needs torch;
               a GPU: about 7 minutes on an H200 for the default model; on a CPU, hours)
      export   write the GGUF (llama.cpp loads it like any model)                            (CPU, seconds)
    On a machine with only python, torch, numpy and gguf, the train stage alone is
    `python -m pipeinfer_cpu.draftmake.train STATE --target T.gguf`: carry STATE there and bring its
    draft-weights-*.npz back before the export stage."""
    from pipeinfer_cpu.draftmake.distill import STAGES, DistillPlan, distill as run_distill
    from pipeinfer_cpu.errors import UserError
    from pipeinfer_cpu.modelfiles.registry import resolve_model

    if state is None and out is None:
        raise UserError("give -o (the draft to write) or --state (the working folder)")
    given = {"draft_layers": layers, "minutes": minutes, "steps": steps}
    plan = DistillPlan(target=resolve_model(target), state=state or out.with_name(out.name + ".distill"), out=out,
                       stages=STAGES if "all" in stages else tuple(s for s in STAGES if s in stages), quant=quant,
                       device=device, settings={k: v for k, v in given.items() if v is not None})
    report = run_distill(plan)
    click.echo(json.dumps(report, indent=1))


@draft.command("evaluate")
@click.option("--target", "-m", help="Target GGUF file or model name (default: the embedded model).")
@click.option("--draft", "draft_model", required=True, help="Draft GGUF file or model name.")
@click.option("--n-predict", "-n", "n_tokens", type=int, default=96, show_default=True,
              help="Greedy answer tokens per held-out prompt.")
@click.option("--prompt-sets", default="all", show_default=True, help="Held-out prompts: the bench prompt sets.")
@click.option("--threads", "-t", type=int, default=1, show_default=True, help="Threads for the speed runs.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results here.")
@click.option("--debug", is_flag=True)
@friendly_errors
def evaluate(target, draft_model, n_tokens, prompt_sets, threads, json_path, debug):
    """Teacher-forced top-1 agreement of DRAFT with TARGET over the target's greedy answers to held-out
    prompts, and the cost ratio (target ms/token over draft ms/token, plain greedy decoding with llama.cpp of
    64 tokens after the last set's first prompt, three interleaved runs each, medians)."""
    from pipeinfer_cpu.app.prompt_sets import prompt_sets as named_sets
    from pipeinfer_cpu.draftmake.evaluate import agreement, chat_prompt, cost_ratio, held_out_sequences
    from pipeinfer_cpu.modelfiles.registry import resolve_model

    target_path, draft_path = resolve_model(target), resolve_model(draft_model)
    result: dict = {"target": str(target_path), "draft": str(draft_path), "n_predict": n_tokens, "sets": {}}
    for name, prompts in named_sets(prompt_sets).items():
        measured = agreement(target_path, draft_path, held_out_sequences(target_path, prompts, n_tokens))
        result["sets"][name] = {"agreement": measured.rate, "positions": measured.positions}
    total = sum(s["positions"] for s in result["sets"].values())
    result["agreement"] = sum(s["agreement"] * s["positions"] for s in result["sets"].values()) / total
    speed_prompt = chat_prompt(target_path, list(named_sets(prompt_sets).values())[-1][0])  # all: a story
    result["speed"] = cost_ratio(target_path, draft_path, speed_prompt, 64, threads)
    click.echo(json.dumps(result, indent=1))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
