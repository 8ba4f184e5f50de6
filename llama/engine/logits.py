"""What a decode step does to a row's logits before sampling, and to its token after: penalties
and logit bias (penalties.LogitAdjust), grammar masks (constraint.Constraint). Only the rows
that ask are touched, so the other rows of a batch sample exactly what they would alone."""

from typing import List

import torch

from llama.constrained.constraint import apply_masks


def constrain_logits(logits: torch.Tensor, sequences: List) -> None:
    """Adjust, then mask, the rows of logits (rows, vocab) whose sequences ask for it, in
    place. Mask work runs on the host (llguidance), one row after another."""
    adjusted = [seq for seq in sequences if seq.adjust is not None and not seq.finished]
    for seq in adjusted:
        seq.adjust.apply(logits[seq.slot], seq.tokens)
    constrained = [seq for seq in sequences if seq.constraint is not None and not seq.finished]
    if not constrained:
        return
    words = constrained[0].constraint.words
    masks = torch.empty((len(constrained), words), dtype=torch.int32)
    for i, seq in enumerate(constrained):
        seq.constraint.fill_mask(masks[i])
    apply_masks(logits, masks, [seq.slot for seq in constrained])


def take_constrained(tokens: torch.Tensor, sequences: List) -> None:
    """Let each constrained row's grammar take its sampled token from tokens (rows,); where
    it answers with another (closing in time, see constraint.py), write that one instead."""
    constrained = [seq for seq in sequences if seq.constraint is not None and not seq.finished]
    if not constrained:
        return
    host = tokens.tolist()  # a host sync, for constrained steps only: the grammar needs them
    for seq in constrained:
        taken = seq.constraint.commit(host[seq.slot])
        if taken != host[seq.slot]:
            tokens[seq.slot] = taken
