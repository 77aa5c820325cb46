"""Real MPI processes, real llama.cpp: a pipeline's greedy output equals the whole model's.

Twice: with the CPU backend variant each rank chooses, and with the lowest one forced (haswell,
AVX2 only) on the same installed files. (On an AVX2-only CPU both are haswell.)
"""

import numpy as np
import pytest

from conftest import read_json

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def generate(cli, tmp_path, prompt, *args, variant=""):
    stats, logits = tmp_path / "stats.json", tmp_path / "logits.npy"
    done = cli("run", "--hostfile", "hosts/local.txt", "-p", prompt, "-n", "64", "--stats-json", str(stats),
               "--save-logits", str(logits), *args, env={"PIPEINFER_CPU_VARIANT": variant})
    assert done.returncode == 0, done.stderr
    return read_json(stats), np.load(logits), done


@pytest.fixture(scope="module", params=["", "haswell"], ids=["auto-variant", "forced-haswell"])
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory, variant):
    runs = {}
    for prompt in PROMPTS:
        runs[prompt] = generate(cli, tmp_path_factory.mktemp("single"), prompt, "--mode", "single", "-t", "1",
                                variant=variant)
    return runs


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_pipeline_equals_single(cli, tmp_path, reference, variant, stages, prompt):
    expected_stats, expected_logits, expected_run = reference[prompt]
    stats, logits, done = generate(cli, tmp_path, prompt, "--mode", "pipeline", "--stages", str(stages),
                                   variant=variant)
    backends = stats["cpu_backends"]
    assert [b["rank"] for b in backends] == list(range(stages + 1))
    assert len({b["variant"] for b in backends}) == 1 and all(b["forced"] == bool(variant) for b in backends)
    assert backends[0]["variant"] == (variant or expected_stats["cpu_backends"][0]["variant"])
    assert stats["tokens"] == expected_stats["tokens"]
    assert len(stats["tokens"]) == 64 or stats["stopped_by"] == "eos"
    assert np.array_equal(logits, expected_logits)  # bit-identical, not merely close
    assert done.stdout == expected_run.stdout
    assert [s["layers"] for s in stats["stages"]] == _layers(stages)
    assert stats["bytes_sent"] > 0


def _layers(stages):
    return {2: [[0, 15], [15, 30]], 3: [[0, 10], [10, 20], [20, 30]]}[stages]


def test_stats_json_has_the_promised_fields(cli, tmp_path):
    stats, _, done = generate(cli, tmp_path, PROMPTS[0], "--mode", "pipeline")
    for key in ("n_prompt", "n_generated", "prefill_s", "ttft_s", "itl_mean_s", "itl_p50_s", "itl_p95_s",
                "decode_tokens_per_s", "bytes_per_token", "stages"):
        assert stats[key] is not None, key
    for stage in stats["stages"]:
        assert 0 <= stage["idle_fraction"] <= 1 and stage["compute_s"] > 0 and stage["peak_rss_bytes"] > 0
    assert "pipeline: 64 tokens" in done.stderr


def test_sampling_is_reproducible_with_a_seed(cli, tmp_path):
    args = ("--temp", "0.8", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05", "--repeat-penalty", "1.1",
            "--seed", "7")
    first, _, _ = generate(cli, tmp_path, PROMPTS[2], "--mode", "pipeline", *args)
    second, _, _ = generate(cli, tmp_path, PROMPTS[2], "--mode", "pipeline", *args)
    single, _, _ = generate(cli, tmp_path, PROMPTS[2], "--mode", "single", *args)
    other, _, _ = generate(cli, tmp_path, PROMPTS[2], "--mode", "pipeline", *args[:-1], "8")
    assert first["tokens"] == second["tokens"] == single["tokens"]
    assert other["tokens"] != first["tokens"]


def test_your_own_mpiexec_makes_one_stage_per_worker_rank(cli, tmp_path, cache_dir):
    """`mpiexec -n 3 pipeinfer-cpu run ...` (the README's example): 2 stages, the same text as single."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    stats = tmp_path / "own.json"
    env = dict(os.environ, PIPEINFER_CACHE=str(cache_dir), PIPEINFER_CPU_VARIANT="")
    done = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", "3", sys.executable, "-m",
                           "pipeinfer_cpu", "run", "-p", PROMPTS[0], "-n", "16", "--stats-json", str(stats)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    single, _, _ = generate(cli, tmp_path, PROMPTS[0], "--mode", "single", "-t", "1")
    assert [s["layers"] for s in read_json(stats)["stages"]] == _layers(2)
    assert read_json(stats)["tokens"] == single["tokens"][:16]
