"""Tests of pipeinfer_cpu.sampling: exact greedy, the filters and penalties (hand-computed cases,
llama.cpp's order), and the one-uniform contract."""

from __future__ import annotations

import numpy as np
import pytest

from pipeinfer_cpu.sampling import (
    LLAMA_CLI_DEFAULTS,
    SamplingConfig,
    apply_penalties,
    inverse_cdf,
    make_rng,
    model_recommendation,
    probabilities,
    sample,
)

VOCAB = 49152


def _logits_from_probs(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": -3}, "seed"),
        ({"temperature": "0.8"}, "temperature"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": "high"}, "min_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"repeat_penalty": float("inf")}, "repeat_penalty"),
        ({"repeat_last_n": -1}, "repeat_last_n"),
        ({"repeat_last_n": 2.5}, "repeat_last_n"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"presence_penalty": None}, "presence_penalty"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        SamplingConfig(**kwargs)


def test_config_greedy_only_at_zero_temperature() -> None:
    assert SamplingConfig().greedy
    assert SamplingConfig(temperature=0.0, top_k=5, top_p=0.5).greedy
    assert not SamplingConfig(temperature=1e-6).greedy


def test_greedy_sample_is_np_argmax_bit_exact() -> None:
    rng = np.random.default_rng(1)
    cfg = SamplingConfig()
    for _ in range(50):
        logits = rng.standard_normal(VOCAB).astype(np.float32) * 8
        assert sample(logits, cfg, rng) == int(np.argmax(logits))


def test_greedy_breaks_ties_to_lowest_id() -> None:
    logits = np.array([0.0, 3.0, 1.0, 3.0, 3.0], dtype=np.float32)
    cfg = SamplingConfig()
    assert sample(logits, cfg, np.random.default_rng(0)) == 1
    probs = probabilities(logits, cfg)
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_greedy_distinguishes_float32_neighbours() -> None:
    big = np.float32(10.0)
    logits = np.array([big, np.nextafter(big, np.float32(11))], dtype=np.float32)
    assert sample(logits, SamplingConfig(), np.random.default_rng(0)) == 1


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(), SamplingConfig(temperature=0.8), SamplingConfig(temperature=1.0, top_k=40, top_p=0.9),
     LLAMA_CLI_DEFAULTS, SamplingConfig(repeat_penalty=1.3),
     SamplingConfig(temperature=0.7, min_p=0.1, repeat_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1)],
)
@pytest.mark.parametrize("vocab", [3, 1000, VOCAB])
def test_sample_draws_exactly_one_uniform(cfg: SamplingConfig, vocab: int) -> None:
    logits = np.random.default_rng(5).standard_normal(vocab).astype(np.float32)
    used, reference = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(3):
        sample(logits, cfg, used, history=[0, 2, 2, 1])
        reference.random()
    assert used.random() == reference.random()


def test_sampling_is_deterministic_per_seed() -> None:
    cfg = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    logits = np.random.default_rng(3).standard_normal(VOCAB).astype(np.float32) * 3

    def stream() -> list[int]:
        rng = make_rng(cfg)
        return [sample(logits, cfg, rng) for _ in range(40)]

    first = stream()
    assert first == stream()
    assert len(set(first)) > 1  # it really samples
    other = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=1235)
    other_rng = make_rng(other)
    assert [sample(logits, other, other_rng) for _ in range(40)] != first


def test_temperature_softmax_matches_reference() -> None:
    logits = np.array([1.0, 2.0, 0.5, -1.0], dtype=np.float32)
    probs = probabilities(logits, SamplingConfig(temperature=0.7))
    expected = np.exp(logits.astype(np.float64) / 0.7)
    expected /= expected.sum()
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)


def test_tiny_temperature_is_finite_and_peaks_at_argmax() -> None:
    logits = np.array([1.0, 2.0, 1.999], dtype=np.float32)
    probs = probabilities(logits, SamplingConfig(temperature=1e-30))
    assert np.all(np.isfinite(probs))
    assert probs.tolist() == [0.0, 1.0, 0.0]


def test_masked_logits_get_zero_probability_and_are_never_sampled() -> None:
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0], dtype=np.float32)
    cfg = SamplingConfig(temperature=1.0)
    probs = probabilities(logits, cfg)
    assert probs.tolist() == [0.0, 0.5, 0.0, 0.5]
    rng = np.random.default_rng(0)
    assert {sample(logits, cfg, rng) for _ in range(200)} == {1, 3}


def test_top_k_keeps_the_k_largest_logits() -> None:
    logits = np.random.default_rng(2).standard_normal(VOCAB).astype(np.float32)
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_k=40))
    kept = np.flatnonzero(probs)
    assert kept.size == 40
    assert set(kept) == set(np.argsort(-logits)[:40])
    expected = np.exp(logits[kept].astype(np.float64))
    np.testing.assert_allclose(probs[kept], expected / expected.sum(), rtol=1e-12)


def test_top_k_at_least_vocab_is_off() -> None:
    logits = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    off = probabilities(logits, SamplingConfig(temperature=1.0))
    np.testing.assert_array_equal(probabilities(logits, SamplingConfig(temperature=1.0, top_k=3)), off)
    np.testing.assert_array_equal(probabilities(logits, SamplingConfig(temperature=1.0, top_k=99)), off)


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.05, [0]), (0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3])],
)
def test_top_p_keeps_smallest_set_reaching_the_mass(top_p: float, kept: list[int]) -> None:
    logits = _logits_from_probs([0.55, 0.25, 0.15, 0.05])
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_p=top_p))
    assert np.flatnonzero(probs).tolist() == kept
    assert probs.sum() == pytest.approx(1.0)


def test_top_p_ties_prefer_lower_ids() -> None:
    logits = np.zeros(4, dtype=np.float32)
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.3))
    assert probs.tolist() == [0.5, 0.5, 0.0, 0.0]


def _reference_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> list[int]:
    """Nucleus by a full stable sort of the whole vocabulary."""
    probs = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), top_p * probs.sum(), side="left")) + 1
    return sorted(order[:keep].tolist())


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
@pytest.mark.parametrize("shape", ["peaked", "flat", "ties", "tied-cut"])
def test_top_p_on_full_vocab_equals_a_full_sort(shape: str, top_p: float) -> None:
    raw = np.random.default_rng(12).standard_normal(VOCAB)
    # flat: the largest candidates miss the mass; ties, tied-cut: equal logits straddle the cut
    tied_cut = np.full(VOCAB, -100.0)
    tied_cut[-10:], tied_cut[::20] = 10.0, 9.0  # at top_p 0.3 the cut falls among 2458 ties
    shapes = {"peaked": raw * 4, "flat": raw * 0.05, "ties": np.round(raw * 2), "tied-cut": tied_cut}
    logits = shapes[shape].astype(np.float32)
    probs = probabilities(logits, SamplingConfig(temperature=0.9, top_p=top_p))
    assert np.flatnonzero(probs).tolist() == _reference_nucleus(logits, 1.0, top_p)  # top-p comes before temperature
    assert probs.sum() == pytest.approx(1.0)


def test_top_k_then_top_p() -> None:
    logits = _logits_from_probs([0.05, 0.4, 0.3, 0.2, 0.05])
    # top-k 3 leaves ids 1,2,3 renormalised to 4/9, 3/9, 2/9; top-p 0.7 then keeps 1 and 2
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.7))
    np.testing.assert_allclose(probs, [0.0, 4 / 7, 3 / 7, 0.0, 0.0], rtol=1e-6)


def test_sample_follows_probabilities() -> None:
    logits = _logits_from_probs([0.1, 0.4, 0.2, 0.05, 0.25])
    cfg = SamplingConfig(temperature=1.0)
    rng = np.random.default_rng(7)
    draws = np.array([sample(logits, cfg, rng) for _ in range(40_000)])
    freq = np.bincount(draws, minlength=5) / draws.size
    assert np.abs(freq - probabilities(logits, cfg)).sum() / 2 < 0.01


def test_inverse_cdf_boundaries_skip_zero_mass() -> None:
    probs = np.array([0.0, 0.25, 0.0, 0.75, 0.0])
    assert inverse_cdf(probs, 0.0) == 1
    assert inverse_cdf(probs, 0.2499) == 1
    assert inverse_cdf(probs, 0.25) == 3
    assert inverse_cdf(probs, np.nextafter(1.0, 0.0)) == 3


def test_inverse_cdf_scales_unnormalised_mass() -> None:
    assert inverse_cdf(np.array([2.0, 2.0]), 0.49) == 0
    assert inverse_cdf(np.array([2.0, 2.0]), 0.51) == 1
    with pytest.raises(ValueError, match="no mass"):
        inverse_cdf(np.zeros(3), 0.5)


@pytest.mark.parametrize("bad", [np.zeros((2, 3), dtype=np.float32), np.zeros(0, dtype=np.float32)])
def test_bad_logit_shapes_are_rejected(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="1-D"):
        probabilities(bad, SamplingConfig(temperature=1.0))


def test_all_masked_logits_are_rejected() -> None:
    logits = np.full(4, -np.inf, dtype=np.float32)
    with pytest.raises(ValueError, match="finite"):
        probabilities(logits, SamplingConfig(temperature=1.0))


def test_make_rng_is_seeded() -> None:
    a, b = make_rng(SamplingConfig(seed=9)), make_rng(SamplingConfig(seed=9))
    assert a.random(4).tolist() == b.random(4).tolist()
    assert make_rng(SamplingConfig(seed=10)).random() != make_rng(SamplingConfig(seed=9)).random()


# -- llama.cpp's order and its min-p and penalties, against hand-computed cases ----------------------

def test_top_p_and_min_p_judge_the_distribution_before_temperature() -> None:
    logits = _logits_from_probs([0.6, 0.3, 0.1])
    # min-p 0.2 keeps p >= 0.12: tokens 0 and 1; after temperature 3 token 2 would pass (it is
    # (1/6)^(1/3) = 0.55 times the likeliest there), but llama.cpp filters first
    probs = probabilities(logits, SamplingConfig(temperature=3.0, min_p=0.2))
    expected = np.array([0.6, 0.3]) ** (1 / 3)
    np.testing.assert_allclose(probs, [*(expected / expected.sum()), 0.0], rtol=1e-6)
    # top-p 0.85 keeps tokens 0 and 1 (0.9 >= 0.85) whatever the temperature
    assert np.flatnonzero(probabilities(logits, SamplingConfig(temperature=5.0, top_p=0.85))).tolist() == [0, 1]


@pytest.mark.parametrize("min_p, kept", [(0.05, [0, 1, 2, 3]), (0.25, [0, 1, 2]), (0.5, [0, 1]), (1.0, [0])])
def test_min_p_keeps_tokens_at_least_that_fraction_of_the_likeliest(min_p: float, kept: list[int]) -> None:
    logits = _logits_from_probs([0.5, 0.3, 0.15, 0.05])
    probs = probabilities(logits, SamplingConfig(temperature=1.0, min_p=min_p))
    assert np.flatnonzero(probs).tolist() == kept
    mass = np.array([0.5, 0.3, 0.15, 0.05])[kept]
    np.testing.assert_allclose(probs[kept], mass / mass.sum(), rtol=1e-6)


def test_min_p_after_top_k_and_top_p() -> None:
    logits = _logits_from_probs([0.05, 0.4, 0.3, 0.2, 0.05])
    # top-k 3: ids 1,2,3; top-p 0.8 of their 4/9, 3/9, 2/9: all three; min-p 0.6: p >= 0.24 of 4/9's: ids 1, 2
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.8, min_p=0.6))
    np.testing.assert_allclose(probs, [0.0, 4 / 7, 3 / 7, 0.0, 0.0], rtol=1e-6)


def test_penalties_as_llama_cpp_computes_them() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32)
    history = [3, 0, 1, 1, 4]
    cfg = SamplingConfig(repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, repeat_last_n=4)
    # the window is [0, 1, 1, 4]: token 3 is too old; positive logits are divided, the others
    # multiplied (0 stays 0), then count * 0.5 + 0.25 is subtracted
    out = apply_penalties(logits, cfg, history)
    assert out.dtype == np.float32
    assert out.tolist() == [2.0 / 2 - 0.75, -1.0 * 2 - 1.25, 0.5, 3.0, 0.0 - 0.75]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, 0.0]  # the input is left alone


@pytest.mark.parametrize("cfg", [SamplingConfig(repeat_penalty=1.0), SamplingConfig(repeat_penalty=1.5, repeat_last_n=0)])
def test_penalties_that_are_off_change_nothing(cfg: SamplingConfig) -> None:
    logits = np.array([2.0, -1.0, 0.5], dtype=np.float32)
    assert not cfg.penalised and not cfg.needs_logits
    assert apply_penalties(logits, cfg, [0, 1, 2]) is logits


def test_greedy_with_a_penalty_is_the_argmax_of_the_penalised_logits() -> None:
    logits = np.array([3.0, 2.0, -5.0], dtype=np.float32)
    cfg = SamplingConfig(repeat_penalty=2.0)
    assert cfg.greedy and cfg.needs_logits  # the last stage must send logits, not its argmax
    rng = np.random.default_rng(0)
    assert sample(logits, cfg, rng, history=[]) == 0
    assert sample(logits, cfg, rng, history=[0]) == 1  # 3 / 2 < 2
    assert probabilities(logits, cfg, history=[0]).tolist() == [0.0, 1.0, 0.0]


def test_penalties_come_before_top_k() -> None:
    logits = np.array([5.0, 4.0, 1.0], dtype=np.float32)
    cfg = SamplingConfig(temperature=1.0, top_k=1, repeat_penalty=10.0)
    assert probabilities(logits, cfg, history=[0]).tolist() == [0.0, 1.0, 0.0]  # 5 / 10 = 0.5 is no longer the top


def test_sampling_with_penalties_follows_the_penalised_distribution() -> None:
    logits = _logits_from_probs([0.4, 0.4, 0.2])
    cfg = SamplingConfig(temperature=1.0, repeat_penalty=1.5, presence_penalty=0.3)
    history = [0, 0, 2]
    penalised = apply_penalties(logits, cfg, history).astype(np.float64)
    expected = np.exp(penalised - penalised.max())
    np.testing.assert_allclose(probabilities(logits, cfg, history), expected / expected.sum(), rtol=1e-6)
    rng = np.random.default_rng(3)
    draws = np.bincount([sample(logits, cfg, rng, history) for _ in range(20_000)], minlength=3) / 20_000
    assert np.abs(draws - expected / expected.sum()).sum() / 2 < 0.015


def test_summary_names_what_matters() -> None:
    assert SamplingConfig().summary() == "temperature 0"
    assert LLAMA_CLI_DEFAULTS.summary() == "temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, seed 0"
    assert (SamplingConfig(top_k=5, repeat_penalty=1.1, seed=3).summary()
            == "temperature 0, repeat-penalty 1.1, repeat-last-n 64")
    assert (SamplingConfig(temperature=0.7, frequency_penalty=0.5, repeat_last_n=32, seed=2).summary()
            == "temperature 0.7, frequency-penalty 0.5, repeat-last-n 32, seed 2")


def test_model_recommendation_reads_llama_cpps_keys() -> None:
    metadata = {"general.name": "m", "general.sampling.temp": float(np.float32(0.7)), "general.sampling.top_k": 20,
                "general.sampling.top_p": float(np.float32(0.95)), "general.sampling.min_p": "high",
                "general.sampling.penalty_last_n": 128.0, "general.sampling.penalty_repeat": True,
                "general.sampling.mirostat": 2}
    assert model_recommendation(metadata) == {"temperature": 0.7, "top_k": 20, "top_p": 0.95, "repeat_last_n": 128}
    assert model_recommendation({}) == {}
