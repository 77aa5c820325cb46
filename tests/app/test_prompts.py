"""--prompts-file lines: one prompt each, `\\n` standing for a newline as in llama.cpp's -p."""

import pytest

from pipeinfer_cpu.app.prompts import escape, read_prompts, unescape


@pytest.mark.parametrize("prompt", ["plain", "two\nlines", "tab\there", "a \\n literal backslash-n", "\\", "ü\n\\\n"])
def test_escape_and_unescape_are_inverse(prompt):
    line = escape(prompt)
    assert "\n" not in line and unescape(line) == prompt


def test_a_prompts_file_reads_escapes(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("def f():\\n    return 1\n\n<|im_start|>user\\nHi<|im_end|>\n")
    assert read_prompts(None, None, path) == ("def f():\n    return 1", "<|im_start|>user\nHi<|im_end|>")
