"""One row's constraint while it decodes: the mask of tokens its grammar allows next, and the
guarantee that the answer is complete when the token budget runs out.

Closing in time: when few tokens are left (`watch`), every step works out a short way to
finish the answer from where it is (a greedy walk through the grammar preferring closing
tokens: `"`, `}`, `]`, then the shortest values, then the longest tokens). If the token just
sampled leaves no such way within the budget, it is undone and the row instead follows the
way found before it, which fitted. Deterministic: every rank of a torchrun group, given the
same tokens, makes the same choice.
"""

from typing import List, Optional

import numpy as np
import torch

from llama.grammar import GrammarError, GrammarSpec, Vocabulary

CLOSERS = set(b'"}]')
# after closers: separators (taken only where a closer is not allowed: a required key or
# item is missing, or a number must end), then the shortest values
STARTERS = [b",", b":", b"0", b"1", b'"', b"[", b"{", b"t", b"f", b"n"]
WATCH = 64  # closing is watched over a row's last this many tokens (or more, see Constraint)


class ConstraintError(GrammarError):
    """The budget cannot hold the shortest answer the grammar allows."""


def closing_ranks(vocab: Vocabulary) -> np.ndarray:
    """A preference per token id for finishing an answer quickly (lower first): tokens made
    only of closers, longest first; then the short value starters; then the rest, longest
    first; special and empty tokens last."""
    n = vocab.n_vocab
    ranks = np.empty(n, dtype=np.int64)
    for i, text in enumerate(vocab.tokens):
        if not text or text.startswith(b"\xff"):
            ranks[i] = 3 << 20
        elif all(c in CLOSERS for c in text):
            ranks[i] = (0 << 20) + (64 - min(len(text), 63))
        elif text in STARTERS:
            ranks[i] = (1 << 20) + STARTERS.index(text)
        else:
            ranks[i] = (2 << 20) + (64 - min(len(text), 63))
        ranks[i] = ranks[i] * n + i  # ties broken by id: one answer everywhere
    return ranks


class Constraint:
    """A row's grammar state. fill_mask() before sampling, commit(token) after."""

    def __init__(self, vocab: Vocabulary, spec: GrammarSpec, limit: int):
        self.vocab, self.spec, self.limit = vocab, spec, limit
        if vocab.ranks is None:
            vocab.ranks = closing_ranks(vocab)
        self.matcher = vocab.matcher(spec)
        self.words = (vocab.n_vocab + 31) // 32
        self.generated = 0
        self.forced: List[int] = []  # a closing being followed
        shortest = self._closing(limit)
        if shortest is None:
            raise ConstraintError(
                f"the token budget ({limit}) is smaller than the shortest answer the "
                f"{spec.kind} allows: raise max_tokens / max_gen_len")
        self.watch = max(WATCH, 4 * len(shortest) + 16)
        self.fallback: Optional[List[int]] = shortest if limit <= self.watch else None

    @property
    def remaining(self) -> int:
        return self.limit - self.generated

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into row ((n_vocab + 31) // 32 int32 words, bit i of
        word w for token 32 w + i), a contiguous CPU tensor."""
        if self.forced:
            row.zero_()
            token = self.forced[0]
            row[token // 32] = _bit(token % 32)
            return
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)

    def commit(self, token: int) -> int:
        """Take the sampled token; returns the token the row really takes (a closing token
        instead, when the sampled one would leave no room to finish)."""
        if self.forced:
            token = self.forced.pop(0)
            self._consume(token)
            return token
        if self.fallback is None and self.remaining - 1 <= self.watch:  # entering the watch
            self.fallback = self._closing(self.remaining)  # from before this token
        self._consume(token)
        if token == self.vocab.eos_id or self.remaining > self.watch:
            return token
        plan = self._closing(self.remaining)
        if plan is None and self.fallback is not None:
            self.matcher.rollback(1)  # the sampled token leaves no way out in the budget
            self.generated -= 1
            token, self.forced = self.fallback[0], self.fallback[1:]
            self._consume(token)
            self.fallback = None
            return token
        self.fallback = plan
        return token

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask "
                               f"allowed: {self.matcher.get_error()}")
        if token != self.vocab.eos_id:
            self.generated += 1

    def _closing(self, budget: int) -> Optional[List[int]]:
        """The tokens of a greedy way to a complete answer from here, at most `budget` of
        them (None if it is longer); the matcher is left where it was."""
        plan: List[int] = []
        mask = torch.empty(self.words, dtype=torch.int32)
        ranks = self.vocab.ranks
        try:
            while not self.matcher.is_accepting():
                if len(plan) >= budget:
                    return None
                self.matcher.unsafe_compute_mask_ptr(mask.data_ptr(), self.words * 4)
                allowed = np.unpackbits(mask.numpy().view(np.uint8),
                                        bitorder="little")[: self.vocab.n_vocab].astype(bool)
                allowed[self.vocab.eos_id] = False
                if not allowed.any():
                    return None
                token = int(np.where(allowed, ranks, np.iinfo(np.int64).max).argmin())
                if not self.matcher.consume_token(token):
                    return None
                plan.append(token)
            return plan
        finally:
            if plan:
                self.matcher.rollback(len(plan))


def _bit(i: int) -> int:
    """The int32 value with only bit i set (bit 31 is the sign)."""
    return -(1 << 31) if i == 31 else 1 << i


def apply_masks(logits: torch.Tensor, masks: torch.Tensor, rows: List[int]) -> None:
    """Set to -inf the logits of tokens the masks forbid, in the given rows of logits
    (bsz, vocab) only: masks (len(rows), words) int32 bitmasks on the CPU."""
    # numpy unpacks the bits ~100x faster than shifts and ands of torch ops would
    bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")
    forbidden = torch.from_numpy(bits[:, : logits.shape[-1]] == 0)
    forbidden = forbidden.to(logits.device, non_blocking=True)
    for i, row in enumerate(rows):
        logits[row].masked_fill_(forbidden[i], float("-inf"))
