"""OpenAI's presence and frequency penalties and logit bias, applied to one row's logits.

As OpenAI documents them: logit[t] -= frequency_penalty * count[t] + presence_penalty *
(count[t] > 0), counting the tokens generated so far (not the prompt's), then
logit[t] += logit_bias[t]."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from llama.engine.validation import ArgumentTypeError, ArgumentValueError, check_number


@dataclass
class LogitAdjust:
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Dict[int, float] = field(default_factory=dict)
    _bias: Optional[torch.Tensor] = None  # logit_bias as (ids, values) tensors, made once
    _counts: Counter = field(default_factory=Counter)
    _seen: int = 0  # tokens of the row already counted

    def apply(self, logits: torch.Tensor, tokens: List[int]) -> None:
        """logits (vocab,) of a row whose generated tokens so far are `tokens`, in place."""
        if self.presence_penalty or self.frequency_penalty:
            self._counts.update(tokens[self._seen:])
            self._seen = len(tokens)
            if self._counts:
                ids = torch.tensor(list(self._counts), device=logits.device)
                counts = torch.tensor(list(self._counts.values()), dtype=logits.dtype,
                                      device=logits.device)
                logits[ids] -= self.frequency_penalty * counts + self.presence_penalty
        if self.logit_bias:
            if self._bias is None:
                self._bias = (torch.tensor(list(self.logit_bias), device=logits.device),
                              torch.tensor(list(self.logit_bias.values()), dtype=logits.dtype,
                                           device=logits.device))
            ids, values = self._bias
            logits[ids] += values


def logit_adjust(presence_penalty: Any = None, frequency_penalty: Any = None,
                 logit_bias: Any = None, vocab_size: int = 0) -> Optional[LogitAdjust]:
    """A checked LogitAdjust for OpenAI's request fields (None where they change nothing).
    Penalties lie in [-2, 2]; logit_bias maps token ids (ints or their decimal strings, as
    JSON keys are) to values in [-100, 100]."""
    presence = _penalty("presence_penalty", presence_penalty)
    frequency = _penalty("frequency_penalty", frequency_penalty)
    bias: Dict[int, float] = {}
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise ArgumentTypeError("logit_bias", "logit_bias must be an object mapping token "
                                                  f"ids to biases, got {logit_bias!r}")
        for key, value in logit_bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise ArgumentValueError("logit_bias", f"logit_bias keys must be token ids, "
                                                       f"got {key!r}") from None
            if not 0 <= token < vocab_size:
                raise ArgumentValueError("logit_bias", f"logit_bias token id {token} is "
                                                       f"outside the vocabulary [0, "
                                                       f"{vocab_size})")
            value = check_number("logit_bias", value)
            if not -100 <= value <= 100:
                raise ArgumentValueError("logit_bias", f"logit_bias values must lie in "
                                                       f"[-100, 100], got {value}")
            if value:
                bias[token] = value
    if not (presence or frequency or bias):
        return None
    return LogitAdjust(presence, frequency, bias)


def _penalty(name: str, value: Any) -> float:
    if value is None:
        return 0.0
    value = check_number(name, value)
    if not -2.0 <= value <= 2.0:
        raise ArgumentValueError(name, f"{name} must lie in [-2, 2], got {value}")
    return value
