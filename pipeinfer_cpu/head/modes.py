"""How the head runs a model: the four modes, by the names the command line and the stats use."""

from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """A mode. A str-Enum, so it equals the plain strings callers still pass (`Mode("pipeinfer")`
    turns one into a Mode at a boundary) and prints as its command-line name."""

    SINGLE = "single"  # the whole model in the head's process
    PIPELINE = "pipeline"  # layer ranges on worker ranks, one token per run
    SPECULATIVE = "speculative"  # synchronous speculative decoding with a draft model
    PIPEINFER = "pipeinfer"  # PipeInfer's continuous asynchronous speculation

    def __str__(self) -> str:
        return self.value

    @property
    def speculative(self) -> bool:
        """True for the modes that need a draft model (and a rank for it, unless it runs in the head)."""
        return self in (Mode.SPECULATIVE, Mode.PIPEINFER)
