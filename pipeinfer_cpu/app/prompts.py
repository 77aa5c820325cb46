"""Where prompts come from: --prompt, a whole --prompt-file, or a --prompts-file of one prompt per line."""

from __future__ import annotations

import re
from pathlib import Path

from pipeinfer_cpu.errors import UserError


def read_prompts(prompt: str | None, prompt_file: Path | None, prompts_file: Path | None) -> tuple[str, ...]:
    """The prompt(s) to answer: --prompt, the whole of --prompt-file, or one per line of --prompts-file."""
    given = [x for x in (prompt, prompt_file, prompts_file) if x is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --prompt TEXT, --prompt-file FILE or --prompts-file FILE")
    if prompt is not None:
        return (_not_empty(prompt, "--prompt"),)
    path = prompt_file or prompts_file
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if prompt_file is not None:
        return (_not_empty(text, str(path)),)
    prompts = tuple(unescape(line) for line in text.splitlines() if line.strip())
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def _not_empty(prompt: str, where: str) -> str:
    if not prompt.strip():
        raise UserError(f"{where}: the prompt is empty (nothing to continue)")
    return prompt


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(line: str) -> str:
    """A --prompts-file line: `\\n` stands for a newline, `\\t` a tab, `\\\\` a backslash (as llama.cpp's -p
    reads escapes), so a prompt with line breaks fits on one line."""
    return re.sub(r"\\(.)", lambda match: _ESCAPES.get(match[1], match[0]), line)


def escape(prompt: str) -> str:
    """The --prompts-file line of a prompt: the inverse of `unescape`."""
    return prompt.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
