"""Detokenisation of a sample as it grows, and stop sequences.

Text is streamed token by token the way TGI does it: decode a short window of recent tokens with
and without the newest one and emit the difference, holding it back while it ends in an incomplete
character (a multi-byte character split over tokens). The final text is one full decode, cut at
the earliest stop sequence.
"""
from __future__ import annotations


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Text before the earliest stop sequence, and whether one was found."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StreamDecoder:
    """The generated tokens of one sample, their text so far, and whether a stop sequence appeared."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""              # text emitted so far
        self.stopped = False        # a stop sequence appeared in the text
        self._prefix_offset = 0     # the decode window: tokens before it never change the new text
        self._read_offset = 0

    def push(self, token: int) -> str:
        """Adds a token; returns the text it completes (maybe empty)."""
        self.token_ids.append(token)
        new = self._next_text()
        if self.stop and new:
            # only a stop sequence that ends in the new text can be new
            window = self.text[max(0, len(self.text) - len(new) - self._longest_stop + 1):]
            self.stopped = any(s in window for s in self.stop)
        return new

    def _next_text(self) -> str:
        ids, decode = self.token_ids, self.tokenizer.decode
        before = decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        after = decode(ids[self._prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            self.text += after[len(before):]
            return after[len(before):]
        return ""

    def final_text(self) -> str:
        """The whole sample decoded at once, cut at the earliest stop sequence."""
        return cut_at_stop(self.tokenizer.decode(self.token_ids, skip_special_tokens=True), self.stop)[0]
