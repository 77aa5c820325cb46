"""Fine-tuning with knowledge distillation from the unpruned model (no data files needed)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from compress.data import Split  # noqa: E402
from compress.finetune import DeviceData, TrainConfig, distillation_loss, train  # noqa: E402
from compress.models import build_model  # noqa: E402


def test_weight_zero_is_plain_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    labels = torch.randint(0, 10, (8,), generator=gen)
    plain = torch.nn.functional.cross_entropy(student, labels)
    assert torch.allclose(distillation_loss(student, teacher, labels, 0.0, 4.0), plain)


def test_agreeing_with_the_teacher_costs_nothing_extra():
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(8, 10, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    plain = torch.nn.functional.cross_entropy(logits, labels)
    same = distillation_loss(logits, logits.clone(), labels, 0.7, 4.0)
    assert torch.allclose(same, 0.3 * plain, atol=1e-6)
    other = distillation_loss(logits, -logits, labels, 0.7, 4.0)
    assert other > same


def _random_data(n: int = 64) -> DeviceData:
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))
    return DeviceData(split, torch.device("cpu"))


def _kl_to(student, teacher, data: DeviceData) -> float:
    student.eval()
    with torch.no_grad():
        x, _ = next(iter(data.batches(len(data))))
        return float(distillation_loss(student(x), teacher(x), torch.zeros(len(x), dtype=torch.long), 1.0, 4.0))


def test_distilled_student_moves_towards_the_teacher_and_leaves_it_untouched():
    torch.manual_seed(0)
    teacher, student = build_model("resnet20"), build_model("resnet20")
    plain = copy.deepcopy(student)
    with torch.no_grad():  # an untrained net says "uniform" for everything: give it an opinion
        teacher.fc.bias.copy_(torch.linspace(-6, 6, 10))
    teacher.eval()
    frozen = copy.deepcopy(teacher.state_dict())
    data = _random_data()
    before = _kl_to(student, teacher, data)
    schedule = TrainConfig(epochs=5, batch_size=32, lr=0.05, warmup_epochs=0)
    train(student, data, replace(schedule, distill_weight=1.0), teacher=teacher)
    train(plain, data, schedule)
    distilled = _kl_to(student, teacher, data)
    assert distilled < 0.5 * before
    assert distilled < 0.5 * _kl_to(plain, teacher, data)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_distillation_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        train(build_model("resnet20"), _random_data(8), TrainConfig(epochs=1, distill_weight=0.5))
