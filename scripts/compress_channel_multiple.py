"""ONNX latency of ResNet-56 pruned to 50% of its MACs, with channel counts in multiples of 8 or 16.

    python scripts/compress_channel_multiple.py [--data CIFAR10_DIR] [--json-out FILE]   (compress extra)

The committed baseline (models/cnn/resnet56/baseline.pt) is pruned to each searched policy in
models/cnn/resnet56/search_<method>.json, rescaled to 50% MACs (compress.budget.fit_budget, as the
search does) with channel counts rounded to the multiple, exported to ONNX, and timed with
onnxruntime on the CPU at batch 1, 1 thread (best median of 3 rounds x 300 runs). With --data it
also reports test accuracy before fine-tuning (BatchNorm recalibrated on 10 training batches, as
the search's reward does).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from compress.budget import fit_budget
from compress.export import benchmark, export_onnx
from compress.finetune import evaluate, recalibrate_bn
from compress.pipeline import PipelineConfig, load_datasets
from compress.prune import apply_policy, build_space, count_macs
from compress.store import load_checkpoint

POLICIES = Path("models/cnn/resnet56")
METHODS = ("gnn", "mlp", "random", "uniform")


def latency_ms(model, path: Path) -> float:
    export_onnx(model, path)
    return min(benchmark(path, threads=1, runs=300, warmup=50).median_ms for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="CIFAR-10 folder: also measure accuracy before fine-tuning")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    base, _ = load_checkpoint(str(POLICIES / "baseline.pt"), "resnet56")
    data = None
    if args.data:
        config = PipelineConfig(arch="resnet56", target=0.5, out_dir=tempfile.mkdtemp(), data_root=args.data, device="cpu")
        data = load_datasets(config, torch.device("cpu"))
    tmp = Path(tempfile.mkdtemp())
    base_ms = latency_ms(base, tmp / "base.onnx")
    base_macs, _ = count_macs(base)
    rows = [{"policy": "unpruned", "multiple": None, "macs_ratio": 1.0, "latency_ms": base_ms, "speedup": 1.0}]
    for multiple in (8, 16):
        space = build_space(base, channel_multiple=multiple)
        for method in METHODS:
            keep = json.loads((POLICIES / f"search_{method}.json").read_text())["best_keep"]
            fitted = fit_budget(keep, space.predict_macs, space.base_macs, 0.5, 0.05, steps=space.steps())
            model = apply_policy(base, space, fitted)
            ms = latency_ms(model, tmp / f"{method}{multiple}.onnx")
            row = {"policy": method, "multiple": multiple, "macs_ratio": count_macs(model)[0] / base_macs,
                   "latency_ms": ms, "speedup": base_ms / ms}
            if data is not None:
                recalibrate_bn(model, data.train, 10)
                row["test_acc_no_finetune"] = evaluate(model, data.test, amp=False)
            rows.append(row)
    for row in rows:
        accuracy = f", test acc before fine-tuning {row['test_acc_no_finetune']:.2f}%" if "test_acc_no_finetune" in row else ""
        print(f"{row['policy']:>8} multiple {str(row['multiple']):>4}: {row['macs_ratio']:.3f} of the MACs, "
              f"{row['latency_ms']:.3f} ms, {row['speedup']:.2f}x{accuracy}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
