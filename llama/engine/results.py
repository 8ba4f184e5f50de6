"""A library call's results as the reference gives them, from the engine's finished rows: the
prompt tokens' log-probabilities (echo), and each row's tokens, text and finish reason, cut
before a stop string or at the first stop token (EOS)."""

from dataclasses import dataclass
from typing import Collection, List, Literal, Optional

import torch

from llama.engine.core import EngineSequence

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]  # the last: chat with tools


@dataclass
class Result:
    """One prompt's finished generation."""
    tokens: List[int]
    logprobs: List[float]
    text: Optional[str]  # None: decode the tokens
    finish_reason: FinishReason


def prompt_logprobs(rows: List[EngineSequence], logits: torch.Tensor,
                     unshifted: bool) -> List[List[float]]:
    """Each prompt token's log-probability given the tokens before it (0 for the first), for
    echo. logits: (bsz, max_len, vocab) over the left-padded prompts."""
    max_len = logits.shape[1]
    tokens = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    for i, row in enumerate(rows):
        tokens[i, max_len - len(row.prompt):] = torch.tensor(row.prompt, device=logits.device)
    logp = torch.log_softmax(logits, dim=-1)
    if unshifted:
        # The reference, when no token is generated at all (every prompt fills the run),
        # scores each prompt token against the logits of its own position; kept as it is so
        # results match it.
        scores = logp.gather(2, tokens[:, :, None])[:, :, 0]
    else:
        scores = torch.zeros(tokens.shape, device=logits.device)
        scores[:, 1:] = logp[:, :-1].gather(2, tokens[:, 1:, None])[:, :, 0]
    out = []
    for row, row_scores in zip(rows, scores.tolist()):
        probs = row_scores[max_len - len(row.prompt):]
        if not unshifted:
            probs[0] = 0.0
        out.append(probs)
    return out


def finish(row: EngineSequence, echo: bool, prompt_logprobs: Optional[List[float]],
            stop_ids: Collection[int]) -> Result:
    """A row's result as the reference gives it: tokens before a stop string; with echo the
    prompt first (and its logprobs), everything cut at the first stop token (Llama 2's EOS;
    Llama 3's end of text, turn or message, as Meta's Llama 3 generate cuts)."""
    tokens = row.text.tokens_before_stop() if row.text is not None else list(row.tokens)
    probs = row.token_logprobs[: len(tokens)]
    text = row.text.text if row.text is not None else None
    finish_reason = row.finish_reason
    if echo:
        tokens = row.prompt + tokens
        probs = (prompt_logprobs or []) + probs if row.logprobs else []
        text = None  # the prompt's text and the answer's, decoded together
    cut = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
    if cut is not None:
        tokens, probs, text, finish_reason = tokens[:cut], probs[:cut], None, "stop"
    return Result(tokens, probs, text, finish_reason)
