"""Output text of a sequence: stop strings matched across token boundaries, stable deltas."""

from __future__ import annotations

from collections.abc import Callable

# Decoding a prefix that ends inside a multi-byte character yields this replacement character.
INCOMPLETE_CHAR = "\ufffd"


class OutputText:
    """Tracks the text of generated tokens and finds stop strings as tokens arrive.

    Stop tokens are never added, so the text of a sequence ended by one leaves it out.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_at: int | None = None  # character offset where a stop string begins

    def add(self, token: int) -> bool:
        """Append a token; returns True when it completes a stop string."""
        self.token_ids.append(token)
        if not self.stop:
            return False
        previous_len = len(self.text)
        self.text = self.decode(self.token_ids)
        # A new token can only complete a stop string that began within the last
        # len(stop) - 1 characters; a few more cover characters whose bytes just completed.
        longest = max(len(s) for s in self.stop)
        search_from = max(0, previous_len - longest - 4)
        found = [at for at in (self.text.find(s, search_from) for s in self.stop) if at >= 0]
        if found:
            self.stop_at = min(found)
            return True
        return False

    def final_text(self) -> str:
        """Return the text to send, cut before a stop string if one was found."""
        if self.stop_at is not None:
            return self.text[: self.stop_at]
        return self.decode(self.token_ids)

    def stable_text(self) -> str:
        """Return the text so far without a trailing incomplete multi-byte character.

        Stream deltas are differences of stable texts, so their concatenation equals the
        final text.
        """
        text = self.decode(self.token_ids)
        if self.stop:
            # Hold back what could be the start of a stop string.
            longest = max(len(s) for s in self.stop)
            text = text[: max(0, len(text) - longest + 1)]
        return text.rstrip(INCOMPLETE_CHAR)
