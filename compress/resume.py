"""Training that spans several calls of limited length (the lent GPU runs a command for at most 10
minutes): the trainer's whole state goes to one file every few epochs and when the call's time runs
out, and the same command, run again, continues from it with the same schedule and data order."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compress.errors import CheckpointError
from compress.finetune import Trainer, TrainResult
from compress.store import atomic_write

FORMAT = "compress-train-state-v1"


@dataclass(frozen=True)
class ResumeOptions:
    path: Path  # the state file: read if it exists, written every `save_every` epochs and at the end
    stop_after_s: float | None = None  # wall seconds this call may spend, counted from `started`
    save_every: int = 10
    started: float = field(default_factory=time.time)  # when the command began (data loading counts)

    def deadline(self) -> float | None:
        return None if self.stop_after_s is None else self.started + self.stop_after_s


def save_state(path: Path, trainer: Trainer, settings: dict[str, Any]) -> None:
    """Weights and momentum in fp32 (about 8 MB for ResNet-56): a state is for resuming, not for git."""
    blob = {"format": FORMAT, "settings": settings, **trainer.state_dict()}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_state(path: Path, trainer: Trainer, settings: dict[str, Any]) -> bool:
    """Restore `trainer` from `path`; False when there is no file yet. A state made with other
    settings is refused: resuming it would silently mix two schedules."""
    if not path.exists():
        return False
    try:  # on the CPU first: the generator's state must stay a CPU tensor, the rest is moved on load
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle/zip/runtime errors for damaged files
        raise CheckpointError(f"cannot read training state {path}: {type(err).__name__}") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a compress training state")
    changed = sorted(k for k in settings.keys() | blob["settings"].keys()
                     if settings.get(k) != blob["settings"].get(k))
    if changed:
        was = ", ".join(f"{k}={blob['settings'].get(k)!r}" for k in changed)
        raise CheckpointError(f"{path} was made with other settings ({was}); use them or remove the file")
    trainer.load_state_dict(blob)
    return True


def train_resumable(trainer: Trainer, settings: dict[str, Any], opts: ResumeOptions,
                    log: Callable[[str], None]) -> TrainResult:
    """Resume from `opts.path` if it exists, train until the schedule ends or the call's time is
    nearly up, and leave the state on disk either way."""
    if load_state(opts.path, trainer, settings):
        p = trainer.progress
        log(f"resumed from {opts.path} at epoch {p.epoch}/{p.epochs} ({p.seconds:.0f} s trained)")

    def on_epoch(epoch: int, loss: float) -> None:
        p = trainer.progress
        log(f"epoch {epoch}/{p.epochs} loss {loss:.3f} lr {trainer.lr():.4f} {p.last_epoch_s:.1f} s")
        if epoch % opts.save_every == 0:
            save_state(opts.path, trainer, settings)

    result = trainer.run(on_epoch, opts.deadline())
    save_state(opts.path, trainer, settings)
    return result
