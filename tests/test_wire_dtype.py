"""--wire-dtype on real MPI processes and real llama.cpp: f32 stays bit-identical to the whole model, f16 and
q8 runs complete with logits close to f32's, and the bytes statistics shrink by exactly the hidden states saved."""

import numpy as np
import pytest

from conftest import read_json

PROMPT = "The three primary colours are"
N_EMBD = 576  # the default model's hidden size
BYTES_PER_VALUE = {"f32": 4, "f16": 2, "q8": 1 + 4 / 32}


def generate(cli, tmp_path, *args):
    stats, logits = tmp_path / "stats.json", tmp_path / "logits.npy"
    done = cli("run", "--hostfile", "hosts/local.txt", "-p", PROMPT, "-n", "16", "--stats-json", str(stats),
               "--save-logits", str(logits), *args)
    assert done.returncode == 0, done.stderr
    return read_json(stats), np.load(logits)


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory):
    found = {"single": generate(cli, tmp_path_factory.mktemp("single"), "--mode", "single", "-t", "1")}
    for dtype in BYTES_PER_VALUE:
        found[dtype] = generate(cli, tmp_path_factory.mktemp(dtype), "--mode", "pipeline", "--stages", "2",
                                "--wire-dtype", dtype)
    return found


def test_an_f32_wire_is_bit_identical_to_the_whole_model(runs):
    (single, single_logits), (f32, f32_logits) = runs["single"], runs["f32"]
    assert f32["tokens"] == single["tokens"]
    assert np.array_equal(f32_logits, single_logits)


# Measured 0.66 (f16) and 0.91 (q8) here, of logits spanning about 30: the first token's hidden state holds
# a value of about 22,500 (an attention sink), whose f16 step is 16 and whose q8 block's step is 177.
@pytest.mark.parametrize("dtype, tolerance", [("f16", 1.5), ("q8", 3.0)])
def test_a_compact_wire_completes_with_logits_close_to_f32(runs, dtype, tolerance):
    (_, f32_logits), (compact, logits) = runs["f32"], runs[dtype]
    assert compact["n_generated"] == 16 and len(compact["stages"]) == 2
    assert not np.array_equal(logits, f32_logits)  # the setting reached the first stage
    assert np.abs(logits - f32_logits).max() < tolerance
    assert np.argmax(logits) == np.argmax(f32_logits)


@pytest.mark.parametrize("dtype", ["f16", "q8"])
def test_the_bytes_statistics_shrink_by_the_hidden_states_saved(runs, dtype):
    """Every token but the last generated one crosses from stage 1 to stage 2 once: n_embd values each."""
    (f32, _), (compact, _) = runs["f32"], runs[dtype]
    assert compact["n_generated"] == f32["n_generated"] and compact["n_prompt"] == f32["n_prompt"]
    rows = f32["n_prompt"] + f32["n_generated"] - 1
    saved = rows * N_EMBD * (BYTES_PER_VALUE["f32"] - BYTES_PER_VALUE[dtype])
    assert f32["bytes_sent"] - compact["bytes_sent"] == saved


def test_bench_passes_the_wire_dtype_to_its_pipelined_runs():
    import dataclasses
    from pathlib import Path

    from pipeinfer_cpu.app.bench import BenchConfig, mode_spec

    config = BenchConfig(Path("hosts/local.txt"), ("single", "pipeline"), 2, 1, 8, ("Hi",), wire_dtype="q8")
    assert mode_spec("pipeline", config).args == ("--mode", "pipeline", "--stages", "2", "--wire-dtype", "q8", "-t", "1")
    assert mode_spec("pipeline", config).label == "pipeline (2 target stages, q8 wire)"
    assert "--wire-dtype" not in mode_spec("single", config).args
    assert "--wire-dtype" not in mode_spec("pipeline", dataclasses.replace(config, wire_dtype="f32")).args
