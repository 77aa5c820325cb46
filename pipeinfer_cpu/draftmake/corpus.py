"""What the target writes its training text from: chat prompts made from templates and subjects (no
outside data set), tokenised here with llama.cpp so the GPU machine needs no tokenizer.

The held-out prompts are the benchmark's prompt sets (`app/prompt_sets.py`), which no template here
reproduces."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np

TASKS = (
    "Write a short story about {s}.", "Explain {s} to a ten-year-old.", "Give me three facts about {s}.",
    "Write a poem about {s}.", "What are the pros and cons of {s}?", "Describe {s} in one paragraph.",
    "Write a blog post introduction about {s}.", "How does {s} work?", "Tell me a joke about {s}.",
    "Write a dialogue between two friends talking about {s}.", "List five questions a student might ask about {s}.",
    "Write a product description for something related to {s}.", "Summarise what people usually know about {s}.",
    "Write an email to a colleague about {s}.", "What is the history of {s}?", "Give me tips for learning about {s}.",
    "Write a Python function related to {s}, with a docstring.", "Compare {s} with something similar.",
    "Write a news headline and a short article about {s}.", "Why is {s} important?",
    "Rewrite this sentence more formally: I think {s} is really cool and everyone should try it.",
    "Translate into simple English: {s} is a topic of considerable complexity and broad interest.",
    "Summarise in one sentence: Many people find {s} interesting because it touches daily life in surprising ways.",
    "My friend said: \"I don't get {s} at all.\" How can I explain it to them?",
)

SUBJECTS = (
    "the ocean", "volcanoes", "a lost cat", "the moon", "bread baking", "electric cars", "honey bees", "chess",
    "the solar system", "rainforests", "a robot chef", "friendship", "the first day of school", "recycling",
    "photosynthesis", "the internet", "a haunted house", "mountain climbing", "coffee", "ancient Egypt",
    "dinosaurs", "sorting algorithms", "linked lists", "a birthday party", "time management", "the weather",
    "a small village", "the piano", "football", "gardening", "healthy breakfasts", "space travel", "a wizard",
    "learning a new language", "climate change", "the human heart", "trains", "a rainy afternoon", "pirates",
    "machine learning", "spreadsheets", "a job interview", "saving money", "the desert", "penguins",
    "a detective", "a summer holiday", "clouds", "the printing press", "knitting", "bicycles", "a dragon",
    "recursion", "databases", "writing clean code", "the brain", "sleep", "a lighthouse", "jazz music",
    "a city at night", "smartphones", "vaccines", "the Roman Empire", "owls", "kindness", "a marathon",
)

SYSTEMS = (None, "You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are a friendly teacher.")


def training_prompts(seed: int = 0) -> list[list[tuple[str, str]]]:
    """Every task x subject pair as a chat (a random system message or none), shuffled."""
    rng = random.Random(seed)
    chats = []
    for task, subject in itertools.product(TASKS, SUBJECTS):
        system = rng.choice(SYSTEMS)
        chat = [("system", system)] if system else []
        chats.append(chat + [("user", task.format(s=subject))])
    rng.shuffle(chats)
    return chats


def tokenised(vocab, chats: list[list[tuple[str, str]]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Chats in the model's template as a right-padded int32 array and their lengths (longer ones cut
    from the left: the end holds the assistant's turn)."""
    rows = [vocab.chat_tokens(chat)[-max_len:] for chat in chats]
    out = np.zeros((len(rows), max_len), dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out, np.array([len(row) for row in rows], dtype=np.int32)


def write_prompts(target: Path, path: Path, max_len: int = 96, seed: int = 0) -> int:
    """Tokenise the training prompts of `target` into `path` (.npz); the number of prompts."""
    from pipeinfer_cpu.llama.runtime import Vocab

    vocab = Vocab(target)
    try:
        tokens, lengths = tokenised(vocab, training_prompts(seed), max_len)
        ends = np.array(sorted({t for t in range(vocab.n_vocab) if vocab.is_end(t)}), dtype=np.int32)
        before, after = question_frame(vocab)
    finally:
        vocab.close()
    np.savez(path, tokens=tokens, lengths=lengths, ends=ends, question_before=np.array(before, dtype=np.int32),
             question_after=np.array(after, dtype=np.int32))
    return len(tokens)


def question_frame(vocab) -> tuple[list[int], list[int]]:
    """The template's tokens before and after a user's question, for questions the target writes itself."""
    marker = "\u2063QUESTION\u2063"
    text = vocab.apply_chat_template([("user", marker)], add_assistant=True)
    before, after = text.split(marker)
    return (vocab.tokenize(before, add_special=True, parse_special=True),
            vocab.tokenize(after, add_special=False, parse_special=True))
