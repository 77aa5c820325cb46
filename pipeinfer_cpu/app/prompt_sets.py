"""Prompt sets that look like real use, for `bench --prompt-sets` (each prompt one user turn, run with
the model's chat template). How much a draft is right depends on the request: an answer that edits
given code or quotes given text repeats its prompt (where an n-gram draft shines), a free-form
story repeats nothing. Fixed here so every benchmark measures the same requests."""

from __future__ import annotations

from pipeinfer_cpu.errors import UserError

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    # code completion and editing: the answer returns the given code, changed
    "code": (
        "Add type hints and a docstring to this Python function and return the whole function:\n\n"
        "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
        "    return total / len(values)\n",
        "Rename the parameter `data` to `rows` in this function and return the whole function:\n\n"
        "def count_valid(data):\n    valid = 0\n    for item in data:\n        if item is not None and item != '':\n"
        "            valid += 1\n    print('valid rows:', valid, 'of', len(data))\n    return valid\n",
        "Fix the bug in this JavaScript function and return the corrected function:\n\n"
        "function sum(xs) {\n  let total = 0;\n  for (let i = 0; i <= xs.length; i++) {\n    total += xs[i];\n"
        "  }\n  return total;\n}\n",
        "Complete this Python class with pop, peek and is_empty methods:\n\n"
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
        "        self.items.append(item)\n",
    ),
    # chat that quotes what someone wrote
    "chat": (
        'My landlord wrote: "The water will be turned off on Tuesday from 9am to 1pm for pipe repairs. Please '
        'store some water in advance." What does this mean for me, and what should I do?',
        'A colleague emailed me: "Can you send me the quarterly report by Friday? I need the sales figures for '
        'the north and south regions." Write a short, polite reply saying I will send it on Thursday.',
        'My friend texted: "Sorry, I can\'t make it to dinner tonight, my car broke down." Suggest a kind reply.',
        "Explain this error message to me: \"TypeError: unsupported operand type(s) for +: 'int' and 'str'\"",
    ),
    # summarising a given text
    "summary": (
        "Summarise this text in two sentences:\n\nThe city council met on Monday to discuss the new bicycle lanes "
        "on Main Street. Supporters said the lanes would make cycling safer and reduce traffic. Shop owners "
        "worried that removing parking spaces would hurt their business. After a long debate, the council voted "
        "to build the lanes on a trial basis for six months and to review the effect on local shops.",
        "Summarise these meeting notes as a short bullet list:\n\n- The launch date moves from March 3 to March "
        "17.\n- Maria will finish the user guide by March 10.\n- The test team found 12 bugs; 9 are fixed.\n- The "
        "marketing budget stays the same.\n- Next meeting: March 6 at 10am.",
        "Summarise this product review in one sentence:\n\nI bought this kettle a month ago. It boils water "
        "quickly and the handle stays cool, which I like. However, the lid is hard to open with one hand and the "
        "power cable is very short, so I have to keep it right next to the socket. Overall it is good value for "
        "the price.",
        "Summarise this email for me in two sentences:\n\nHi team, the office will be closed next Monday for "
        "the public holiday. Please make sure all customer tickets that are due on Monday are answered by Friday "
        "evening. If you are on call, the usual phone number stays the same. Thanks, Sam",
    ),
    # free-form writing: nothing to repeat
    "story": (
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Tell me a bedtime story about a small dragon who is afraid of the dark.",
        "Write a short story that begins: The train stopped in the middle of nowhere.",
        "Write a short story about two robots who become friends in a junkyard.",
    ),
}


def prompt_sets(names: str) -> dict[str, tuple[str, ...]]:
    """The sets named in a comma-separated list (`all`: every set), in that order."""
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    wanted = list(PROMPT_SETS) if wanted == ["all"] else wanted
    unknown = [name for name in wanted if name not in PROMPT_SETS]
    if unknown or not wanted:
        named = ", ".join(unknown) if unknown else repr(names)
        raise UserError(f"unknown prompt set {named}: choose from {', '.join(PROMPT_SETS)} or all")
    return {name: PROMPT_SETS[name] for name in wanted}
