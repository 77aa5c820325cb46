"""Training from scratch and fine-tuning after pruning (same loop), evaluation and BatchNorm
recalibration. Data stay on the device as uint8 and are augmented there (random crop with 4-pixel
padding, horizontal flip), so a GPU is not starved by a Python data loader."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.data import Split

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0
    seed: int = 0
    max_seconds: float | None = None  # cap: after the warm-up epoch, cut epochs to fit this time
    distill_weight: float = 0.0  # share of the loss that matches a teacher's outputs (0: plain labels)
    distill_temperature: float = 4.0
    compile: bool = False  # torch.compile the training forward: fused kernels, far fewer launches
    drop_last: bool = False  # every batch full, so a compiled model keeps one static shape


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    seconds: float
    final_loss: float
    finished: bool = True  # False: stopped by a deadline before the last epoch (resume later)


@dataclass
class Progress:
    """Where a run stands, besides weights and optimizer: with these a resumed run takes the same
    learning rates (a pure function of `step`) and the same data order (the generator's state)."""
    epoch: int = 0
    step: int = 0
    epochs: int = 0  # the schedule's length; a time cap may shorten it once, after the warm-up
    seconds: float = 0.0  # training time so far, summed over resumed runs
    last_epoch_s: float = 0.0
    loss: float = float("nan")


class DeviceData:
    """A split held on `device` as uint8 NCHW, normalised batch by batch."""

    def __init__(self, split: Split, device: torch.device, channels_last: bool = False) -> None:
        self.channels_last = channels_last
        self.x = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2))).to(device)
        self.y = torch.from_numpy(split.labels).to(device)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.y)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        out = (x.float() - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def batches(self, batch_size: int, generator: torch.Generator | None = None, augment: bool = False,
                drop_last: bool = False):
        """Batches in order, or shuffled by `generator` (which may live on the CPU or the device:
        one on the device keeps the host out of the loop)."""
        n = len(self)
        order = None
        if generator is not None:
            order = torch.randperm(n, generator=generator, device=generator.device).to(self.x.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
            x = self.x[idx]
            if augment:
                x = augment_batch(x, generator)
            yield self.normalise(x), self.y[idx]


def augment_batch(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image, then a random horizontal flip. The
    random numbers come from `generator`'s device and the pixels never leave `x`'s."""
    b, _, h, w = x.shape
    where = generator.device if generator is not None else x.device
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (b,), generator=generator, device=where).to(x.device)
    dy = torch.randint(0, 9, (b,), generator=generator, device=where).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    out = padded[torch.arange(b, device=x.device)[:, None, None, None],
                 torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=generator, device=where) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def soft_target_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between outputs softened by `temperature`, times T^2 so that its
    gradients keep their size as T changes (Hinton et al., knowledge distillation)."""
    return F.kl_div(F.log_softmax(student.float() / temperature, dim=1),
                    F.log_softmax(teacher.float() / temperature, dim=1), log_target=True,
                    reduction="batchmean") * temperature ** 2


def training_loss(student: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                  teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the labels, blended with `soft_target_kl` to the teacher's outputs when
    `cfg.distill_weight` is set."""
    hard = F.cross_entropy(student, labels, label_smoothing=cfg.label_smoothing)
    if not cfg.distill_weight:
        return hard
    return (1.0 - cfg.distill_weight) * hard + cfg.distill_weight * soft_target_kl(
        student, teacher, cfg.distill_temperature)


class Trainer:
    """SGD (Nesterov momentum by default), warm-up + cosine schedule, bf16 autocast on CUDA. With a
    `teacher` and `cfg.distill_weight` > 0 the loss also matches the teacher's outputs (fine-tuning
    a pruned model from its unpruned original). `state_dict` / `load_state_dict` hold everything a
    run needs to continue where it stopped: weights, momentum, progress, the data-order generator."""

    def __init__(self, model: nn.Module, data: DeviceData, cfg: TrainConfig,
                 teacher: nn.Module | None = None) -> None:
        if cfg.distill_weight and teacher is None:
            raise ValueError("distill_weight needs a teacher model")
        self.model, self.data, self.cfg, self.teacher = model, data, cfg, teacher
        device = data.x.device
        # one generator on the data's device draws order, crops and flips without host round trips
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.opt = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, fused=device.type == "cuda")
        self.progress = Progress(epochs=cfg.epochs)
        self.forward = torch.compile(model) if cfg.compile else model  # shares the parameters

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.data), self.cfg.batch_size
        return n // b if self.cfg.drop_last and n >= b else math.ceil(n / b)

    def lr(self) -> float:
        spe = self.steps_per_epoch
        return lr_at(self.progress.step, self.progress.epochs * spe, int(self.cfg.warmup_epochs * spe),
                     self.cfg.lr)

    def run_epoch(self) -> float:
        """One pass over the data; returns the mean loss (one device sync, at the end)."""
        device, cfg = self.data.x.device, self.cfg
        running = torch.zeros((), device=device)
        for x, y in self.data.batches(cfg.batch_size, self.gen, augment=True, drop_last=cfg.drop_last):
            for group in self.opt.param_groups:
                group["lr"] = self.lr()
            with _autocast(device):
                with torch.no_grad():
                    target = self.teacher(x) if cfg.distill_weight else None
                loss = training_loss(self.forward(x), y, cfg, target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            running += loss.detach()
            self.progress.step += 1
        return float(running) / self.steps_per_epoch

    def run(self, on_epoch: Callable[[int, float], None] | None = None,
            deadline: float | None = None) -> TrainResult:
        """Train until the schedule ends or, with a `deadline` (time.time()), until the next epoch
        would likely pass it. Every call trains at least one epoch, so repeated calls always finish."""
        if self.teacher is not None:
            self.teacher.eval()
        p, cfg = self.progress, self.cfg
        self.model.train()
        first = p.epoch
        while p.epoch < p.epochs:
            # this call's last epoch predicts the next (its first one includes compiling: cautious)
            if deadline is not None and p.epoch > first and time.time() + 1.2 * p.last_epoch_s > deadline:
                break
            t0 = time.time()
            p.loss = self.run_epoch()
            if not math.isfinite(p.loss):
                raise FloatingPointError(f"training diverged at epoch {p.epoch + 1} (loss {p.loss})")
            p.epoch += 1
            p.last_epoch_s = time.time() - t0
            p.seconds += p.last_epoch_s
            if cfg.max_seconds is not None and p.epoch == max(1, int(cfg.warmup_epochs)):
                p.epochs = fit_epochs(cfg.epochs, p.epoch, p.seconds, p.last_epoch_s, cfg.max_seconds)
            if on_epoch is not None:
                on_epoch(p.epoch, p.loss)
        self.model.eval()
        return TrainResult(p.epoch, p.seconds, p.loss, finished=p.epoch >= p.epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(), "progress": asdict(self.progress)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.progress = Progress(**state["progress"])


def train(model: nn.Module, data: DeviceData, cfg: TrainConfig,
          on_epoch: Callable[[int, float], None] | None = None,
          teacher: nn.Module | None = None) -> TrainResult:
    """One uninterrupted run of `Trainer` (see there)."""
    return Trainer(model, data, cfg, teacher).run(on_epoch)


def fit_epochs(planned: int, done: int, elapsed_s: float, epoch_s: float, max_seconds: float) -> int:
    """Epochs that fit `max_seconds`, decided at the end of the warm-up epochs: the learning rate
    so far does not depend on the total, so the run equals one planned with that many epochs."""
    remaining = int(max(0.0, max_seconds - elapsed_s) / max(epoch_s, 1e-6))
    return max(done, min(planned, done + remaining))


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int = 1000, amp: bool = True) -> float:
    """Top-1 accuracy in percent (bf16 autocast on CUDA unless `amp` is off)."""
    model.eval()
    correct = torch.zeros((), device=data.x.device, dtype=torch.long)
    with _autocast(data.x.device) if amp else torch.autocast(data.x.device.type, enabled=False):
        for x, y in data.batches(batch_size):
            correct += (model(x).argmax(1) == y).sum()
    return 100.0 * float(correct) / len(data)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: DeviceData, batches: int, batch_size: int = 256,
                   seed: int = 0) -> None:
    """Re-estimate BatchNorm statistics of a pruned model on training batches (no weight update):
    the cheap stand-in for fine-tuning that the search reward uses."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    gen = torch.Generator().manual_seed(seed)
    with _autocast(data.x.device):
        for i, (x, _) in enumerate(data.batches(batch_size, gen)):
            if i >= batches:
                break
            model(x)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
