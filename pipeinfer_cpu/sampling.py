"""Token sampling from one row of logits, in llama.cpp's order.

Pure numpy; the random generator is always passed in explicitly.

Order: llama.cpp's default chain (common/common.h, `common_params_sampling::samplers`) is
penalties -> dry -> top_n_sigma -> top_k -> typ_p -> top_p -> min_p -> xtc -> temperature -> dist.
This module implements five of them, in that order:

1. penalties: for each distinct token among the last ``repeat_last_n`` tokens before the position,
   seen ``c`` times there, its logit is divided by ``repeat_penalty`` if positive, else multiplied
   by it, then ``c * frequency_penalty + presence_penalty`` is subtracted (float32, as llama.cpp);
2. top-k on the penalised logits;
3. top-p: the smallest set holding ``top_p`` of the mass of softmax(logits), before temperature;
4. min-p: keep tokens of probability >= ``min_p`` times the largest, tested as llama.cpp does, on
   logits (``logit >= max + log(min_p)``), also before temperature;
5. temperature: softmax(logits / T) over what is left, renormalised, and one draw from it.

DRY, top-n-sigma, typical-p and XTC are not implemented (all off in llama.cpp's defaults). As in
llama.cpp, top-p and min-p judge the untempered distribution: temperature only reshapes what
they kept. Temperature 0 is greedy: the argmax of the penalised logits (llama.cpp's temperature
sampler at 0 keeps only the largest logit).

Contract the runtime relies on:

* Greedy without penalties picks exactly ``np.argmax`` of the logits as given (float32 from
  llama.cpp), ties going to the lowest token id, so the result matches llama.cpp's own greedy
  choice token for token, and the last stage can send that id instead of the whole row
  (``SamplingConfig.needs_logits``).
* :func:`sample` draws exactly ONE uniform from the generator per call, greedy included, and turns
  it into a token by inverse CDF over the probabilities ordered by token id. The generator's
  position therefore depends only on the number of calls, never on the vocabulary size or on the
  distribution, so a seed reproduces the same stream in every mode.
* The choice depends only on the logits, the configuration, the uniform and the tokens before the
  position (the penalties' ``history``): a speculative verifier that passes the tokens before the
  position it decides gets the target's own choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

_NUCLEUS_CANDIDATES = 1024
"""How many of the largest weights top-p examines before falling back to a full sort."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class SamplingConfig:
    """How the head turns logits into a token (defaults: greedy, every filter and penalty off).

    ``temperature == 0`` means greedy; ``top_k == 0``, ``top_p == 1``, ``min_p == 0`` mean off;
    the penalties are off at ``repeat_penalty == 1`` and zero frequency and presence penalties,
    or at ``repeat_last_n == 0``. The names and meanings are llama.cpp's.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rules = {
            "temperature": (_is_number(self.temperature) and self.temperature >= 0, "a finite number >= 0 (0 = greedy)"),
            "top_k": (_is_count(self.top_k), "an integer >= 0 (0 = off)"),
            "top_p": (_is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            "min_p": (_is_number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            "repeat_penalty": (_is_number(self.repeat_penalty) and self.repeat_penalty > 0,
                               "a finite number > 0 (1 = off)"),
            "repeat_last_n": (_is_count(self.repeat_last_n), "an integer >= 0 (0 = no penalties)"),
            "frequency_penalty": (_is_number(self.frequency_penalty), "a finite number (0 = off)"),
            "presence_penalty": (_is_number(self.presence_penalty), "a finite number (0 = off)"),
            "seed": (_is_count(self.seed), "an integer >= 0"),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax of the (penalised) logits."""
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """True when the penalties can change a logit."""
        return self.repeat_last_n > 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                           or self.presence_penalty != 0.0)

    @property
    def needs_logits(self) -> bool:
        """False when the token is the plain argmax of the model's logits, which the last stage can
        send instead of a whole row of logits."""
        return not self.greedy or self.penalised

    def summary(self) -> str:
        """The settings that matter, as `option value` (e.g. "temperature 0.8, top-k 40, seed 0"):
        filters and penalties that are off are left out, and so are the filters and the seed when greedy."""
        off = SamplingConfig()
        changed = [name for name in _FIELDS if getattr(self, name) != getattr(off, name)]
        shown = ["temperature"]
        if not self.greedy:
            shown += [name for name in ("top_k", "top_p", "min_p") if name in changed]
        if self.penalised:
            shown += [name for name in changed if name.endswith("_penalty")] + ["repeat_last_n"]
        if not self.greedy:
            shown.append("seed")
        return ", ".join(f"{name.replace('_', '-')} {getattr(self, name):g}" for name in shown)


_FIELDS = tuple(field.name for field in fields(SamplingConfig))

LLAMA_CLI_DEFAULTS = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
"""llama-cli's sampling (common/common.h, `common_params_sampling`; its penalties are off and
``repeat_last_n`` is 64 there too), with our fixed default seed instead of a random one."""

MODEL_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "repeat_last_n",
}
"""The GGUF keys of a model's recommended sampling (llama.cpp's LLM_KV_GENERAL_SAMPLING_*) that
this module implements, and the `SamplingConfig` field each sets. The others (the sampler sequence,
XTC, mirostat) name samplers this module does not have; there is no seed key."""


def model_recommendation(metadata: Mapping[str, object]) -> dict[str, float | int]:
    """`SamplingConfig` fields from a GGUF file's metadata, as llama.cpp's
    common_init_sampler_from_model reads them: numbers only (anything else is ignored), integer
    fields truncated to integers."""
    found: dict[str, float | int] = {}
    for key, name in MODEL_SAMPLING_KEYS.items():
        value = metadata.get(key)
        if _is_number(value):
            integer = isinstance(getattr(SamplingConfig, name), int)
            # a float32 in the file: its shortest decimal (0.8, not 0.800000011920929)
            found[name] = int(value) if integer else float(str(np.float32(value)))
    return found


def make_rng(cfg: SamplingConfig, drawn: int = 0) -> np.random.Generator:
    """The generator for one request: numpy's default (PCG64) seeded with ``cfg.seed``, after the
    `drawn` uniforms of positions already decided (one per position: a resumed answer samples on
    as the uninterrupted one would)."""
    rng = np.random.default_rng(cfg.seed)
    if drawn:
        rng.random(drawn)
    return rng


def _check_logits(logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {arr.shape}")
    return arr


def apply_penalties(logits: np.ndarray, cfg: SamplingConfig, history: Sequence[int]) -> np.ndarray:
    """llama.cpp's penalties sampler applied to ``logits`` (not changed; a copy is returned when
    anything changes), given the tokens before the position, oldest first."""
    if not cfg.penalised or not len(history):
        return logits
    ids, counts = np.unique(np.asarray(history[-cfg.repeat_last_n:], dtype=np.int64), return_counts=True)
    out = np.array(logits, dtype=np.result_type(logits, np.float32))  # float32 logits stay float32, as in llama.cpp
    number = out.dtype.type
    seen = out[ids]
    seen = np.where(seen <= 0, seen * number(cfg.repeat_penalty), seen / number(cfg.repeat_penalty))
    out[ids] = seen - (counts.astype(out.dtype) * number(cfg.frequency_penalty) + number(cfg.presence_penalty))
    return out


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


def _min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Ascending indices of the logits whose probability is at least ``min_p`` times the largest,
    tested on logits in their own precision, as llama.cpp does (the largest always passes)."""
    number = logits.dtype.type
    return np.flatnonzero(logits >= logits.max() + np.log(number(min_p)))


def _filtered(logits: np.ndarray, cfg: SamplingConfig) -> tuple[np.ndarray | None, np.ndarray]:
    """Ids (ascending; None = whole vocabulary) left by top-k, top-p and min-p, and their
    unnormalised tempered weights."""
    ids = _top_k_ids(logits, cfg.top_k)
    kept = logits if ids is None else logits[ids]
    if cfg.top_p < 1.0:
        ids, kept = _narrowed(ids, kept, _nucleus(_tempered_weights(kept, 1.0), cfg.top_p))
    if cfg.min_p > 0.0:
        ids, kept = _narrowed(ids, kept, _min_p(kept, cfg.min_p))
    return ids, _tempered_weights(kept, cfg.temperature)


def _narrowed(ids: np.ndarray | None, kept: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids and logits at ``index`` (ascending positions in ``kept``)."""
    return (index if ids is None else ids[index]), kept[index]


def probabilities(logits: np.ndarray, cfg: SamplingConfig, history: Sequence[int] = ()) -> np.ndarray:
    """The distribution :func:`sample` draws from, as float64 over the whole vocabulary.

    The logits penalised for ``history`` (the tokens before the position), restricted by top-k,
    top-p and min-p, then softmax(logits / T) over what is left. Greedy: one-hot at the argmax.
    """
    arr = apply_penalties(_check_logits(logits), cfg, history)
    if cfg.greedy:
        ids, weights = np.array([np.argmax(arr)]), np.ones(1)
    else:
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


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator, history: Sequence[int] = ()) -> int:
    """One token from ``logits`` under ``cfg``, ``history`` being the tokens before the position.

    Draws exactly one uniform from ``rng`` (also when greedy, where it is
    discarded), so the generator's state after n calls is the same whatever the
    logits, vocabulary size or configuration were.
    """
    u = float(rng.random())
    arr = apply_penalties(_check_logits(logits), cfg, history)
    if cfg.greedy:
        return int(np.argmax(arr))
    ids, weights = _filtered(arr, cfg)
    index = inverse_cdf(weights, u)
    return index if ids is None else int(ids[index])
