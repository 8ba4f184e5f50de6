"""Choosing the next token: greedy or top-p sampling, and the random numbers sampling uses.

Sampling draws its randomness as Exp(1) noise over the vocabulary (what torch.multinomial
does inside), so the same draws give the same tokens however rows are batched: a batch of
library calls takes the reference's own sequence of draws (ReferenceNoise), a server request
draws from its own seeded generator (RowNoise).
"""

from typing import Dict, List, Optional, Union

import torch

Number = Union[float, torch.Tensor]


def sample_top_p(probs: torch.Tensor, p: Number,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability mass reaches p.
    probs: (bsz, vocab); p: a float, or (bsz, 1) per row. Returns (bsz, 1) token ids. `noise`
    (bsz, vocab) of Exp(1) draws replaces torch.multinomial's own: multinomial picks
    argmax(probs / noise) with noise it draws itself, so passing the same draws gives the same
    tokens."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # tokens outside the nucleus: the mass before them is p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    if noise is None:
        next_token = torch.multinomial(probs_sort, num_samples=1)
    else:
        next_token = torch.argmax(probs_sort / noise, dim=-1, keepdim=True)
    return torch.gather(probs_idx, -1, next_token)


# Temperatures below this are greedy: logits / T overflows float32 near T = 1e-37 (softmax of
# infinities is NaN, and garbage tokens), and well before that softmax(logits / T) is already
# the argmax's one-hot wherever the two best logits differ by more than float32's resolution.
GREEDY_BELOW = 1e-6


def sample(logits: torch.Tensor, temperature: Number, top_p: Number,
           noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Next tokens (bsz,) from logits (bsz, vocab): argmax where the temperature is 0, else
    top-p sampling of softmax(logits / temperature). temperature and top_p are floats for the
    whole batch, or (bsz,) tensors, one per row. Temperatures below GREEDY_BELOW are greedy."""
    if not isinstance(temperature, torch.Tensor):
        if temperature >= GREEDY_BELOW:
            probs = torch.softmax(logits / temperature, dim=-1)
            return sample_top_p(probs, top_p, noise).reshape(-1)
        return torch.argmax(logits, dim=-1)
    greedy = temperature < GREEDY_BELOW
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    sampled = sample_top_p(torch.softmax(scaled, dim=-1), top_p[:, None], noise).reshape(-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), sampled)


class ReferenceNoise:
    """The random numbers the reference's loop would use, handed to each row in its order.

    The reference samples a token for every row at every position from the end of the
    shortest prompt on, discarding those drawn inside longer prompts: its k-th token of row i
    uses the draw of step (len_i - min_len + k). Prefilling all prompts at once, we draw the
    same sequence (from torch's global generator, which Llama.build seeds) and give each row
    its own draw, so that seeded samples equal the reference's for batches of mixed lengths
    too."""

    def __init__(self, prompt_lens: List[int], rows: List[int], vocab_size: int, device):
        """prompt_lens: the reference's whole batch; rows: which of its rows we generate."""
        shortest = min(prompt_lens)
        self.offsets = [prompt_lens[row] - shortest for row in rows]
        self.rows = rows
        self.plain = not any(self.offsets) and rows == list(range(len(prompt_lens)))
        self.shape, self.device = (len(prompt_lens), vocab_size), device
        self.draws: Dict[int, torch.Tensor] = {}
        self.drawn = 0

    def for_step(self, step: int) -> torch.Tensor:
        while self.drawn <= step + max(self.offsets):
            noise = torch.empty(self.shape, device=self.device).exponential_(1)
            self.draws[self.drawn] = noise
            self.drawn += 1
        for old in [d for d in self.draws if d < step]:
            del self.draws[old]
        if self.plain:
            return self.draws[step]
        return torch.stack([self.draws[step + offset][row]
                            for row, offset in zip(self.rows, self.offsets)])


class RowNoise:
    """One request's draws, from a generator of its own seeded with `seed`: the same seed
    gives the same samples whichever other requests share the batch (and on every rank)."""

    def __init__(self, seed: int, vocab_size: int, device):
        self.generator = torch.Generator(device).manual_seed(seed)
        self.vocab_size, self.device = vocab_size, device

    def draw(self) -> torch.Tensor:
        return torch.empty(self.vocab_size, device=self.device).exponential_(
            1, generator=self.generator)
