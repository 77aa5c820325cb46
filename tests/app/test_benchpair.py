"""The synthetic benchmark pair and the real Q4_1/Q4_0 pair, on the real default model and llama.cpp."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeinfer_cpu.app.benchpair import (
    CALIBRATION_PROMPTS,
    DRAFT_NAME,
    NORMS,
    BenchPair,
    agreement,
    build_bench_pair,
    calibrate_sigma,
    chat_tokens,
    draft_agreement,
    extra_layers_for,
    greedy,
    load_pair,
    make_draft,
    make_real_pair,
    make_target,
    pair_request,
    search_sigma,
    target_continuations,
    write_pair,
)
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.llama.runtime import Stage, StageConfig, Vocab
from pipeinfer_cpu.modelfiles.models import open_gguf, read_model_info

PROMPTS = CALIBRATION_PROMPTS[:2]
THREADS = 1  # CI has 2 cores; one thread per llama.cpp context stays fast when something else runs


@pytest.fixture(scope="module")
def tensor_bytes():
    """name -> (type, raw bytes) of a GGUF's tensors, each file parsed once (parsing takes ~3 s)."""
    seen: dict[Path, dict[str, tuple[str, bytes]]] = {}

    def read(path: Path) -> dict[str, tuple[str, bytes]]:
        if path not in seen:
            seen[path] = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in open_gguf(path).tensors}
        return seen[path]
    return read


def greedy_text(path: Path, prompt: str, n_tokens: int) -> list[int]:
    vocab = Vocab(path)
    stage = Stage(StageConfig(path, is_first=True, is_last=True, n_ctx=256, n_threads=THREADS))
    try:
        return greedy(stage, chat_tokens(path, [prompt])[0], n_tokens, vocab.is_end)
    finally:
        stage.close()
        vocab.close()


@pytest.mark.parametrize("ratio, n_layer, expected", [
    (1.0, 30, 0), (3.4, 30, 90), (2.0, 30, 38), (1.5, 30, 19), (3.4, 10, 30), (1.01, 30, 0),
])
def test_extra_layers_for_follows_the_measured_cost_model(ratio, n_layer, expected):
    assert extra_layers_for(ratio, n_layer) == expected


@pytest.mark.parametrize("ratio", [0.5, 0.0, -2.0, math.nan])
def test_extra_layers_for_refuses_a_ratio_below_one(ratio):
    with pytest.raises(UserError, match="--cost-ratio must be at least 1"):
        extra_layers_for(ratio, 30)


@pytest.mark.parametrize("wanted", [0.0, 1.0, 1.5, -0.2])
def test_build_refuses_agreement_outside_zero_one(wanted, tmp_path):
    with pytest.raises(UserError, match="--agreement must be a fraction strictly between 0 and 1"):
        build_bench_pair(cost_ratio=3.4, agreement=wanted, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_cost_ratio_below_one_before_writing(tmp_path):
    with pytest.raises(UserError, match="--cost-ratio must be at least 1.*0.5"):
        build_bench_pair(cost_ratio=0.5, agreement=0.6, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def target4(default_model, tmp_path_factory) -> Path:
    return make_target(default_model, 4, tmp_path_factory.mktemp("target") / "target4.gguf")


def test_target_has_zero_norm_extra_layers_copied_from_the_source(target4, default_model, tensor_bytes):
    assert read_model_info(target4).n_layer == 34
    source, made = tensor_bytes(default_model), tensor_bytes(target4)
    assert all(made[name] == value for name, value in source.items())  # original tensors untouched
    extra = {name: value for name, value in made.items() if name not in source}
    assert len(extra) == 4 * 9
    for name, (kind, data) in extra.items():
        _, block, rest = name.split(".", 2)
        if rest in NORMS:
            assert kind == "F32" and not np.frombuffer(data, np.float32).any()
        else:
            assert (kind, data) == source[f"blk.{int(block) - 30}.{rest}"]


def test_target_with_extra_layers_writes_the_source_text(target4, default_model):
    prompt = "Write the opening paragraph of a story about a lighthouse keeper."
    expected = greedy_text(default_model, prompt, 32)
    assert len(expected) == 32
    assert greedy_text(target4, prompt, 32) == expected


@pytest.fixture(scope="module")
def drafts(default_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("drafts")
    return {name: make_draft(default_model, sigma, seed, out / f"{name}.gguf")
            for name, sigma, seed in [("a", 0.2, 7), ("a_again", 0.2, 7), ("b", 0.2, 8), ("zero", 0.0, 7)]}


def test_draft_is_seeded(drafts, tensor_bytes):
    assert drafts["a"].read_bytes() == drafts["a_again"].read_bytes()
    a, b = tensor_bytes(drafts["a"]), tensor_bytes(drafts["b"])
    differing = {name for name in a if a[name] != b[name]}
    assert differing == {name for name in a if name.split(".", 2)[-1] in NORMS}
    assert len(differing) == 60


def test_draft_with_sigma_zero_is_the_source(drafts, default_model, tensor_bytes):
    assert tensor_bytes(drafts["zero"]) == tensor_bytes(default_model)


def test_a_model_agrees_with_itself_completely(default_model):
    assert agreement(default_model, default_model, PROMPTS, n_tokens=16, n_threads=THREADS) == 1.0


def test_real_pair_is_a_q4_0_requantisation_that_mostly_agrees(default_model, tmp_path):
    target, draft = make_real_pair(tmp_path, default_model)
    assert target == default_model
    kinds = {t.tensor_type.name for t in open_gguf(draft).tensors if t.name.endswith("ffn_up.weight")}
    assert kinds == {"Q4_0"}
    measured = agreement(target, draft, PROMPTS, n_tokens=32, n_threads=THREADS)
    assert 0.5 < measured < 1.0
    assert make_real_pair(tmp_path, default_model) == (target, draft)  # cached: same file reused


def test_search_sigma_converges_on_a_curve_unlike_the_table():
    calls: list[float] = []

    def measure(sigma: float) -> float:
        calls.append(sigma)
        return max(0.0, 1.0 - 0.8 * sigma)  # agreement 0.6 at sigma 0.5, the table guesses ~0.19

    sigma, measured = search_sigma(measure, 0.6, tolerance=0.01, max_steps=8)
    assert abs(measured - 0.6) <= 0.01 and abs(sigma - 0.5) <= 0.0125
    assert 1 < len(calls) <= 8


def test_search_sigma_returns_the_closest_measurement_when_out_of_steps():
    _, measured = search_sigma(lambda s: 0.9 if s < 0.25 else 0.1, 0.6, tolerance=0.01, max_steps=3)
    assert measured in (0.9, 0.1)
    with pytest.raises(ValueError, match="max_steps"):
        search_sigma(lambda s: 0.5, 0.6, tolerance=0.01, max_steps=0)


def test_calibration_leaves_a_draft_with_the_measured_agreement(default_model, tmp_path):
    sigma, measured = calibrate_sigma(default_model, default_model, 0.7, seed=3, out_dir=tmp_path,
                                      tolerance=0.1, max_steps=2, prompts=PROMPTS, n_tokens=24,
                                      n_threads=THREADS)
    assert sigma > 0 and abs(measured - 0.7) < 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == [DRAFT_NAME]
    continuations = target_continuations(default_model, PROMPTS, 24, THREADS)
    assert draft_agreement(tmp_path / DRAFT_NAME, continuations, THREADS) == measured


def test_build_reuses_a_recorded_pair_without_rebuilding(default_model, tmp_path):
    target, draft = tmp_path / "synthetic-target.gguf", tmp_path / DRAFT_NAME
    target.write_bytes(b"t" * 10)
    draft.write_bytes(b"d" * 10)
    pair = BenchPair(target, draft, 3.4, 90, 0.21, 0.6, 0.61, 5)
    write_pair(tmp_path, pair, default_model, pair_request(default_model, 3.4, 0.6, 5))
    assert '"synthetic": true' in (tmp_path / "pair.json").read_text()
    assert build_bench_pair(3.4, 0.6, tmp_path, seed=5, source=default_model) == pair
    assert target.read_bytes() == b"t" * 10
    assert load_pair(tmp_path, pair_request(default_model, 3.4, 0.5, 5)) is None  # other request
    draft.write_bytes(b"d")
    assert load_pair(tmp_path, pair_request(default_model, 3.4, 0.6, 5)) is None  # damaged file
