"""A completion's text as its tokens arrive (incremental decoding, stop strings), shared by the runtime's
generate/stream and the serving engine."""

from __future__ import annotations


class Text:
    """A completion's text as its tokens arrive, decoded incrementally: each token decodes a window that
    starts at the previous token boundary (so a tokenizer that strips a leading space, or a character split
    across tokens, decodes as the whole sequence does), and stop strings are looked for only where the new
    text could complete one. Per token the cost is the window, not the whole completion so far."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.done = ""            # the text of tokens[:read], whole characters
        self.pending = ""         # the text after it: an incomplete character ends it (U+FFFD)
        self.prefix = self.read = 0
        self.longest = max(map(len, stops), default=0)

    @property
    def text(self) -> str:
        return self.done + self.pending

    def add(self, token: int) -> bool:
        """Take one token; True when the text now holds a stop string (the text is then cut before it)."""
        before = len(self.text)
        self.tokens.append(token)
        head = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        tail = self.tokenizer.decode(self.tokens[self.prefix:])
        if tail.startswith(head):
            self.pending = tail[len(head):]
        else:  # the new token changed how earlier ones decode: decode it all again, once
            self.done, self.prefix, self.read = "", 0, 0
            self.pending = self.tokenizer.decode(self.tokens)
        if not self.pending.endswith("\ufffd"):
            if self.pending:  # the next window starts at a token with text (one without, e.g. a lone space a
                self.prefix = self.read  # tokenizer strips at the start of a decode, would lose it)
            self.done, self.pending, self.read = self.done + self.pending, "", len(self.tokens)
        if not self.stops:
            return False
        text, start = self.text, max(0, before - self.longest + 1)
        cut = min((i for i in (text.find(s, start) for s in self.stops if s) if i >= 0), default=-1)
        if cut < 0:
            return False
        self.done, self.pending = text[:cut], ""
        return True


def held_back(text: str, stops: tuple) -> int:
    """How many trailing characters of text could be the start of a stop string (not sent yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
