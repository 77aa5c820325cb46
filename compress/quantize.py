"""Static int8 quantisation of an exported FP32 model with onnxruntime.quantization, the choice of
its calibration on held-out images, and a look at the graph onnxruntime actually runs.

Measured on this project's AMD EPYC (AVX-512 VNNI), onnxruntime 1.32 (docs/compress.md): with int8
*activations* (S8S8) the CPU provider leaves about half the convolutions of a QDQ ResNet-56 in FP32
between Dequantize/Quantize pairs, and S8S8 QLinearConv kernels run several times slower than FP32;
with uint8 activations and int8 weights (U8S8) every Conv and residual Add becomes a QLinearConv /
QLinearAdd and the model runs faster. Hence U8S8 by default."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from compress.errors import ExportError

if TYPE_CHECKING:  # the CLI reads this module's choices before any verb runs: no numpy/torch import yet
    import numpy as np

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("u8", "s8")
FORMATS = ("qdq", "qoperator")
INT8_COMPUTE = ("QLinearConv", "ConvInteger", "QLinearAdd", "QGemm", "QLinearMatMul", "MatMulInteger")
FP32_COMPUTE = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "Add")


@dataclass(frozen=True)
class Int8Config:
    method: str = "minmax"     # how activation ranges are read from the calibration images
    activations: str = "u8"    # u8: U8S8, onnxruntime's fast x86 path; s8: S8S8
    fmt: str = "qdq"           # qdq: Q/DQ pairs that onnxruntime fuses; qoperator: QLinearConv written out
    fp32_ends: bool = False    # keep the first convolution and the classifier in FP32

    def __post_init__(self) -> None:
        for value, allowed in ((self.method, METHODS), (self.activations, ACTIVATIONS), (self.fmt, FORMATS)):
            if value not in allowed:
                raise ExportError(f"int8: {value!r} is not one of {', '.join(allowed)}")

    @property
    def label(self) -> str:
        return f"{self.method}{', first/last FP32' if self.fp32_ends else ''}"


@dataclass(frozen=True)
class Int8Choice:
    path: Path
    config: Int8Config
    fp32_acc: float                          # the FP32 model on the selection images
    scores: tuple[tuple[str, float], ...]    # (candidate label, accuracy on the selection images)


def _reader(calibration: np.ndarray, batch: int = 32):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": calibration[i:i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self._it, None)

    return _Batches()


def _end_layers(path: str | Path) -> list[str]:
    """Names of the first and last compute node (stem conv, classifier) of a pre-processed model."""
    import onnx

    compute = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return [compute[0], compute[-1]] if compute else []


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: np.ndarray,
                  config: Int8Config = Int8Config()) -> Path:
    """Static int8 quantisation, per-channel int8 weights, activations calibrated on `calibration`
    (normalised NCHW images); the file passes onnx.checker before it is renamed into place."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compress.store import atomic_write

    if len(calibration) == 0:
        raise ExportError("int8 quantisation needs calibration images; got none")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]

    def _write(tmp: Path) -> None:
        pre = Path(f"{tmp}.pre.onnx")
        try:  # the calibrators print their progress on stdout, which is the CLI's report
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
                quantize_static(str(pre), str(tmp), _reader(calibration),
                                quant_format=QuantFormat.QDQ if config.fmt == "qdq" else QuantFormat.QOperator,
                                per_channel=True, calibrate_method=method, weight_type=QuantType.QInt8,
                                activation_type=QuantType.QUInt8 if config.activations == "u8" else QuantType.QInt8,
                                nodes_to_exclude=_end_layers(pre) if config.fp32_ends else [])
        finally:
            pre.unlink(missing_ok=True)
        onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)

    return atomic_write(int8_path, _write)


def choose_int8(fp32_path: str | Path, int8_path: str | Path, calibration: np.ndarray,
                selection: tuple[np.ndarray, np.ndarray], base: Int8Config = Int8Config(),
                methods: tuple[str, ...] = METHODS, tolerance: float = 0.5) -> Int8Choice:
    """Quantise with each calibration method, score each on the selection images (held-out training
    images, never the test set) and keep the best. Keeping the first and last layers in FP32 costs
    speed, so it is tried only when no all-int8 candidate is within `tolerance` points of FP32."""
    from compress.export import onnx_accuracy

    fp32_acc = onnx_accuracy(fp32_path, *selection)
    scores: list[tuple[str, float]] = []
    Path(int8_path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(int8_path).parent) as tmp:
        best: tuple[float, Int8Config, Path] | None = None
        for ends in (False, True):
            for method in methods:
                config = replace(base, method=method, fp32_ends=ends)
                name = f"{method}{'-fp32-ends' if ends else ''}.onnx"
                path = quantize_int8(fp32_path, Path(tmp) / name, calibration, config)
                acc = onnx_accuracy(path, *selection)
                scores.append((config.label, acc))
                if best is None or acc > best[0]:
                    best = (acc, config, path)
            if fp32_acc - best[0] <= tolerance:
                break
        best[2].replace(int8_path)
    return Int8Choice(Path(int8_path), best[1], fp32_acc, tuple(scores))


def optimized_ops(path: str | Path) -> Counter:
    """Operator counts of the graph onnxruntime runs after its optimisations (ORT_ENABLE_ALL, one
    thread): what tells real int8 kernels from Q/DQ pairs around FP32 convolutions."""
    import onnx

    from compress.export import cpu_session

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        cpu_session(path, 1, optimized_to=out)
        return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def ops_summary(ops: Counter) -> str:
    """'57 QLinearConv, 27 QLinearAdd, 1 QGemm; FP32: 0 Conv' — int8 compute, then what stayed FP32."""
    int8 = ", ".join(f"{ops[k]} {k}" for k in INT8_COMPUTE if ops[k])
    fp32 = ", ".join(f"{ops[k]} {k}" for k in FP32_COMPUTE if ops[k]) or "no Conv/Gemm/Add"
    return f"{int8 or 'no int8 compute'}; FP32: {fp32}"
