"""What the benchmarks build on: the shapes of their random checkpoints (Llama 2's, a tiny one
for smoke runs, and two small ones), the vocabulary size, random prompts of given lengths, and
a tokenizer that never ends them."""

import torch

SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),  # smoke runs
    "S": dict(dim=768, n_layers=12, n_heads=12),
    "M": dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4),
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
    "13B": dict(dim=5120, n_layers=40, n_heads=40),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                ffn_dim_multiplier=1.3),
}
VOCAB = 32000


class NoEosTokenizer:
    """Random prompts need no text; an EOS id no token has keeps every run the same length."""
    n_words, bos_id, eos_id, pad_id = VOCAB, 1, -1, -1

    def decode(self, ids):
        return ""


def prompts(lengths, seed=0):
    """Token ids, BOS then random ones, one prompt per length."""
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (n - 1,), generator=generator).tolist()
            for n in lengths]
