"""The resumable training loop behind `compress train --state` (the GPU baseline's), on the CPU and a
tiny data set: augmentation, batching, a resumed run equal to an uninterrupted one, the CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from compress.data import Split  # noqa: E402
from compress.errors import CheckpointError  # noqa: E402
from compress.finetune import DeviceData, TrainConfig, Trainer, augment_batch  # noqa: E402
from compress.models import build_model  # noqa: E402
from compress.resume import ResumeOptions, load_state, save_state, train_resumable  # noqa: E402
from compress.store import load_checkpoint  # noqa: E402
from compress_fixtures import cifar_root, cli  # noqa: E402,F401  (pytest fixtures)

CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, warmup_epochs=1, seed=3)


def _data(n: int = 40) -> DeviceData:
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))
    return DeviceData(split, torch.device("cpu"))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20")


def test_augmentation_is_a_padded_crop_or_its_mirror():
    x = torch.randint(1, 256, (32, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirrored = any(torch.equal(out[i], c.flip(2)) for c in crops)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < len(x)  # both kinds occur


def test_drop_last_keeps_every_batch_full():
    data = _data(40)
    gen = torch.Generator().manual_seed(0)
    sizes = [len(y) for _, y in data.batches(16, gen, augment=True, drop_last=True)]
    assert sizes == [16, 16]
    assert [len(y) for _, y in data.batches(16)] == [16, 16, 8]
    x, _ = next(iter(data.batches(16, gen, augment=True)))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    trainer = Trainer(_model(), data, TrainConfig(batch_size=16, drop_last=True))
    assert trainer.steps_per_epoch == 2


def test_a_few_steps_on_the_cpu_change_the_weights_and_stay_finite():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    result = Trainer(model, _data(), TrainConfig(epochs=1, batch_size=16, lr=0.05, drop_last=True)).run()
    assert result.finished and result.epochs == 1 and np.isfinite(result.final_loss)
    assert not torch.equal(before["fc.weight"], model.state_dict()["fc.weight"])


def _lrs(trainer: Trainer, log: list[float]):
    return lambda epoch, loss: log.append(trainer.lr())


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data, settings = _data(), {"arch": "resnet20"}
    whole = Trainer(_model(), data, CFG)
    whole_lrs: list[float] = []
    whole.run(_lrs(whole, whole_lrs))

    path, resumed_lrs = tmp_path / "state.pt", []
    for call in range(3):  # a deadline already passed lets each call train exactly one epoch
        trainer = Trainer(_model(), data, CFG)  # a fresh process: new model, optimizer, generator
        assert load_state(path, trainer, settings) == (call > 0)
        result = trainer.run(_lrs(trainer, resumed_lrs), deadline=0.0)
        save_state(path, trainer, settings)
        assert trainer.progress.epoch == call + 1
    assert result.finished and resumed_lrs == whole_lrs
    assert trainer.progress.step == whole.progress.step
    for name, value in whole.model.state_dict().items():
        assert torch.allclose(value, trainer.model.state_dict()[name], atol=1e-6), name


def test_time_cap_fitted_once_survives_a_resume(tmp_path):
    data = _data()
    capped = TrainConfig(epochs=50, batch_size=16, warmup_epochs=1, max_seconds=1e-3)
    opts = ResumeOptions(tmp_path / "s.pt", stop_after_s=1e-6)
    first = train_resumable(Trainer(_model(), data, capped), {}, opts, print)
    assert first.finished and first.epochs == 1  # the cap left room for the warm-up epoch only
    again = Trainer(_model(), data, capped)
    assert load_state(opts.path, again, {}) and again.progress.epochs == 1


def test_state_with_other_settings_is_refused(tmp_path):
    trainer = Trainer(_model(), _data(), CFG)
    save_state(tmp_path / "s.pt", trainer, {"lr": 0.1})
    with pytest.raises(CheckpointError, match="lr=0.1"):
        load_state(tmp_path / "s.pt", Trainer(_model(), _data(), CFG), {"lr": 0.2})


def test_train_verb_stops_and_resumes_to_a_checkpoint(cli, cifar_root, tmp_path):
    args = ["train", "--arch", "resnet20", "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
            "--holdout", "0", "--data", cifar_root, "--limit-per-class", "2", "--device", "cpu",
            "--state", tmp_path / "state.pt", "--out", tmp_path / "r20.pt"]
    first = cli(*args, "--stop-after", "0.01")  # passed before training: one epoch, then stop
    assert first.exit_code == 0, first.output
    assert "stopped for time" in first.output and not (tmp_path / "r20.pt").exists()
    second = cli(*args)
    assert second.exit_code == 0, second.output
    assert "after 2 epochs" in second.output
    _, info = load_checkpoint(tmp_path / "r20.pt", "resnet20")
    assert info["meta"]["train_images"] == 20 and info["meta"]["holdout_acc"] is None
    assert cli(*args[:-4], "--lr", "0.1", "--state", tmp_path / "state.pt", "--out",
               tmp_path / "x.pt").exit_code == 1  # other settings: refused, one line
