"""PROJECTION: a model never measured, on nodes never seen, from memory bandwidth alone.

Assumptions (each a parameter):
- Decode on CPU is memory-bound: a run of one token through a layer reads that layer's weights
  once, `layer_bytes / mem_bw` seconds, where `mem_bw` is the bandwidth the matrix products
  really reach (roughly 60-70% of a node's STREAM figure). A run of `n` tokens reads the weights
  once too but computes `n` times: max(memory time, n * flops / (cores * core_flops)).
- The output layer (vocabulary projection) is charged to the last stage the same way.
- Each node holds one target stage (layers split equally); the head sits beside stage 0 on
  node 0 (that hop is free); the speculative modes give the draft a node of its own, so they use
  at most N - 1 stages. A stage must fit its node's memory with 10% to spare.
- Links are symmetric (bandwidth, one-way delay); hidden states cross them in `wire_dtype`.
Every configuration is simulated with the head's own scheduling code (plan/predict.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_write_text
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.plan.inputs import LOCAL, ModelInputs, StageCost, link_text
from pipeinfer_cpu.wire.links import LinkSpec
from pipeinfer_cpu.plan.predict import MODES, Prediction, predict


@dataclass(frozen=True)
class ModelSize:
    """What the projection needs of a model: its shape and its weights' bytes."""

    name: str
    n_layers: int
    n_embd: int
    n_vocab: int
    weights_bytes: float  # every tensor
    output_bytes: float  # the output (vocabulary) projection, read once per run by the last stage
    params: float  # for the compute roofline: 2 * params / n_layers flops per token per layer


# Q4_K_M sizes (~4.8 bits a weight; the output projection in Q6_K, ~6.6 bits).
PRESETS = {
    "70b": ModelSize("70B Q4_K_M (Llama-3-70B shape)", 80, 8192, 128256, 40e9, 128256 * 8192 * 6.6 / 8, 70e9),
    "8b": ModelSize("8B Q4_K_M (Llama-3-8B shape)", 32, 4096, 128256, 4.9e9, 128256 * 4096 * 6.6 / 8, 8e9),
    "1b": ModelSize("1B Q4_K_M (Llama-3.2-1B shape)", 16, 2048, 128256, 0.8e9, 0.0, 1.2e9),  # a draft: whole-model cost
}


@dataclass(frozen=True)
class Node:
    """One machine of the projection."""

    cores: int = 16
    mem_bw: float = 40e9  # bytes/s the matrix products reach
    mem_bytes: float = 64e9
    core_flops: float = 30e9  # flops per core on quantised matrix products


def token_s(model: ModelSize, node: Node, n_tokens: int, layers: int = 1) -> float:
    """Seconds for `n_tokens` through `layers` layers: memory time or compute time, the larger.
    A layer's bytes: the weights less the token embedding and the output projection (alike in size)."""
    layer_bytes = (model.weights_bytes - 2 * model.output_bytes) / model.n_layers
    memory = layer_bytes / node.mem_bw
    compute = n_tokens * 2 * model.params / model.n_layers / (node.cores * node.core_flops)
    return layers * max(memory, compute)


def _table(seconds) -> tuple[tuple[int, float], ...]:
    return tuple((n, seconds(n)) for n in (1, 2, 4, 8, 16, 32))


def model_inputs(model: ModelSize, node: Node, n_stages: int, link: LinkSpec, draft: ModelSize | None,
                 acceptance: float, wire_dtype: str = "f32") -> ModelInputs:
    layer = _table(lambda n: token_s(model, node, n))
    output = _table(lambda n: max(model.output_bytes / node.mem_bw,
                                  n * 2 * model.n_vocab * model.n_embd / (node.cores * node.core_flops)))
    base, extra = divmod(model.n_layers, n_stages)
    stages = tuple(StageCost(base + (1 if k < extra else 0), layer, output) for k in range(n_stages))
    draft_token = 0.0 if draft is None else draft.weights_bytes / node.mem_bw
    hops = (LOCAL,) + (link,) * n_stages
    return ModelInputs(stages, hops, model.n_embd, model.n_vocab, acceptance=acceptance,
                       draft_token_s=draft_token, draft_link=link, wire_dtype=wire_dtype)


@dataclass(frozen=True)
class Projected:
    """The best configuration of one mode on N nodes and one link."""

    nodes: int
    link: str
    mode: str
    stages: int | None  # None: the model fits no allowed number of stages
    prediction: Prediction | None


def fits(model: ModelSize, node: Node, n_stages: int) -> bool:
    return model.weights_bytes / n_stages * 1.1 <= node.mem_bytes


def project(model: ModelSize, node: Node, nodes: list[int], links: list[LinkSpec], draft: ModelSize,
            acceptance: float, modes=MODES, n_tokens: int = 128, wire_dtype: str = "f32") -> list[Projected]:
    """For every node count, link and mode: the number of stages that decodes fastest."""
    rows = []
    for n in nodes:
        if n < 1:
            raise UserError(f"node counts must be at least 1, got {n}")
        for link in links:
            for mode in modes:
                mode = Mode(mode)
                most = n - 1 if mode.speculative else n
                best: tuple[int, Prediction] | None = None
                for stages in range(1, most + 1):
                    if not fits(model, node, stages):
                        continue
                    inputs = model_inputs(model, node, stages, link, draft if mode.speculative else None,
                                          acceptance, wire_dtype)
                    prediction = predict(inputs, mode, n_tokens=n_tokens)
                    if best is None or prediction.tokens_per_s > best[1].tokens_per_s:
                        best = (stages, prediction)
                rows.append(Projected(n, link_text(link), mode.value,
                                      best[0] if best else None, best[1] if best else None))
    return rows


def write_report(rows: list[Projected], model: ModelSize, node: Node, draft: ModelSize, acceptance: float,
                 out_dir: Path) -> list[Path]:
    """projection.json, projection.md and projection.png (every title says PROJECTION)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    setting = (f"{model.name}, draft {draft.name}, acceptance {acceptance:g}; nodes of {node.cores} cores, "
               f"{node.mem_bw / 1e9:g} GB/s effective memory bandwidth, {node.mem_bytes / 1e9:g} GB")
    body = {"kind": "PROJECTION (performance model, not a measurement)", "setting": setting,
            "model": asdict(model), "node": asdict(node), "draft": asdict(draft), "acceptance": acceptance,
            "rows": [{"nodes": r.nodes, "link": r.link, "mode": r.mode, "stages": r.stages,
                      "prediction": r.prediction.to_json() if r.prediction else None} for r in rows]}
    paths = [out_dir / "projection.json", out_dir / "projection.md", out_dir / "projection.png"]
    atomic_write_text(paths[0], json.dumps(body, indent=1) + "\n")
    atomic_write_text(paths[1], markdown(rows, setting))
    _plot(rows, setting, paths[2])
    return paths


def markdown(rows: list[Projected], setting: str) -> str:
    lines = [f"## PROJECTION (performance model, not measured): {setting}", "",
             "| nodes | link | mode | stages | decode tok/s | ITL ms | bottleneck |",
             "| ----: | ---- | ---- | -----: | -----------: | -----: | ---------- |"]
    for r in rows:
        p = r.prediction
        if p is None:
            lines.append(f"| {r.nodes} | {r.link} | {r.mode} | - | does not fit | | |")
        else:
            lines.append(f"| {r.nodes} | {r.link} | {r.mode} | {r.stages} | {p.tokens_per_s:.2f} | "
                         f"{p.itl_mean_s * 1e3:.0f} | {p.bottleneck} ({p.occupancy[p.bottleneck]:.0%}) |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[Projected], setting: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    for index, link in enumerate(dict.fromkeys(r.link for r in rows)):
        for mode in dict.fromkeys(r.mode for r in rows):
            points = [(r.nodes, r.prediction.tokens_per_s) for r in rows
                      if r.link == link and r.mode == mode and r.prediction is not None]
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, styles[index % len(styles)], marker="o", label=f"{mode}, {link}")
    axes.set_xlabel("nodes")
    axes.set_ylabel("decode tokens/s (predicted)")
    axes.set_xticks(sorted({r.nodes for r in rows}))
    axes.set_title("PROJECTION (model, not measured)\n" + _wrap(setting), fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _wrap(text: str, width: int = 100) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
