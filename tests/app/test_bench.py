"""The benchmark command runs real jobs and writes its report (speed is reported, never asserted)."""

import json


def test_bench_writes_json_and_markdown(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    out = tmp_path / "bench"
    done = cli("bench", "--modes", "single,pipeline", "--stages", "2", "-n", "8", "--prompts-file", str(prompts),
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "bench.json").read_text())
    labels = [mode["label"] for mode in report["modes"]]
    assert labels == ["single (1 thread)", "pipeline (2 target stages)"]
    for mode in report["modes"]:
        assert len(mode["runs"]) == 2 and mode["summary"]["decode_tok_s"] > 0
        assert mode["command"].startswith("pipeinfer-cpu run")
    markdown = (out / "bench.md").read_text()
    assert "| pipeline (2 target stages) |" in markdown and "Commands:" in markdown


def test_bench_prompt_sets_run_each_set_with_the_chat_template_and_the_ngram_draft(cli, tmp_path):
    out = tmp_path / "sets"
    done = cli("bench", "--modes", "single,speculative", "--draft", "ngram", "--stages", "1", "-n", "4",
               "--prompt-sets", "code,story", "--out", str(out))
    assert done.returncode == 0, done.stderr
    modes = json.loads((out / "bench.json").read_text())["modes"]
    assert [(mode["prompt_set"], mode["label"]) for mode in modes] == [
        ("code", "[code] single (1 thread)"), ("code", "[code] speculative (1 target stage + n-gram draft)"),
        ("story", "[story] single (1 thread)"), ("story", "[story] speculative (1 target stage + n-gram draft)")]
    assert all(len(mode["runs"]) == 4 and "--chat-template" in mode["command"] for mode in modes)


def test_bench_and_bench_pair_refuse_bad_input(cli, tmp_path):
    from conftest import assert_clean_failure

    assert_clean_failure(cli("bench", "--modes", "single,warp", "--out", str(tmp_path)), "unknown benchmark modes: warp")
    assert_clean_failure(cli("bench", "--modes", "pipeinfer", "--out", str(tmp_path)), "need --draft or --agreements")
    assert_clean_failure(cli("bench", "--prompt-sets", "code,poems", "--out", str(tmp_path)),
                         "unknown prompt set poems: choose from code, chat, summary, story or all")
    done = cli("models", "bench-pair", "--agreement", "1.5", "-o", str(tmp_path / "pair"))
    assert_clean_failure(done, "--agreement must be a fraction strictly between 0 and 1")
