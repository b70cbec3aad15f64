"""The text of a completion that grows one token at a time: stop strings and what is safe to stream.

Decoding the whole completion after every token costs O(n^2) over a long completion, so the text is
kept as a settled part (ending on a whole character) plus a short tail decoded afresh. Byte-level BPE
can split one character over several tokens; until it is whole the tail ends in U+FFFD, which is
never streamed. Text that could still turn into the start of a stop string is held back, so a client
never receives characters that the stop string later cuts off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..generation.core import first_stop

REPLACEMENT = "\ufffd"


class IncrementalText:
    """Decoded text of `ids`, cut at the first stop string, with a cursor of what was already sent."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self.stops = tuple(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self.sent = 0  # characters of `text` already handed out by `take`
        self._settled_ids = 0
        self._settled_text = ""
        self._searched = 0  # no stop string starts before (this - hold)

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string now appears (the text is then cut before it)."""
        self.ids.append(token)
        tail = self._decode(self.ids[self._settled_ids:])
        self.text = self._settled_text + tail
        if not tail.endswith(REPLACEMENT):
            self._settled_ids, self._settled_text = len(self.ids), self.text
        if self.stops:
            cut = first_stop(self.text, self.stops, max(0, self._searched - self._hold))
            if cut != -1:
                self.text = self.text[:cut]
                self.stopped = True
                return True
            self._searched = len(self.text.rstrip(REPLACEMENT))
        return False

    def take(self, final: bool = False) -> str:
        """Text not sent yet that can no longer change (everything, when `final`)."""
        end = len(self.text) if final else len(self.text.rstrip(REPLACEMENT)) - self._hold
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
