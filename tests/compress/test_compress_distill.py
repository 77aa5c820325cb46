"""Fine-tuning with knowledge distillation from the unpruned model, and the fine-tuning time cap."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from compress.data import Split  # noqa: E402
from compress.finetune import DeviceData, TrainConfig, soft_target_kl, train, training_loss  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress_fixtures import cifar_root, cli, small_run  # noqa: E402,F401  (pytest fixtures)


def test_soft_target_kl_is_the_teachers_kl_times_t_squared():
    student, teacher, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 3.0]]), 2.0
    p_s, p_t = torch.softmax(student / t, 1)[0].tolist(), torch.softmax(teacher / t, 1)[0].tolist()
    by_hand = t * t * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    assert float(soft_target_kl(student, teacher, t)) == pytest.approx(by_hand, rel=1e-5)


def test_without_distillation_the_loss_is_plain_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    student, labels = torch.randn(8, 10, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    cfg = TrainConfig(label_smoothing=0.1)
    plain = torch.nn.functional.cross_entropy(student, labels, label_smoothing=0.1)
    assert torch.allclose(training_loss(student, labels, cfg), plain)


def test_distillation_blends_labels_and_teacher():
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(8, 10, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    cfg = TrainConfig(distill_weight=0.7, label_smoothing=0.1)
    plain = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(training_loss(logits, labels, cfg, logits.clone()), 0.3 * plain, atol=1e-6)
    other = training_loss(logits, labels, cfg, -logits)
    assert torch.allclose(other, 0.3 * plain + 0.7 * soft_target_kl(logits, -logits, 4.0))


def _random_data(n: int = 64) -> DeviceData:
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))
    return DeviceData(split, torch.device("cpu"))


def _kl_to(student, teacher, data: DeviceData) -> float:
    student.eval(), teacher.eval()
    with torch.no_grad():
        x, _ = next(iter(data.batches(len(data))))
        return float(soft_target_kl(student(x), teacher(x), 4.0))


def test_distilled_student_moves_towards_the_teacher_and_leaves_it_untouched():
    torch.manual_seed(0)
    teacher, student = build_model("resnet20"), build_model("resnet20")
    with torch.no_grad():  # an untrained net says "uniform" for everything: give it an opinion
        teacher.fc.bias.copy_(torch.linspace(-6, 6, 10))
    plain = copy.deepcopy(student)
    data = _random_data()
    before = _kl_to(student, teacher, data)
    frozen = copy.deepcopy(teacher.state_dict())  # BatchNorm statistics included
    teacher.train()  # train() must switch it to eval mode, or its BatchNorm statistics would drift
    schedule = TrainConfig(epochs=5, batch_size=32, lr=0.05, warmup_epochs=0)
    train(student, data, replace(schedule, distill_weight=1.0), teacher=teacher)
    assert not teacher.training
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
    train(plain, data, schedule)
    distilled = _kl_to(student, teacher, data)
    assert distilled < 0.5 * before
    assert distilled < 0.5 * _kl_to(plain, teacher, data)


def test_distillation_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        train(build_model("resnet20"), _random_data(8), TrainConfig(epochs=1, distill_weight=0.5))


def test_finetune_cli_distils_within_a_time_cap(small_run, cifar_root, cli, tmp_path):
    """`finetune --distill --max-seconds --batch-size`: the cap cuts 50 planned epochs; the checkpoint
    records the schedule and batch it got, and the channel multiple comes from the policy file."""
    from compress.store import load_checkpoint

    policy = json.loads((small_run / "search_mlp.json").read_text())
    assert policy["channel_multiple"] == 8 and policy["arch"] == "resnet20"  # what `reproduce` searched
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({**policy, "channel_multiple": 4}))
    out = tmp_path / "distilled.pt"
    result = cli("finetune", "--checkpoint", small_run / "baseline.pt", "--policy", policy_file,
                 "--epochs", 50, "--max-seconds", 1, "--distill", 0.5, "--batch-size", 64, "--out", out,
                 "--data", cifar_root, "--limit-per-class", 30, "--device", "cpu")
    assert result.exit_code == 0, result.output + str(result.exception)
    epochs = int(re.search(r"after (\d+) epochs", result.output).group(1))
    assert epochs < 50 and "channels x4" in result.output and "batch 64" in result.output
    _, info = load_checkpoint(out, "resnet20")
    meta = info["meta"]
    assert (meta["finetune_epochs"], meta["planned_epochs"], meta["max_seconds"]) == (epochs, 50, 1.0)
    assert meta["distill_weight"] == 0.5 and meta["channel_multiple"] == 4 and meta["finetune_batch_size"] == 64
    assert all(n % 4 == 0 for n in info["kept"].values())
