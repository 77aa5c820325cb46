"""llama.cpp's context options reach every stage: under each one, a two-stage pipeline equals the whole
model run with the same option (greedy tokens, bit-identical logits of the last prompt token).

A quantised KV cache or flash attention changes the numbers against the defaults, so each setting is
compared with `single` under the same setting, not with the default run.
"""

import numpy as np
import pytest

from conftest import assert_clean_failure, read_json

PROMPT = "The three primary colours are"


def generate(cli, tmp_path, *args):
    stats, logits = tmp_path / "stats.json", tmp_path / "logits.npy"
    done = cli("run", "--hostfile", "hosts/local.txt", "-p", PROMPT, "-n", "24", "--stats-json", str(stats),
               "--save-logits", str(logits), *args)
    assert done.returncode == 0, done.stderr
    return read_json(stats)["tokens"], np.load(logits)


@pytest.mark.parametrize("setting", [("--kv-type", "q8_0"), ("--kv-type", "q4_0", "--flash-attn", "on"),
                                     ("--flash-attn", "off"), ("--no-repack",), ("--load-mode", "none")],
                         ids=" ".join)
def test_pipeline_equals_single_under_the_same_setting(cli, tmp_path, setting):
    tokens, logits = generate(cli, tmp_path, "--mode", "single", "-t", "1", *setting)
    piped_tokens, piped_logits = generate(cli, tmp_path, "--mode", "pipeline", "--stages", "2", *setting)
    assert piped_tokens == tokens
    assert np.array_equal(piped_logits, logits)


def test_a_quantised_kv_cache_changes_the_numbers(cli, tmp_path):
    """The option really reaches llama.cpp: q4_0 keys and values give other logits than f16."""
    _, f16 = generate(cli, tmp_path, "--mode", "pipeline", "--stages", "2")
    _, q4 = generate(cli, tmp_path, "--mode", "pipeline", "--stages", "2", "--kv-type", "q4_0")
    assert not np.array_equal(f16, q4)


def test_a_quantised_kv_cache_without_flash_attention_is_one_line(cli):
    done = cli("run", "--hostfile", "hosts/local.txt", "-p", PROMPT, "-n", "4", "--kv-type", "q8_0",
               "--flash-attn", "off")
    assert_clean_failure(done, "--kv-type q8_0 needs flash attention")
