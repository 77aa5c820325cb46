"""ONNX export (opset >= 18), onnx.checker, parity against torch and onnxruntime CPU sessions,
latency and accuracy. With `quantize` (int8), the only modules that import onnx and onnxruntime."""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from compress.errors import CompressError, ExportError
from compress.store import atomic_write

MIN_OPSET = 18


@dataclass(frozen=True)
class Latency:
    threads: int
    median_ms: float
    p90_ms: float
    runs: int


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...] = (1, 3, 32, 32),
                opset: int = MIN_OPSET, verify: Callable[[Path], object] | None = None) -> Path:
    """Export with the dynamo exporter (batch dimension dynamic), run onnx.checker and `verify`
    (e.g. a parity check) on the temporary file, and only then rename it into place."""
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    model = model.eval().cpu().to(memory_format=torch.contiguous_format)
    example = torch.randn(*input_shape)

    def _write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},),
                                        verbose=False)
        program.save(tmp, external_data=False)
        onnx.checker.check_model(onnx.load(tmp), full_check=True)
        if verify is not None:
            verify(tmp)

    try:
        return atomic_write(path, _write)
    except CompressError:  # a failed parity check, an unwritable folder: already one clear line
        raise
    except Exception as err:
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err


def cpu_session(path: str | Path | bytes, threads: int, optimized_to: str | Path | None = None):
    """An onnxruntime CPU session on a file, or on a serialised model given as bytes, with every
    graph optimisation on; `optimized_to` saves the graph as optimised (what really runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_to is not None:
        opts.optimized_model_filepath = str(optimized_to)
        opts.log_severity_level = 3  # its warning that NCHWc layouts are CPU-specific is known here
    try:
        source = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        name = "a generated model" if isinstance(path, bytes) else path
        raise ExportError(f"onnxruntime cannot load {name}: {first}") from err


def parity(model: nn.Module, path: str | Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between torch (fp32, CPU) and onnxruntime logits."""
    with torch.no_grad():
        expected = model.eval().cpu()(torch.from_numpy(inputs)).numpy()
    got = cpu_session(path, 1).run(None, {"input": inputs})[0]
    return float(np.abs(expected - got).max())


def check_parity(model: nn.Module, path: str | Path, inputs: np.ndarray, tol: float = 1e-4) -> float:
    err = parity(model, path, inputs)
    if not err < tol:
        raise ExportError(f"ONNX output differs from torch by {err:.3g} (tolerance {tol:g})")
    return err


def benchmark(path: str | Path | bytes, threads: int, runs: int = 300, warmup: int = 30,
              input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> Latency:
    """Median latency of one batch on the CPU with onnxruntime, after warm-up runs."""
    sess = cpu_session(path, threads)
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Latency(threads, statistics.median(times), times[int(0.9 * (len(times) - 1))], runs)


def interleaved_latency(paths: Sequence[str | Path], threads: Sequence[int] = (1, 2), rounds: int = 5,
                        runs: int = 300, warmup: int = 30) -> dict[str, dict[int, list[float]]]:
    """Median latency of every model in each of `rounds` rounds, the models taking turns within a
    round, so a burst of background load on a shared machine hits all of them alike instead of
    whichever model happened to run then. Returns {path: {threads: [median of each round]}}."""
    per: dict[str, dict[int, list[float]]] = {str(p): {t: [] for t in threads} for p in paths}
    for _ in range(rounds):
        for t in threads:
            for path in paths:
                per[str(path)][t].append(benchmark(path, t, runs=runs, warmup=warmup).median_ms)
    return per


def speedups_vs_first(per: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    """Each model's speed-up over the first of `interleaved_latency`'s results: the ratio within
    each round, then the median over rounds, so load that drifts between rounds cancels out."""
    first = next(iter(per.values()))
    return {f: {t: statistics.median(a / b for a, b in zip(first[t], v)) for t, v in d.items()}
            for f, d in per.items()}


def _parallel_convs_model(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int,
                          groups: int, height: int, width: int, branches: int) -> bytes:
    """`branches` copies of one Conv + Relu (fused by onnxruntime, as in an exported CNN), all reading
    the same input, their outputs added: per-call overhead and layout conversions are paid once,
    whatever the number of branches."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    for i in range(branches):
        w = rng.standard_normal((out_channels, in_channels // groups, kernel, kernel)).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"),
                    numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", ["input", f"w{i}", f"b{i}"], [f"conv{i}"], kernel_shape=[kernel] * 2,
                                   strides=[stride] * 2, pads=[padding] * 4, group=groups),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"])]
        outputs.append(f"relu{i}")
    total = outputs[0]
    for i, name in enumerate(outputs[1:]):
        nodes.append(helper.make_node("Add", [total, name], [f"sum{i}"]))
        total = f"sum{i}"
    nodes.append(helper.make_node("Identity", [total], ["output"]))
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("input", TensorProto.FLOAT, (1, in_channels, height, width))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)]).SerializeToString()


def conv_latency(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, groups: int,
                 height: int, width: int, threads: int = 1, runs: int = 100, branches: int = 5) -> float:
    """Milliseconds one Conv2d layer (+ fused ReLU) of this shape takes with onnxruntime at batch 1:
    the time `branches` parallel copies add over one copy, per copy (the sum of branches costs one
    addition per output, against in_channels * kernel^2 multiply-adds)."""
    if branches < 2:
        raise ValueError("conv_latency needs at least 2 branches (it times their difference)")
    shape = (1, in_channels, height, width)
    args = (in_channels, out_channels, kernel, stride, padding, groups, height, width)
    many = benchmark(_parallel_convs_model(*args, branches), threads, runs=runs, input_shape=shape).median_ms
    one = benchmark(_parallel_convs_model(*args, 1), threads, runs=runs, input_shape=shape).median_ms
    return max(many - one, 0.0) / (branches - 1)


def machine_info() -> dict[str, Any]:
    """What CPU latency depends on: onnxruntime's convolutions work on blocks of 8 channels with
    AVX2 and 16 with AVX-512, so the same pruned model gains differently on different CPUs."""
    import onnxruntime

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux: the model name from platform is all there is
        pass
    return {"cpu": model, "cores": os.cpu_count(),
            "simd": sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile"}),
            "onnxruntime": onnxruntime.__version__, "load_avg": os.getloadavg()}


def onnx_accuracy(path: str | Path, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy (%) of an ONNX model on normalised NCHW float32 images."""
    sess = cpu_session(path, 2)
    correct = 0
    for i in range(0, len(labels), batch):
        logits = sess.run(None, {"input": images[i:i + batch]})[0]
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return 100.0 * correct / len(labels)
