"""Text of a generation as its tokens arrive: incremental detokenisation, stop strings, and the
pieces that are safe to stream. Pure bookkeeping over a tokenizer; no model, no tensors."""

from typing import List, Sequence


class TextTracker:
    """One row's text, kept equal to tokenizer.decode(tokens) as tokens are added, with
    constant work per token, cut before the first stop string that appears in it."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), after: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        # `after`: the token the text follows (a prompt's last). Its text is decoded as it sits
        # after that token, keeping the space SentencePiece drops at the start of a text
        # ("A list is" + " a tuple", not + "a tuple"). Empty: decoded alone, as Meta's does.
        self.after = list(after)
        self.tokens: List[int] = []
        self.text = ""
        self.settled = 0  # tokens whose text can no longer change (see _extend)
        self.settled_text = ""  # their text
        self.emitted = 0  # characters of `text` already streamed
        self.stopped_by = None  # the stop string found, if any

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string has just ended the text (it is cut
        before the stop string, which is never part of it)."""
        self.tokens.append(token)
        unchanged = min(len(self.text), len(self.settled_text))  # text before this is final
        self._extend()
        for s in self.stop:  # a match not there before must reach into the text that changed
            at = self.text.find(s, max(0, unchanged - len(s) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.stopped_by = s
                return True
        return False

    def _extend(self, settle_every: int = 8) -> None:
        """Update text to tokenizer.decode(tokens) after a token was appended, decoding only
        the tokens since the last settled point, plus the one before it. That one token of
        context makes the rest decode as it does mid-text (SentencePiece drops the whitespace
        a text starts with), so the point only settles where that token decodes to
        something, and where the text does not end in half a multi-byte character that later
        byte tokens may still complete."""
        context = self.tokens[self.settled - 1: self.settled] if self.settled else self.after
        head = self.tokenizer.decode(context)
        window = self.tokenizer.decode(context + self.tokens[self.settled:])
        self.text = self.settled_text + window[len(head):]
        if (len(self.tokens) - self.settled >= settle_every and not self.text.endswith("\ufffd")
                and self.tokenizer.decode(self.tokens[-1:])):
            self.settled, self.settled_text = len(self.tokens), self.text

    def piece(self) -> str:
        """The new part of the text that is safe to emit now: it will not change as tokens
        arrive (no trailing half of a multi-byte character) and cannot be the start of a stop
        string."""
        text = self.text
        if self.stopped_by is not None:
            safe = len(text)  # already cut before the stop string
        else:
            end = len(text.rstrip("\ufffd"))
            safe = end - max((stop_prefix_at_end(text, end, s) for s in self.stop), default=0)
        if safe <= self.emitted:
            return ""
        piece = text[self.emitted: safe]
        self.emitted = safe
        return piece

    def rest(self) -> str:
        """Whatever has not been emitted, once the row is finished."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def tokens_before_stop(self) -> List[int]:
        """The longest run of the tokens whose text fits before the stop string (all of them
        when no stop string ended the text)."""
        if self.stopped_by is None:
            return list(self.tokens)
        prefix = TextTracker(self.tokenizer, after=self.after)
        for token in self.tokens:
            prefix.add(token)
            if len(prefix.text) > len(self.text):
                prefix.tokens.pop()
                break
        return prefix.tokens


def stop_prefix_at_end(text: str, end: int, stop: str) -> int:
    """The length of the longest proper prefix of `stop` that text[:end] ends with (0 if
    none): text that may yet become the stop string, held back. Looks only at the last
    len(stop) - 1 characters, at the places where stop's first character stands, so a step
    costs at most len(stop) comparisons of C speed whatever the text's length."""
    at = text.find(stop[0], max(end - len(stop) + 1, 0), end)
    while at != -1:  # the first candidate that matches is the longest
        if stop.startswith(text[at:end]):
            return end - at
        at = text.find(stop[0], at + 1, end)
    return 0
