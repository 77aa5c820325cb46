"""Stop strings: an answer ends where one of them appears, and the user never sees it.

Text arrives in pieces (a token's printable text each). A piece that could be the start of a
stop string is held back until the next pieces show whether it is one, so a stream shows exactly
what the finished answer holds: the text before the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Turns pieces of generated text into what may be shown now, watching for stop strings."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.matched: str | None = None  # the stop string that ended the text, once one did
        self._held = ""

    def push(self, piece: str) -> str:
        """The text that can be shown after `piece` came (nothing once a stop string matched)."""
        if self.matched is not None:
            return ""
        text = self._held + piece
        found = [(text.find(stop), stop) for stop in self.stops if stop in text]
        if found:
            at, self.matched = min(found)
            self._held = ""
            return text[:at]
        keep = _longest_stop_prefix_at_end(text, self.stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the answer (it was no stop string after all)."""
        held, self._held = self._held, ""
        return held


def _longest_stop_prefix_at_end(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` begin some stop string (a whole stop string is not counted)."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best
