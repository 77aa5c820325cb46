"""Measure on *this* machine what the results table needs from a finished run: ONNX export and
parity of every checkpoint, test accuracy through onnxruntime, CPU latency (batch 1, 1 and 2
threads, interleaved rounds so background load hits every model alike), optional int8; then write
the table as JSON and Markdown."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from compress.data import load_split
from compress.export import check_parity, export_onnx, interleaved_latency, machine_info, onnx_accuracy
from compress.finetune import MEAN, STD
from compress.models import build_model
from compress.quantize import quantize_int8
from compress.store import atomic_write, load_checkpoint, read_json, write_json

METHOD_LABELS = {"gnn": "GNN+RL (PPO, two-stage GCN)", "mlp": "RL without graph encoder",
                 "random": "random search", "uniform": "uniform ratio (L2 magnitude)",
                 "depgraph": "DepGraph group-norm importance (torch-pruning, global)"}


def normalised(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]


def _export_all(run_dir: Path, onnx_dir: Path, probe: np.ndarray) -> dict[str, dict[str, Any]]:
    """Export baseline (untrained weights when its checkpoint is absent: latency only) and every
    pruned checkpoint; returns {name: {onnx, checkpoint, parity}}."""
    res = read_json(run_dir / "results.json")
    arch = res["arch"]
    models: dict[str, dict[str, Any]] = {}
    sources = {"baseline": run_dir / "baseline.pt"}
    sources.update({m: run_dir / f"pruned_{m}.pt" for m in res.get("finetuned", {})})
    for name, ckpt in sources.items():
        if ckpt.exists():
            model = load_checkpoint(ckpt, arch)[0]
        elif name == "baseline":
            model = build_model(arch).eval()
        else:
            continue
        errors: list[float] = []
        path = export_onnx(model, onnx_dir / f"{arch}_{name}.onnx",
                           verify=lambda tmp, m=model: errors.append(check_parity(m, tmp, probe)))
        models[name] = {"onnx": path, "checkpoint": ckpt if ckpt.exists() else None, "parity": errors[0]}
    return models


def _latencies(paths: dict[str, Path], rounds: int, runs: int) -> dict[str, dict[str, float]]:
    per = interleaved_latency(list(paths.values()), rounds=rounds, runs=runs)
    return {n: {f"{t}_thread_ms": statistics.median(v) for t, v in per[str(p)].items()}
            for n, p in paths.items()}


def measure_run(run_dir: str | Path, onnx_dir: str | Path, data_root: str | None, rounds: int = 5,
                runs: int = 200, int8: bool = True) -> dict[str, Any]:
    run_dir, onnx_dir = Path(run_dir), Path(onnx_dir)
    res = read_json(run_dir / "results.json")
    test = load_split(data_root, "test", res["config"].get("limit_per_class"))  # the run's test set
    x_test = normalised(test.images)
    models = _export_all(run_dir, onnx_dir, x_test[:16])
    if int8 and "gnn" in models:
        calib = normalised(load_split(data_root, "train", 20).images)
        q = quantize_int8(models["gnn"]["onnx"], onnx_dir / f"{res['arch']}_gnn.int8.onnx", calib)
        models["gnn_int8"] = {"onnx": q, "checkpoint": None, "parity": None}
    before = machine_info()
    lat = _latencies({n: m["onnx"] for n, m in models.items()}, rounds, runs)
    load_after = machine_info()["load_avg"]
    rows = {}
    for name, m in models.items():
        has_weights = m["checkpoint"] is not None or name == "gnn_int8"
        rows[name] = {"onnx_test_acc": onnx_accuracy(m["onnx"], x_test, test.labels) if has_weights else None,
                      "parity_max_abs": m["parity"], **lat[name]}
    return {"arch": res["arch"], "target": res["target"], "gpu_run": res, "cpu": rows,
            "cpu_machine": {**before, "load_avg_after": load_after, "rounds": rounds, "runs_per_round": runs}}


def _latency_cells(cpu_row: dict[str, Any] | None, base: dict[str, Any]) -> str:
    if not cpu_row:
        return "| – | – | – |"
    return (f"| {cpu_row['1_thread_ms']:.3f} | {cpu_row['2_thread_ms']:.3f} "
            f"| {base['1_thread_ms'] / cpu_row['1_thread_ms']:.2f}× |")


def _acc(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(measured: list[dict[str, Any]]) -> str:
    """The results table of docs/compress.md."""
    lines = ["| model | FLOPs kept | method | test acc: no FT (BN recal.) | FT epochs | test acc after FT "
             "| Δ vs baseline | same, onnxruntime CPU | MACs kept (counted) | params "
             "| ONNX 1 thr (ms) | ONNX 2 thr (ms) | speed-up 1 thr |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in measured:
        run, cpu = m["gpu_run"], m["cpu"]
        base_acc, base = run["baseline"]["test_acc"], cpu["baseline"]
        lines.append(f"| {m['arch']} | 100% | unpruned baseline | – | – | {base_acc:.2f} | – "
                     f"| {_acc(base.get('onnx_test_acc'))} | 100% | {run['baseline']['params'] / 1e6:.2f} M "
                     + _latency_cells(base, base))
        for method, row in run["finetuned"].items():
            c = cpu.get(method)
            lines.append(
                f"| {m['arch']} | {m['target']:.0%} | {METHOD_LABELS.get(method, method)} "
                f"| {row['test_acc_before_ft']:.2f} | {row['finetune_epochs']} | {row['test_acc']:.2f} "
                f"| {row['test_acc'] - base_acc:+.2f} | {_acc(c.get('onnx_test_acc') if c else None)} "
                f"| {row['macs_ratio']:.1%} | {row['params'] / 1e6:.2f} M " + _latency_cells(c, base))
        if "gnn_int8" in cpu:
            q = cpu["gnn_int8"]
            lines.append(f"| {m['arch']} | {m['target']:.0%} | GNN+RL, then int8 (QDQ, U8S8) | – | – | – "
                         f"| {q['onnx_test_acc'] - base_acc:+.2f} | {_acc(q['onnx_test_acc'])} | – | – "
                         + _latency_cells(q, base))
    return "\n".join(lines) + "\n"


def write_report(measured: list[dict[str, Any]], json_path: str | Path, md_path: str | Path) -> None:
    def _jsonable(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, Path):
            return obj.name
        return obj

    write_json(json_path, [_jsonable(m) for m in measured])
    text = markdown_table(measured)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(text))
