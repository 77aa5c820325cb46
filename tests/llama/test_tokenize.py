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
