"""`draft distill` as a library: prepare a state folder, train (the GPU step), export the GGUF.

The stages meet only in the state folder, so the training step can run on another machine (carry the
folder and the target GGUF there, bring the `draft-weights-*.npz` back) and each stage can be rerun:
training resumes from the weights it finds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeinfer_cpu.draftmake.corpus import write_prompts
from pipeinfer_cpu.draftmake.export import QUANTS, write_draft
from pipeinfer_cpu.draftmake.settings import TrainSettings
from pipeinfer_cpu.draftmake.targetfile import open_target, read_shape
from pipeinfer_cpu.errors import UserError

STAGES = ("prepare", "train", "export")


@dataclass(frozen=True)
class DistillPlan:
    target: Path
    state: Path
    out: Path | None = None
    stages: tuple[str, ...] = STAGES
    quant: str = "q8_0"
    device: str = "auto"  # a torch device; auto: cuda when there is one
    settings: dict | None = None  # TrainSettings fields (None: the defaults, or what the state holds)

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise UserError(f"unknown draft type {self.quant!r}: choose from {', '.join(QUANTS)}")
        if "export" in self.stages and self.out is None:
            raise UserError("the export stage needs an output file (-o)")


def prepare(target: Path, state: Path, settings: dict) -> None:
    """Check the target, then write the state folder: settings.json and the tokenised prompts."""
    shape = read_shape(target)
    layers = TrainSettings(**settings).draft_layers
    if not 0 < layers < shape.n_layer:
        raise UserError(f"a draft of {layers} blocks makes no sense for a target of {shape.n_layer}")
    state.mkdir(parents=True, exist_ok=True)
    write_prompts(target, state / "prompts.npz")
    (state / "settings.json").write_text(json.dumps({**settings, "target_shape": shape.as_dict()}, indent=1))


def train(target: Path, state: Path, device: str, settings: dict) -> dict:
    """The training step (needs torch): the target's text, then distillation; resumes from the state."""
    try:
        from pipeinfer_cpu.draftmake import train as training
    except ImportError as exc:
        raise UserError(f"training a draft needs torch ({exc}): pip install 'pipeinfer-cpu[compress]'") from exc
    if not (state / "settings.json").exists():
        raise UserError(f"{state} has no settings.json: run the prepare stage first")
    merged = TrainSettings(**{**asdict(TrainSettings.load(state)), **settings})
    if device == "auto":
        device = "cuda" if training.torch.cuda.is_available() else "cpu"
    return training.run(state, target, merged, device)


def export(target: Path, state: Path, out: Path, quant: str) -> Path:
    """Write the draft GGUF from the weights in the state folder."""
    from pipeinfer_cpu.draftmake.weightfiles import load_draft

    reader, shape = open_target(target)
    weights = load_draft(state)
    if weights is None:
        raise UserError(f"{state} holds no trained draft weights: run the train stage first")
    n_layer = len({name.split(".")[1] for name in weights if name.startswith("blk.")})
    return write_draft(reader, shape.arch, weights, n_layer, out, quant)


def distill(plan: DistillPlan) -> dict:
    """Run the plan's stages in order; what each reported."""
    settings = plan.settings or {}
    report: dict = {}
    if "prepare" in plan.stages:
        prepare(plan.target, plan.state, settings)
        report["prepare"] = str(plan.state)
    if "train" in plan.stages:
        report["train"] = train(plan.target, plan.state, plan.device, settings)
    if "export" in plan.stages:
        report["export"] = str(export(plan.target, plan.state, plan.out, plan.quant))
    return report
