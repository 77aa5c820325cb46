"""Every verified architecture, proved: real MPI processes, real llama.cpp, a SYNTHETIC tiny model of
the architecture (its own tensors and metadata, random weights), and greedy pipelines of 2 and 3
stages giving the whole model's tokens and bit-identical logits of the last prompt token.

Depths put stage boundaries where a split could go wrong: inside gemma3's 6-layer and olmo2's
4-layer sliding-window periods, at an odd layer of gemma2's alternation. A window of 8 tokens makes
every layer's kind matter; gemma and gemma2 scale their input, granite its embeddings.
"""

import dataclasses

import numpy as np
import pytest

from conftest import read_json
from pipeinfer_cpu.modelfiles.architectures import VERIFIED
from pipeinfer_cpu.modelfiles.planning import split_layers
from pipeinfer_cpu.modelfiles.tinymodel import VARIED, write_tiny_model

PROMPT = "Hello world, the one that was in the world is for you and I have this of it"
N_TOKENS = 16
DEPTHS = {"gemma2": 5, "gemma3": 8, "olmo2": 6}  # others: 4
VOCABULARIES = {"llama": 128_256}  # Llama 3's; others: 2,048


def generate(cli, folder, model, mode, *args):
    stats, logits = folder / f"{mode}{''.join(args)}.json", folder / f"{mode}{''.join(args)}.npy"
    done = cli("run", "--hostfile", "hosts/local.txt", "--model", str(model), "--mode", mode, "--raw", "-p", PROMPT,
               "-n", str(N_TOKENS), "--stats-json", str(stats), "--save-logits", str(logits), *args)
    assert done.returncode == 0, done.stderr
    return read_json(stats), np.load(logits)


@pytest.fixture(scope="module", params=list(VERIFIED))
def reference(request, cli, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    shape = dataclasses.replace(VARIED, n_vocab=VOCABULARIES.get(arch, 2048), n_layer=DEPTHS.get(arch, 4))
    model = write_tiny_model(folder / f"{arch}.gguf", arch, shape)
    stats, logits = generate(cli, folder, model, "single", "-t", "1")
    assert len(stats["tokens"]) == N_TOKENS and len(set(stats["tokens"])) >= 4, stats["tokens"]  # not a constant
    return model, shape.n_layer, stats, logits


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_equals_single(cli, tmp_path, reference, stages):
    model, n_layer, expected_stats, expected_logits = reference
    stats, logits = generate(cli, tmp_path, model, "pipeline", "--stages", str(stages))
    assert [s["layers"] for s in stats["stages"]] == [[r.start, r.end] for r in split_layers(n_layer, [1] * stages)]
    assert stats["tokens"] == expected_stats["tokens"]
    assert np.array_equal(logits, expected_logits)  # bit-identical, not merely close
