"""The settings of the training step, kept apart from it so that preparing and exporting need no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainSettings:
    """The defaults made the README's draft of the default model (one H200, 7 minutes of training)."""

    draft_layers: int = 6
    answer_tokens: int = 256  # tokens the target writes after each prompt
    copies: int = 12  # how often each templated prompt is answered (at different temperatures)
    questions: int = 2048  # extra prompts: questions the target asks itself
    gen_batch: int = 2048
    train_batch: int = 64
    lr: float = 6e-4
    warmup: int = 100
    minutes: float = 7.0
    steps: int = 0  # stop after this many steps (0: when the minutes are spent)
    max_prompts: int = 0  # use only the first templated prompts (0: all); for quick checks
    seed: int = 0

    @classmethod
    def load(cls, state: Path) -> "TrainSettings":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in json.loads((state / "settings.json").read_text()).items() if k in known})
