"""A raw prompt is read the way llama.cpp's own programs read it: special-token text is those tokens."""

import pytest

from conftest import real_model
from pipeinfer_cpu.llama.runtime import Vocab

PREFORMATTED = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def vocab(default_model):
    return Vocab(default_model)


def test_a_preformatted_prompt_is_the_chat_template_s_tokens(vocab):
    """The default model's template renders one user turn as exactly this text, so both must agree."""
    assert vocab.text_tokens(PREFORMATTED) == vocab.chat_tokens([("user", "What is 2+2?")])


def test_special_token_text_can_be_taken_literally(vocab):
    special = vocab.text_tokens("<|im_start|>")
    literal = vocab.text_tokens("<|im_start|>", parse_special=False)
    assert len(special) == 1 and len(literal) > 1 and special[0] not in literal


# Token ids printed by llama.cpp's own tokenizer program, built from the vendored llama.cpp of the
# llama-cpp-python 0.3.36 sdist (`cmake --build build --target llama-tokenize`), on the default model:
#   llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf -p PROMPT --ids [--no-parse-special] --log-disable
LLAMA_TOKENIZE = [
    (PREFORMATTED, True, [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]),
    (PREFORMATTED, False, [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 1780, 314, 216, 34, 27, 34, 15137, 108, 306,
                           79, 486, 108, 46, 198, 44, 108, 306, 79, 3738, 108, 46, 520, 9531, 198]),
    ("Explain in two sentences why the sky is blue.", True, [36971, 281, 827, 8545, 1701, 260, 6376, 314, 4461, 30]),
]


@pytest.mark.parametrize("prompt, parse_special, expected", LLAMA_TOKENIZE)
def test_token_ids_equal_llama_tokenize(vocab, prompt, parse_special, expected):
    assert vocab.text_tokens(prompt, parse_special) == expected


# The real models of the catalogue (fetched by `make test`), the same program and build:
#   llama-tokenize -m MODEL.gguf -p PROMPT --ids --log-disable [--no-parse-special]
QWEN_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "Write a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n")
GEMMA_CHAT = "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n"
PLAIN = "def add(a, b):  # two   spaces, ünïcödé and 12345"
QWEN_IDS = [
    (QWEN_CHAT, True, [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 7985,
                       264, 6386, 38242, 911, 279, 9396, 13, 151645, 198, 151644, 77091, 198]),
    (QWEN_CHAT, False, [27, 91, 318, 4906, 91, 29, 8948, 198, 2610, 525, 264, 10950, 17847, 15757, 91, 318, 6213, 91,
                        397, 27, 91, 318, 4906, 91, 29, 872, 198, 7985, 264, 6386, 38242, 911, 279, 9396, 15757, 91,
                        318, 6213, 91, 397, 27, 91, 318, 4906, 91, 29, 77091, 198]),
    (PLAIN, True, [750, 912, 2877, 11, 293, 1648, 220, 671, 1378, 256, 12621, 11, 10489, 77, 37572, 66, 2956, 128505,
                   323, 220, 16, 17, 18, 19, 20]),
]
REAL_MODEL_IDS = {
    "qwen2.5-coder-1.5b": QWEN_IDS,
    "qwen2.5-coder-0.5b": QWEN_IDS,  # the same tokenizer, checked on its own file
    "gemma3-270m": [
        (GEMMA_CHAT, True, [2, 105, 2364, 107, 6974, 496, 678, 20517, 1003, 506, 5442, 236761, 106, 107, 105, 4368,
                            107]),
        (GEMMA_CHAT, False, [2, 236820, 3041, 236779, 1340, 236779, 887, 236813, 2364, 107, 6974, 496, 678, 20517,
                             1003, 506, 5442, 21603, 643, 236779, 1340, 236779, 887, 236813, 107, 236820, 3041,
                             236779, 1340, 236779, 887, 236813, 4368, 107]),
        (PLAIN, True, [2, 2063, 1138, 236769, 236746, 236764, 518, 1473, 138, 236865, 1156, 139, 35220, 236764,
                       174898, 238527, 236755, 55515, 236859, 532, 236743, 236770, 236778, 236800, 236812, 236810]),
    ],
}


@pytest.mark.parametrize("name", REAL_MODEL_IDS)
def test_real_models_token_ids_equal_llama_tokenize(name):
    vocab = Vocab(real_model(name))
    try:
        for prompt, parse_special, expected in REAL_MODEL_IDS[name]:
            assert vocab.text_tokens(prompt, parse_special) == expected, (prompt, parse_special)
    finally:
        vocab.close()
