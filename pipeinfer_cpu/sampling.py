"""Token sampling from one row of logits: greedy, temperature, top-k, top-p.

Pure numpy; the random generator is always passed in explicitly.

Contract the runtime relies on:

* Greedy (``temperature == 0``) picks exactly ``np.argmax`` of the logits as
  given (float32 from llama.cpp), ties going to the lowest token id, so the
  result matches llama.cpp's own greedy choice token for token.
* :func:`sample` draws exactly ONE uniform from the generator per call, greedy
  included, and turns it into a token by inverse CDF over the probabilities
  ordered by token id.  The generator's position therefore depends only on the
  number of calls, never on the vocabulary size or on the distribution, so a
  seed reproduces the same stream in every mode.

Order of the filters (documented because llama.cpp's default chain differs):
temperature first, then top-k on the logits, then top-p on the tempered
softmax restricted to the top-k set, then renormalisation.  Top-k and
temperature commute; top-p after temperature means ``top_p`` is a mass of the
distribution we actually sample from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_NUCLEUS_CANDIDATES = 1024
"""How many of the largest weights top-p examines before falling back to a full sort."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the head turns logits into a token.

    ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` mean off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling is plain argmax."""
        return self.temperature == 0.0


def make_rng(cfg: SamplingConfig) -> np.random.Generator:
    """The generator for one request: numpy's default (PCG64) seeded with ``cfg.seed``."""
    return np.random.default_rng(cfg.seed)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {arr.shape}")
    return arr


def _top_k_ids(logits: np.ndarray, top_k: int) -> np.ndarray | None:
    """Ids of the ``top_k`` largest logits, sorted by id; None when top-k is off.

    Which of several logits tied at the k-th value survive is argpartition's
    choice: deterministic for a given input, not necessarily the lowest ids.
    """
    if top_k == 0 or top_k >= logits.size:
        return None
    ids = np.argpartition(-logits, top_k - 1)[:top_k]
    return np.sort(ids)


def _tempered_weights(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Unnormalised softmax(logits / T) in float64: exp((x - max) / T).

    Subtracting the max before dividing means a tiny T cannot overflow to inf - inf.
    """
    weights = logits.astype(np.float64)
    top = weights.max()
    if not math.isfinite(top):
        raise ValueError("logits have no finite maximum (all -inf, or +inf/NaN present)")
    weights -= top
    weights /= temperature
    return np.exp(weights, out=weights)


def _nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Ascending indices of the smallest set of ``weights`` holding >= top_p of their total.

    Ties are ranked by lower index first (stable sort) and at least one index is
    kept.  The largest ``_NUCLEUS_CANDIDATES`` are tried first so the common case
    avoids sorting the whole vocabulary; the answer is the same as a full sort.
    """
    target = top_p * weights.sum()
    if weights.size > 2 * _NUCLEUS_CANDIDATES:
        top = np.sort(np.argpartition(-weights, _NUCLEUS_CANDIDATES - 1)[:_NUCLEUS_CANDIDATES])
        order, keep = _ranked_prefix(weights, top, target)
        # valid unless the mass was not reached or the last kept weight ties with the excluded ones
        if keep <= order.size and weights[order[keep - 1]] > weights[order[-1]]:
            return np.sort(order[:keep])
    order, keep = _ranked_prefix(weights, np.arange(weights.size), target)
    return np.sort(order[: min(keep, order.size)])


def _ranked_prefix(weights: np.ndarray, candidates: np.ndarray, target: float) -> tuple[np.ndarray, int]:
    """``candidates`` (ascending) ranked by weight, and how many of them reach ``target``."""
    order = candidates[np.argsort(-weights[candidates], kind="stable")]
    cumulative = np.cumsum(weights[order])
    return order, int(np.searchsorted(cumulative, target, side="left")) + 1


def _filtered(logits: np.ndarray, cfg: SamplingConfig) -> tuple[np.ndarray | None, np.ndarray]:
    """Ids (ascending; None = whole vocabulary) and unnormalised weights left after the filters."""
    ids = _top_k_ids(logits, cfg.top_k)
    weights = _tempered_weights(logits if ids is None else logits[ids], cfg.temperature)
    if cfg.top_p < 1.0:
        kept = _nucleus(weights, cfg.top_p)
        ids, weights = (kept if ids is None else ids[kept]), weights[kept]
    return ids, weights


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution :func:`sample` draws from, as float64 over the whole vocabulary.

    softmax(logits / T) restricted to the top-k logits, then to the nucleus
    (smallest set with mass >= top_p, at least one token), renormalised.
    Greedy: one-hot at ``np.argmax(logits)``.
    """
    arr = _check_logits(logits)
    if cfg.greedy:
        out = np.zeros(arr.size, dtype=np.float64)
        out[int(np.argmax(arr))] = 1.0
        return out
    ids, weights = _filtered(arr, cfg)
    weights /= weights.sum()
    if ids is None:
        return weights
    out = np.zeros(arr.size, dtype=np.float64)
    out[ids] = weights
    return out


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The token id whose CDF interval (in id order) contains ``u`` in [0, 1).

    ``probs`` need not be exactly normalised; ``u`` is scaled by the total.
    Never returns a token of probability zero.
    """
    cdf = np.cumsum(probs, dtype=np.float64)
    total = cdf[-1]
    if not total > 0.0:
        raise ValueError("cannot sample from a distribution with no mass")
    idx = int(np.searchsorted(cdf, u * total, side="right"))
    if idx >= cdf.size:  # u * total rounded up to total: take the last token with mass
        idx = int(np.flatnonzero(probs)[-1])
    return idx


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token from ``logits`` under ``cfg``.

    Draws exactly one uniform from ``rng`` (also when greedy, where it is
    discarded), so the generator's state after n calls is the same whatever the
    logits, vocabulary size or configuration were.
    """
    u = float(rng.random())
    arr = _check_logits(logits)
    if cfg.greedy:
        return int(np.argmax(arr))
    ids, weights = _filtered(arr, cfg)
    index = inverse_cdf(weights, u)
    return index if ids is None else int(ids[index])
