"""A raw prompt is read the way llama.cpp's own programs read it: special-token text is those tokens."""

import pytest

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
