"""Fixtures for the compress tests: the CIFAR-10 copy (skipped when absent) and small models.

Not a conftest.py: the project's tests import helpers with `from conftest import ...`, and a second
conftest module on sys.path would shadow theirs. Test modules import these fixtures by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """$PIPEINFER_CIFAR10, else ../shared/datasets/cifar10 beside the repository."""
    root = Path(os.environ.get("PIPEINFER_CIFAR10") or REPO.parent / "shared" / "datasets" / "cifar10")
    if not (root / "cifar10-train.zip").exists() or not (root / "cifar10-test.zip").exists():
        pytest.skip(f"CIFAR-10 JPEG zips not found in {root} (set PIPEINFER_CIFAR10)")
    return root


@pytest.fixture(scope="session")
def resnet20():
    import torch

    from compress.models import build_model

    torch.manual_seed(0)
    return build_model("resnet20").eval()


@pytest.fixture(scope="session")
def resnet20_space(resnet20):
    from compress.prune import build_space

    return build_space(resnet20)


@pytest.fixture()
def cli():
    """Invoke `compress` verbs in-process; returns click's Result (stderr kept apart)."""
    from click.testing import CliRunner

    from compress.cli import compress_group

    runner = CliRunner()
    return lambda *args: runner.invoke(compress_group, [str(a) for a in args])


@pytest.fixture(scope="session")
def small_run(cifar_root, tmp_path_factory):
    """One tiny reproduce run (ResNet-20, 30 images a class, 1 epoch, 3 episodes) on the CPU."""
    from click.testing import CliRunner

    from compress.cli import compress_group

    out = tmp_path_factory.mktemp("run")
    args = ["reproduce", "--arch", "resnet20", "--target", "0.5", "--out-dir", str(out), "--data",
            str(cifar_root), "--limit-per-class", "30", "--train-epochs", "1", "--finetune-epochs", "1",
            "--episodes", "3", "--device", "cpu"]
    result = CliRunner().invoke(compress_group, args)
    assert result.exit_code == 0, result.output + str(result.exception)
    return out
