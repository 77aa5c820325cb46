"""Int8 export: onnx.checker passes, onnxruntime runs int8 kernels (not Q/DQ pairs around FP32
convolutions), a trained pruned ResNet-56 stays close to FP32, calibration is chosen on held-out
images, and an int8 request without calibration images is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compress.data import load_split
from compress.errors import ExportError
from compress.export import export_onnx, onnx_accuracy
from compress.prune import apply_policy
from compress.quantize import Int8Config, choose_int8, optimized_ops, ops_summary, quantize_int8
from compress.report import normalised
from compress.store import load_checkpoint
from compress_fixtures import REPO, cifar_root, cli, resnet20, resnet20_space  # noqa: F401  (pytest fixtures)
from test_compress_bad_input import assert_one_line_error

PRUNED_R56 = REPO / "models/cnn/resnet56/mult8-b60/ft30-kd/finetuned_gnn.pt"
# Stated tolerance on 500 test images: top-1 within 1 point of FP32, the same class for >= 97% of them
# (measured: docs/compress.md, "INT8 on this CPU").
ACC_TOLERANCE, AGREEMENT = 1.0, 0.97


@pytest.fixture(scope="module")
def fp32_resnet20(resnet20, resnet20_space, tmp_path_factory):
    keep = {g.root: 0.5 for g in resnet20_space.groups}
    model = apply_policy(resnet20, resnet20_space, keep)
    return model, export_onnx(model, tmp_path_factory.mktemp("r20") / "m.onnx")


def test_int8_graph_holds_int8_kernels(fp32_resnet20, tmp_path):
    model, fp32 = fp32_resnet20
    calib = np.random.default_rng(2).standard_normal((16, 3, 32, 32)).astype(np.float32)
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx", calib)
    onnx.checker.check_model(onnx.load(int8), full_check=True)
    assert int8.stat().st_size < fp32.stat().st_size
    convs = sum(n.op_type == "Conv" for n in onnx.load(fp32).graph.node)
    ops = optimized_ops(int8)
    # every convolution and residual addition runs as an int8 kernel; of the Q/DQ pairs only those at
    # the edges are left (the input, the average pooling, the logits)
    assert ops["QLinearConv"] == convs and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1
    assert ops["Conv"] == ops["Add"] == ops["Gemm"] == 0
    assert ops["QuantizeLinear"] <= 2 and ops["DequantizeLinear"] <= 2
    assert ops_summary(ops).endswith("FP32: no Conv/Gemm/Add")
    labels = model(torch.from_numpy(calib)).argmax(1).numpy()
    assert onnx_accuracy(int8, calib, labels) >= 50.0  # random weights: coarse agreement only


def test_fp32_ends_stay_fp32(fp32_resnet20, tmp_path):
    _, fp32 = fp32_resnet20
    calib = np.random.default_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ops = optimized_ops(quantize_int8(fp32, tmp_path / "e.onnx", calib, Int8Config(fp32_ends=True)))
    assert ops["Conv"] == 1 and ops["Gemm"] == 1 and ops["QLinearConv"] > 0


def test_choose_tries_fp32_ends_only_when_int8_is_not_close_enough(fp32_resnet20, tmp_path):
    model, fp32 = fp32_resnet20
    rng = np.random.default_rng(4)
    calib, x = (rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (8, 32))
    selection = (x, model(torch.from_numpy(x)).argmax(1).numpy())
    easy = choose_int8(fp32, tmp_path / "a.onnx", calib, selection, methods=("minmax", "percentile"),
                       tolerance=100.0)
    assert [label for label, _ in easy.scores] == ["minmax", "percentile"] and easy.fp32_acc == 100.0
    assert easy.path.exists() and not easy.config.fp32_ends
    assert max(acc for _, acc in easy.scores) == dict(easy.scores)[easy.config.label]
    hard = choose_int8(fp32, tmp_path / "b.onnx", calib, selection, methods=("minmax",), tolerance=-1.0)
    assert [label for label, _ in hard.scores] == ["minmax", "minmax, first/last FP32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # candidates cleaned up


def test_trained_pruned_resnet56_int8_within_tolerance(cifar_root, tmp_path):
    model, _ = load_checkpoint(PRUNED_R56, "resnet56")
    fp32 = export_onnx(model, tmp_path / "r56.onnx")
    int8 = quantize_int8(fp32, tmp_path / "r56.int8.onnx", normalised(load_split(cifar_root, "train", 20).images))
    test = load_split(cifar_root, "test", 50)
    x = normalised(test.images)
    acc32, acc8 = onnx_accuracy(fp32, x, test.labels), onnx_accuracy(int8, x, test.labels)
    assert abs(acc32 - acc8) <= ACC_TOLERANCE, (acc32, acc8)
    same = onnx_accuracy(int8, x, _predict(fp32, x))
    assert same >= 100 * AGREEMENT, same


def _predict(path: Path, x: np.ndarray) -> np.ndarray:
    from compress.export import cpu_session

    return cpu_session(path, 2).run(None, {"input": x})[0].argmax(1)


def test_int8_without_calibration_images(cli, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli("export", "--arch", "resnet20", "--out", out, "--int8", tmp_path / "m.int8.onnx",
                 "--data", tmp_path / "no-such-folder")
    assert_one_line_error(result, "--int8 needs calibration images", "no-such-folder")
    assert not out.exists()  # failed before the FP32 export


def test_int8_of_an_empty_calibration_set(fp32_resnet20, tmp_path):
    with pytest.raises(ExportError, match="needs calibration images; got none"):
        quantize_int8(fp32_resnet20[1], tmp_path / "q.onnx", np.zeros((0, 3, 32, 32), np.float32))
    assert not (tmp_path / "q.onnx").exists()


def test_int8_to_an_unwritable_path(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "m.onnx"
    result = cli("export", "--arch", "resnet20", "--out", out, "--int8", blocker / "m.int8.onnx")
    assert_one_line_error(result, "cannot write", "a-file")
    assert not out.exists()
