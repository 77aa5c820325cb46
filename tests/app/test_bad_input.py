"""Each bad input: one readable line on stderr, a non-zero exit, no traceback, no rank left running."""


import pytest

from conftest import assert_clean_failure

RUN = ("run", "--hostfile", "hosts/local.txt", "-p", "Hello", "-n", "4")


def test_missing_model(cli, tmp_path):
    assert_clean_failure(cli(*RUN, "--model", str(tmp_path / "nope.gguf")), "model file not found")


def test_not_a_gguf_file(cli, tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights")
    assert_clean_failure(cli(*RUN, "--model", str(path)), "is not a GGUF file")


def test_truncated_gguf(cli, tmp_path, default_model):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(default_model.read_bytes()[: 40_000_000])
    assert_clean_failure(cli(*RUN, "--model", str(path)), "truncated")


@pytest.mark.parametrize("arch, fragment", [
    ("gpt2", "architecture 'gpt2' is not verified yet (verified: llama, qwen2"),
    ("mamba", "architecture 'mamba' cannot be split into pipeline stages yet (recurrent state"),
])
def test_unsupported_architecture(cli, tmp_path, arch, fragment):
    import gguf
    import numpy as np

    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clean_failure(cli(*RUN, "--model", str(path)), fragment)


def test_hostfile_typo(cli, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost\nlocalhost slot=2\n")
    done = cli("run", "--hostfile", str(hosts), "-p", "Hello")
    assert_clean_failure(done, f"{hosts}:2")


def test_more_stages_than_layers(cli):
    assert_clean_failure(cli(*RUN, "--stages", "31"), "cannot split 30 layers into 31 stages")


def test_shard_command_with_too_many_stages(cli, tmp_path, default_model):
    done = cli("shard", str(default_model), "--stages", "40", "-o", str(tmp_path / "out"))
    assert_clean_failure(done, "more stages than layers")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prompt_longer_than_context(cli):
    done = cli("run", "--hostfile", "hosts/local.txt", "-c", "64", "-p", "word " * 200, "-n", "4")
    assert_clean_failure(done, "the prompt has 201 tokens but the context has room for 63")


def test_unreachable_host(cli, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost\nno-such-host.invalid\n")
    assert_clean_failure(cli("run", "--hostfile", str(hosts), "-p", "Hi", timeout=60), "host no-such-host.invalid is unreachable")


def test_missing_mpiexec(cli):
    done = cli(*RUN, env={"PIPEINFER_MPIEXEC": "/nonexistent/mpiexec"})
    assert_clean_failure(done, "mpiexec not found")


def test_no_prompt(cli):
    assert_clean_failure(cli("run", "--hostfile", "hosts/local.txt"), "give exactly one of --prompt")


@pytest.mark.parametrize("given, fragment", [
    (("-p", ""), "--prompt: the prompt is empty"), (("-p", "  \n"), "--prompt: the prompt is empty"),
    (("-f", "empty.txt"), "empty.txt: the prompt is empty"), (("-f", "latin1.txt"), "latin1.txt is not UTF-8 text"),
    (("--prompts-file", "latin1.txt"), "latin1.txt is not UTF-8 text"),
])
@pytest.mark.parametrize("mode", ["single", "pipeline"])
def test_an_empty_or_unreadable_prompt(cli, tmp_path, given, fragment, mode):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("Grüße".encode("latin-1"))
    option, value = given
    value = str(tmp_path / value) if value.endswith(".txt") else value
    assert_clean_failure(cli("run", "--hostfile", "hosts/local.txt", "--mode", mode, option, value), fragment)


def test_debug_shows_the_traceback(cli, tmp_path):
    done = cli(*RUN, "--model", str(tmp_path / "nope.gguf"), "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr


@pytest.mark.parametrize("command, option, value, fragment", [
    ("run", "--min-p", "1.5", "min_p must be in [0, 1] (0 = off), got 1.5"),
    ("chat", "--repeat-penalty", "0", "repeat_penalty must be a finite number > 0 (1 = off), got 0.0"),
])
def test_bad_sampling_value(cli, command, option, value, fragment):
    assert_clean_failure(cli(command, "--hostfile", "hosts/local.txt", option, value), fragment)


# -- hosts calibrate ------------------------------------------------------------------------------

def _calibrate(cli, tmp_path, *args, hostfile="hosts/local.txt", out=None):
    out = out or tmp_path / "calibrated.txt"
    return cli("hosts", "calibrate", "--hostfile", str(hostfile), "-o", str(out), *args, timeout=60)


def test_calibrate_unknown_model(cli, tmp_path):
    assert_clean_failure(_calibrate(cli, tmp_path, "--model", "no-such-model"), "model file not found: no-such-model")
    assert not (tmp_path / "calibrated.txt").exists()


def test_calibrate_unreadable_hostfile(cli, tmp_path):
    assert_clean_failure(_calibrate(cli, tmp_path, hostfile=tmp_path / "nope.txt"), "cannot read hostfile")


def test_calibrate_unreachable_host(cli, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost\nno-such-host.invalid  # threads=2\n")
    assert_clean_failure(_calibrate(cli, tmp_path, hostfile=hosts), "host no-such-host.invalid is unreachable")
    assert not (tmp_path / "calibrated.txt").exists()


@pytest.mark.parametrize("where, fragment", [("file/calibrated.txt", "is not a folder"), ("folder", "it is a folder")])
def test_calibrate_output_not_writable(cli, tmp_path, where, fragment):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    assert_clean_failure(_calibrate(cli, tmp_path, out=tmp_path / where), fragment)


def test_calibrate_timings_not_writable(cli, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    done = _calibrate(cli, tmp_path, "--timings", str(tmp_path / "file" / "t.json"))
    assert_clean_failure(done, "is not a folder")
    assert not (tmp_path / "calibrated.txt").exists()


def test_calibrate_debug_shows_the_traceback(cli, tmp_path):
    done = _calibrate(cli, tmp_path, "--model", "no-such-model", "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr


@pytest.mark.parametrize("link, fragment", [
    ("bw=100mbps,delay=2ms", "bw '100mbps' is not a number with one of bit, kbit, mbit, gbit"),
    ("bw=0mbit,delay=2ms", "bw must be above 0"),
    ("bw=-1gbit", "bw must be above 0"),
    ("bw=1gbit,lag=2ms", "unknown key 'lag'"),
])
def test_bad_link_setting(cli, link, fragment):
    assert_clean_failure(cli(*RUN, "--link", link), fragment)


def test_hostfile_link_naming_an_unknown_host(cli, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost\nlocalhost\n# link localhost node9 bw=1gbit,delay=1ms\n")
    assert_clean_failure(cli("run", "--hostfile", str(hosts), "-p", "Hi", "-n", "2"),
                         f"{hosts}:3: link names host 'node9', which no line of the hostfile lists")


def test_netlab_probe_bad_link_and_size(cli):
    assert_clean_failure(cli("netlab", "probe", "--link", "delay=2"), "delay '2' is not a number")
    assert_clean_failure(cli("netlab", "probe", "--sizes", "8,1MiBs"), "bad message size '1MiBs'")
