"""One row's constraint while it decodes: the mask of tokens its grammar allows next, and the
guarantee that the answer is complete when the token budget runs out.

Closing in time: a short way to finish the answer from where it is (a greedy walk through
the grammar preferring closing tokens: `"`, `}`, `]`, then separators and the shortest values,
then the longest tokens) is worked out every REFRESH tokens, and after every token once the
budget left is within twice its length (plus a margin). If the token just sampled leaves no
such way within the budget, it is undone and the row instead follows the way found before
it, which fitted. Deterministic: every rank of a torchrun group, given the
same tokens, makes the same choice.
"""

from typing import List, Optional

import numpy as np
import torch

from llama.constrained.grammar import GrammarError, GrammarSpec, Vocabulary

CLOSERS = set(b'"}]')
# after closers: separators (taken only where a closer is not allowed: a required key or
# item is missing, or a number must end), then the shortest values
STARTERS = [b",", b":", b"0", b"1", b'"', b"[", b"{", b"t", b"f", b"n"]
WATCH = 48  # every token is checked over a row's last this many tokens (or more, see _near)
REFRESH = 4  # before that, the closing's length is worked out every this many tokens
CANDIDATES = 256  # closing's preferred tokens tested first, before the whole vocabulary


class ConstraintError(GrammarError):
    """The budget cannot hold the shortest answer the grammar allows."""


def closing_ranks(vocab: Vocabulary) -> np.ndarray:
    """A preference per token id for finishing an answer quickly (lower first): tokens made
    only of closers, those starting with a quote first, longest first; then the short value
    starters; then the rest, longest
    first; special and empty tokens last."""
    n = vocab.n_vocab
    ranks = np.empty(n, dtype=np.int64)
    for i, text in enumerate(vocab.tokens):
        if not text or text.startswith(b"\xff"):
            ranks[i] = 3 << 20
        elif all(c in CLOSERS for c in text):  # a quote first: inside a string, it closes
            ranks[i] = (0 << 20) + (0 if text[0] == ord('"') else 64) + 64 - min(len(text), 63)
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
        if vocab.ranks is None:  # (the server's threads may race here: order set first)
            ranks = closing_ranks(vocab)
            vocab.order = np.argsort(ranks)  # token ids, preferred first
            vocab.ranks = ranks
        self.matcher = vocab.matcher(spec)
        self.stops = frozenset(vocab.stop_ids)
        self._stop_array = np.array(vocab.stop_ids)
        self.words = (vocab.n_vocab + 31) // 32
        self._mask = torch.empty(self.words, dtype=torch.int32)
        self.generated = 0
        self.forced: List[int] = []  # a closing being followed
        shortest = self._closing(limit)
        if shortest is None:
            if self._closing(4 * limit + 64) is None:
                raise GrammarError(
                    f"no complete answer to this {spec.kind} was found (within "
                    f"{4 * limit + 64} tokens, by a greedy walk): check that the "
                    f"vocabulary can spell what it requires")
            raise ConstraintError(
                f"the token budget ({limit}) is smaller than the shortest answer the "
                f"{spec.kind} allows: raise max_tokens / max_gen_len")
        self.estimate = len(shortest)  # the last closing's length
        # a way to finish from the state after `fallback_at` tokens, which fits the budget
        self.fallback, self.fallback_at = shortest, 0

    @property
    def remaining(self) -> int:
        return self.limit - self.generated

    def _near(self, remaining: int) -> bool:
        """Close enough to the budget's end that every token is checked (with room for a
        token that lengthens the closing a lot: an estimate is only refreshed every
        REFRESH tokens before)."""
        return remaining <= max(WATCH, 2 * self.estimate + 32)

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
        near = self._near(self.remaining - 1)
        if near and self.fallback_at != self.generated:  # entering: a way from before it
            self._remember(self._closing(self.remaining))
        self._consume(token)
        if token in self.stops:
            return token
        if near:
            plan = self._closing(self.remaining)
            if plan is None and self.fallback is not None:
                self.matcher.rollback(1)  # the sampled token leaves no way out in the budget
                self.generated -= 1
                token, self.forced = self.fallback[0], self.fallback[1:]
                self._consume(token)
                self.fallback = None
                return token
            self._remember(plan)
        elif self.generated % REFRESH == 0:
            self._remember(self._closing(self.remaining))
        return token

    def _remember(self, plan: Optional[List[int]]) -> None:
        self.fallback, self.fallback_at = plan, self.generated
        if plan is not None:
            self.estimate = len(plan)

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask "
                               f"allowed: {self.matcher.get_error()}")
        if token not in self.stops:
            self.generated += 1

    def _closing(self, budget: int) -> Optional[List[int]]:
        """The tokens of a greedy way to a complete answer from here, at most `budget` of
        them (None if it is longer); the matcher is left where it was. Forced stretches
        (a required key's name) are taken whole, without a mask."""
        plan: List[int] = []
        try:
            while not self.matcher.is_accepting():
                if len(plan) >= budget:
                    return None
                forced = self.matcher.compute_ff_tokens()
                if forced:
                    taken = self.matcher.try_consume_tokens(forced)
                    plan += forced[:taken]
                    if taken:
                        continue
                token = self._preferred()
                if token is None or not self.matcher.consume_token(token):
                    return None
                plan.append(token)
            return plan if len(plan) <= budget else None
        finally:
            if plan:
                self.matcher.rollback(len(plan))

    def _preferred(self) -> Optional[int]:
        """The allowed token (not a stop token) that closing prefers, by vocab.order: the first few
        candidates are tested bit by bit, the whole vocabulary only if none is allowed."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self.words * 4)
        words = self._mask.numpy().view(np.uint32)
        order = self.vocab.order
        head = order[:CANDIDATES]
        hits = (words[head >> 5] >> (head & 31).astype(np.uint32)) & 1
        hits[np.isin(head, self._stop_array)] = 0
        if hits.any():
            return int(head[hits.argmax()])
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[order]
        allowed[np.isin(order, self._stop_array)] = 0
        return int(order[allowed.argmax()]) if allowed.any() else None


def _bit(i: int) -> int:
    """The int32 value with only bit i set (bit 31 is the sign)."""
    return -(1 << 31) if i == 31 else 1 << i


def apply_masks(logits: torch.Tensor, masks: torch.Tensor, rows: List[int]) -> None:
    """Set to -inf the logits of tokens the masks forbid, in the given rows of logits
    (bsz, vocab) only: masks (len(rows), words) int32 bitmasks on the CPU."""
    # numpy unpacks the bits faster than shifts and ands of torch ops (docs/STRUCTURED_OUTPUT.md)
    bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")
    forbidden = torch.from_numpy(bits[:, : logits.shape[-1]] == 0)
    forbidden = forbidden.to(logits.device, non_blocking=True)
    for i, row in enumerate(rows):
        logits[row].masked_fill_(forbidden[i], float("-inf"))
