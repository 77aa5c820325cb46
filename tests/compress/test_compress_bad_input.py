"""Bad input: one clear line on stderr, non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from compress.data import load_split
from compress.errors import CheckpointError, DataError, TraceError
from compress.models import build_model
from compress.prune import apply_policy, build_space
from compress.store import load_checkpoint, save_checkpoint
from compress_fixtures import cli  # noqa: F401  (pytest fixtures)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


class Untraceable(nn.Module):
    """Leaves autograd through numpy, so the dependency graph sees no layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.conv(x).detach().numpy()).mean((2, 3))


def test_untraceable_model():
    with pytest.raises(TraceError, match="no prunable channel groups"):
        build_space(Untraceable())


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")


def test_model_failing_in_tracing():
    with pytest.raises(TraceError, match="cannot trace Broken"):
        build_space(Broken())


@pytest.fixture()
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "r20.pt", build_model("resnet20"), "resnet20")


def test_unreachable_budget_cli(cli, checkpoint, tmp_path):
    out = tmp_path / "search"
    result = cli("search", "--checkpoint", checkpoint, "--target", 0.01, "--out-dir", out)
    assert_one_line_error(result, "budget 0.01 is unreachable")
    assert not out.exists()


@pytest.mark.parametrize("multiple", ["x", 0, 2.5])
def test_policy_with_a_bad_channel_multiple(cli, checkpoint, tmp_path, multiple):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"best_keep": {"stem.0": 0.5}, "channel_multiple": multiple}))
    out = tmp_path / "pruned.pt"
    result = cli("finetune", "--checkpoint", checkpoint, "--policy", policy, "--out", out)
    assert_one_line_error(result, "channel multiple must be a whole number")
    assert not out.exists()


def test_policy_of_another_depth(cli, checkpoint, tmp_path):
    """A ResNet-56 search's policy on a ResNet-20 (or the reverse) names only groups both have, so
    only the architecture the search file records tells them apart: refused by `finetune` and
    `export --policy` alike."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"best_keep": {"stages.0.0.conv1.0": 0.5}, "arch": "resnet56"}))
    out = tmp_path / "pruned.pt"
    result = cli("finetune", "--checkpoint", checkpoint, "--policy", policy, "--out", out)
    assert_one_line_error(result, "is a policy for resnet56, not for this resnet20 model")
    assert not out.exists()
    onnx_out = tmp_path / "m.onnx"
    assert_one_line_error(cli("export", "--arch", "resnet20", "--policy", policy, "--out", onnx_out),
                          "is a policy for resnet56")
    assert not onnx_out.exists()


def test_policy_of_another_architecture(cli, checkpoint, tmp_path):
    """A VGG policy on a ResNet names groups the ResNet does not have: refused before any data are
    read, instead of silently keeping every channel."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"best_keep": {"features.0": 0.5}}))
    out = tmp_path / "pruned.pt"
    result = cli("finetune", "--checkpoint", checkpoint, "--policy", policy, "--out", out)
    assert_one_line_error(result, "searched on another architecture", "features.0")
    assert not out.exists()
    onnx_out = tmp_path / "m.onnx"
    assert_one_line_error(cli("export", "--arch", "resnet20", "--policy", policy, "--out", onnx_out),
                          "searched on another architecture")
    assert not onnx_out.exists()


def test_policy_on_an_already_pruned_checkpoint(cli, tmp_path):
    model = build_model("resnet20")
    space = build_space(model)
    keep = {g.root: 0.5 for g in space.groups}
    pruned = save_checkpoint(tmp_path / "p.pt", apply_policy(model, space, keep), "resnet20",
                             kept=space.kept_channels(keep))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"best_keep": keep}))
    out = tmp_path / "m.onnx"
    result = cli("export", "--checkpoint", pruned, "--policy", policy, "--out", out)
    assert_one_line_error(result, "already pruned")
    assert not out.exists()


def test_bench_given_a_file_twice(cli, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: the arguments are checked first")
    assert_one_line_error(cli("bench", model, model), "each ONNX file once")
    assert_one_line_error(cli("bench", model), "onnxruntime cannot load")  # and it is not ONNX


def test_channel_multiple_option_below_one(cli, checkpoint, tmp_path):
    result = cli("search", "--checkpoint", checkpoint, "--target", 0.5, "--channel-multiple", 0,
                 "--out-dir", tmp_path / "s")
    assert result.exit_code == 2 and "--channel-multiple" in result.output
    assert not (tmp_path / "s").exists()


def test_checkpoint_of_another_architecture(cli, checkpoint, tmp_path):
    result = cli("export", "--checkpoint", checkpoint, "--arch", "vgg16", "--out", tmp_path / "m.onnx")
    assert_one_line_error(result, "is for resnet20, not vgg16")
    assert list(tmp_path.iterdir()) == [checkpoint]
    with pytest.raises(CheckpointError, match="not vgg16"):
        load_checkpoint(checkpoint, "vgg16")


def test_checkpoint_whose_weights_do_not_fit(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", build_model("resnet20"), "resnet56")
    with pytest.raises(CheckpointError, match="does not fit resnet56"):
        load_checkpoint(path)


def test_corrupt_and_foreign_checkpoints(cli, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert_one_line_error(cli("graph", "--checkpoint", bad), "cannot read checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    assert_one_line_error(cli("graph", "--checkpoint", foreign), "not a compress checkpoint")
    assert_one_line_error(cli("graph", "--checkpoint", tmp_path / "none.pt"), "not found")


def test_missing_data_folder(cli, tmp_path):
    out = tmp_path / "m.pt"
    result = cli("train", "--arch", "resnet20", "--out", out, "--data", tmp_path / "nowhere", "--epochs", 1)
    assert_one_line_error(result, "CIFAR-10 folder not found")
    assert not out.exists()


def test_folder_without_cifar(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 train data"):
        load_split(tmp_path, "train")


def test_corrupt_zip(tmp_path, cli):
    (tmp_path / "cifar10-train.zip").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_split(tmp_path, "train")
    result = cli("train", "--arch", "resnet20", "--out", tmp_path / "m.pt", "--data", tmp_path)
    assert_one_line_error(result, "cannot read")


def test_corrupt_image_in_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "cifar10-test.zip", "w") as zf:
        zf.writestr("test/airplane/0001.jpg", b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="corrupt image"):
        load_split(tmp_path, "test")


def test_truncated_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:20])
    with pytest.raises(DataError, match="cannot read CIFAR batch"):
        load_split(tmp_path, "test")


def test_debug_flag_shows_traceback(tmp_path):
    from click.testing import CliRunner

    from compress.cli import compress_group

    result = CliRunner().invoke(compress_group, ["--debug", "graph", "--checkpoint", str(tmp_path / "x.pt")])
    assert result.exit_code != 0 and isinstance(result.exception, CheckpointError)
