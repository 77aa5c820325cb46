"""Logits rows of Qwen's and Gemma 3's vocabulary sizes on the wire, in every mode, with sampling.

The models are SYNTHETIC (random weights, made with gguf-py): only their shapes matter here. With
`--temp 0.8` the last stage sends whole logits rows to the head, so a row of 151,936 or 262,144
floats must arrive intact for the sampled text to equal `single`'s.
"""

import pytest

from conftest import read_json
from pipeinfer_cpu.modelfiles.tinymodel import TinyShape, write_tiny_llama

SAMPLING = ("--temp", "0.8", "--seed", "5")


@pytest.fixture(scope="module", params=[151_936, 262_144], ids=["qwen-vocab", "gemma3-vocab"])
def tiny_pair(request, tmp_path_factory):
    # Q8_0 matrices: llama.cpp's F16 kernels of its AVX-512 variants (zen4, skylakex, icelake) give a row
    # of a 2-row verification batch slightly other logits than the row alone, and with 262,144 near-equal
    # random logits that moved a sample at token 12 (haswell's kernels did not); Q8_0's rows are exact.
    folder = tmp_path_factory.mktemp(f"vocab{request.param}")
    target = write_tiny_llama(folder / "target.gguf", TinyShape(n_vocab=request.param, n_layer=4, quant="Q8_0"),
                              seed=0)
    draft = write_tiny_llama(folder / "draft.gguf", TinyShape(n_vocab=request.param, n_layer=2, quant="Q8_0"),
                             seed=1)
    return target, draft


def tokens(cli, tmp_path, model, mode, *args):
    stats = tmp_path / f"{mode}.json"
    done = cli("run", "--hostfile", "hosts/local.txt", "--model", str(model), "--mode", mode, "-p", "Hello world",
               "-n", "24", "--stats-json", str(stats), *SAMPLING, *args)
    assert done.returncode == 0, done.stderr
    return read_json(stats)["tokens"]


def test_every_mode_samples_the_same_text_as_single(cli, tmp_path, tiny_pair):
    target, draft = tiny_pair
    expected = tokens(cli, tmp_path, target, "single")
    assert len(expected) == 24
    assert tokens(cli, tmp_path, target, "pipeline", "--stages", "2") == expected  # one shard plan for all
    for mode in ("speculative", "pipeinfer"):
        assert tokens(cli, tmp_path, target, mode, "--stages", "2", "--draft", str(draft)) == expected, mode
