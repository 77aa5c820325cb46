"""draft distill on CPU in a tiny configuration: the stages, the GGUF it writes (loaded by llama.cpp), and
the draft passing the checks every draft passes (greedy speculative and pipeinfer equal single).

The target here is the default model cut to its first 4 blocks: real weights and the real tokenizer, at a
size that trains in seconds (scripts/draft_teacher_match.py checks the whole model's copy)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_clean_failure, read_json

torch = pytest.importorskip("torch")

from pipeinfer_cpu.draftmake import evaluate  # noqa: E402
from pipeinfer_cpu.draftmake.distill import DistillPlan, distill  # noqa: E402
from pipeinfer_cpu.draftmake.net import Decoder, causal_mask, positions_of  # noqa: E402
from pipeinfer_cpu.draftmake.targetfile import open_target, read_shape, read_weights  # noqa: E402
from pipeinfer_cpu.draftmake.weightfiles import load_draft  # noqa: E402

TINY = dict(draft_layers=1, answer_tokens=8, copies=1, max_prompts=6, questions=2, gen_batch=8, train_batch=2,
            steps=2, warmup=1)
SEQUENCE = [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198, 504, 3458, 314, 216, 9, 28, 351]  # a chat turn


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On 2 shared cores, torch's two threads waiting on each other ran these tests 3x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def torch_logits(path, weights=None):
    model = Decoder(read_shape(path), weights or read_weights(open_target(path)[0]))
    tokens = torch.tensor([SEQUENCE])
    valid = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        return model(tokens, positions_of(valid), causal_mask(valid))[0].numpy()


def llama_logits(path):
    stage = evaluate.whole_model(path, 256, 1)
    try:
        return evaluate.sequence_logits(stage, SEQUENCE)
    finally:
        stage.close()


def close(ours, theirs, rel_l2, argmax):
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < rel_l2
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= argmax


@pytest.fixture(scope="module")
def small_target(tmp_path_factory, default_model):
    from pipeinfer_cpu.modelfiles.models import open_gguf, read_model_info
    from pipeinfer_cpu.modelfiles.planning import LayerRange
    from pipeinfer_cpu.modelfiles.shards import write_shard

    path = tmp_path_factory.mktemp("target") / "smollm2-first4.gguf"
    info = read_model_info(default_model)
    write_shard(open_gguf(default_model), info, LayerRange(0, 4, info.n_layer), path)
    return path


def test_the_torch_copy_of_the_target_matches_llama_cpp(small_target):
    # llama.cpp quantises activations for its Q4_1 matmuls; the copy does not (the README: 2-3% apart)
    close(torch_logits(small_target), llama_logits(small_target), rel_l2=0.08, argmax=0.9)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, small_target):
    folder = tmp_path_factory.mktemp("draft")
    plan = DistillPlan(small_target, folder / "state", folder / "draft.gguf", settings=TINY, device="cpu")
    report = distill(plan)
    return plan, report


def test_the_stages_write_a_draft_llama_cpp_loads_and_computes_as_trained(distilled, small_target):
    plan, report = distilled
    assert report["train"]["steps"] == 2 and report["train"]["corpus_tokens"] > 0
    shape = read_shape(plan.out)
    assert shape.n_layer == 1 and shape.n_vocab == read_shape(small_target).n_vocab
    embedding = read_weights(open_target(small_target)[0])["token_embd.weight"]
    weights = {**load_draft(plan.state), "token_embd.weight": embedding}
    close(torch_logits(plan.out, weights), llama_logits(plan.out), rel_l2=0.05, argmax=0.9)


def test_training_resumes_from_the_saved_weights(distilled):
    plan, _ = distilled
    before = load_draft(plan.state)
    distill(DistillPlan(plan.target, plan.state, stages=("train",), settings={"steps": 1}, device="cpu"))
    after = load_draft(plan.state)
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # trained on, from the saved draft


def test_the_distilled_draft_is_lossless_in_speculative_and_pipeinfer(cli, tmp_path, distilled, small_target):
    plan, _ = distilled

    def tokens(*args):
        stats = tmp_path / f"stats-{abs(hash(args))}.json"
        done = cli("run", "--hostfile", "hosts/local.txt", "--model", str(small_target), "--chat-template", "-p",
                   "Tell me a short story about a brave mouse.", "-n", "16", "--stats-json", str(stats), *args)
        assert done.returncode == 0, done.stderr
        return read_json(stats)

    expected = tokens("--mode", "single", "-t", "1")["tokens"]
    # the same checks as any draft's (tests/test_speculative_modes.py): pipeinfer on two target stages,
    # where it speculates from the start; on one stage its switch may find this draft (about as slow as
    # the 4-layer target: both pay the same output matrix) not worth a run, and draft nothing
    for mode in ("speculative", "pipeinfer"):
        stats = tokens("--mode", mode, "--stages", "2", "--draft", str(plan.out))
        assert stats["tokens"] == expected, mode
        assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"], mode


def test_an_unsupported_architecture_is_one_line(cli, tmp_path):
    from pipeinfer_cpu.modelfiles.tinymodel import TinyShape, write_tiny_model

    target = write_tiny_model(tmp_path / "qwen2.gguf", "qwen2", TinyShape(n_vocab=400))
    done = cli("draft", "distill", "--target", str(target), "-o", str(tmp_path / "d.gguf"))
    assert_clean_failure(done, "draft distill supports the llama architecture, not 'qwen2'")
