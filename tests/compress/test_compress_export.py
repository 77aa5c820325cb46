"""A pruned ResNet with residual groups runs, round-trips through a checkpoint and exports to
ONNX (opset 18, onnx.checker) with onnxruntime matching torch to < 1e-4."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compress.errors import ExportError
from compress.export import benchmark, check_parity, export_onnx, parity
from compress.models import build_model
from compress.prune import apply_policy, count_macs
from compress.store import load_checkpoint, save_checkpoint
from compress_fixtures import cli, resnet20, resnet20_space  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def pruned_resnet(resnet20, resnet20_space):
    keep = {g.root: (0.5 if len(g.out_layers) > 1 else 0.75) for g in resnet20_space.groups}
    return apply_policy(resnet20, resnet20_space, keep), resnet20_space.kept_channels(keep)


def test_pruned_resnet_residual_channels_aligned(pruned_resnet):
    model, kept = pruned_resnet
    stage0 = [m for n, m in model.named_modules() if n.startswith("stages.0.") and n.endswith("conv2.0")]
    assert {m.out_channels for m in stage0} == {kept["stem.0"]} == {8}
    assert model.stem[0].out_channels == 8
    x = torch.randn(4, 3, 32, 32)
    assert torch.isfinite(model(x)).all()
    assert count_macs(model)[0] < 0.5 * count_macs(build_model("resnet20"))[0]


def test_pruned_checkpoint_round_trip(tmp_path, pruned_resnet):
    model, kept = pruned_resnet
    path = save_checkpoint(tmp_path / "p.pt", model, "resnet20", kept=kept, half=False)
    loaded, info = load_checkpoint(path, "resnet20")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info["kept"] == kept


def test_onnx_export_parity_and_latency(tmp_path, pruned_resnet):
    model, _ = pruned_resnet
    path = export_onnx(model, tmp_path / "pruned.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    assert check_parity(model, path, x) < 1e-4  # dynamic batch: 5 images through a batch-1 export
    lat = benchmark(path, threads=1, runs=20, warmup=3)
    assert lat.median_ms > 0 and lat.p90_ms >= lat.median_ms and lat.runs == 20
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_parity_detects_a_different_model(tmp_path, pruned_resnet):
    model, _ = pruned_resnet
    path = export_onnx(model, tmp_path / "a.onnx")
    other = build_model("resnet20").eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(other, path, x)  # same input/output shapes, other weights
    assert parity(model, path, x) < 1e-4


def test_failed_verification_leaves_no_file(tmp_path, pruned_resnet):
    model, _ = pruned_resnet
    other = build_model("resnet20").eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(model, tmp_path / "m.onnx", verify=lambda tmp: check_parity(other, tmp, x))
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_policy_shape_and_interleaved_bench(cli, resnet20_space, tmp_path):
    """`export --arch A --policy P` writes the pruned shape with untrained weights (latency before
    any training); `bench` times files in interleaved rounds and records the machine."""
    keep = {g.root: 0.4 for g in resnet20_space.groups}
    policy = tmp_path / "search.json"
    policy.write_text(json.dumps({"best_keep": keep, "channel_multiple": 4}))
    full, half = tmp_path / "full.onnx", tmp_path / "half.onnx"
    assert cli("export", "--arch", "resnet20", "--out", full).exit_code == 0
    result = cli("export", "--arch", "resnet20", "--policy", policy, "--out", half)
    assert result.exit_code == 0, result.output
    widths = {init.name: init.dims[0] for init in onnx.load(half).graph.initializer if len(init.dims) == 4}
    full_widths = {init.name: init.dims[0] for init in onnx.load(full).graph.initializer if len(init.dims) == 4}
    assert sum(widths.values()) < sum(full_widths.values())
    # the policy file's channel multiple (4) was used, not the default (8)
    assert all(w % 4 == 0 for w in widths.values()) and any(w % 8 for w in widths.values())
    out = tmp_path / "bench.json"
    result = cli("bench", full, half, "--rounds", 2, "--runs", 3, "--warmup", 1, "--json-out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and "onnxruntime" in report["machine"]
    assert all(len(report["round_medians_ms"][str(f)][t]) == 2 for f in (full, half) for t in ("1", "2"))
    assert "speed-up 1 thread" in result.output
