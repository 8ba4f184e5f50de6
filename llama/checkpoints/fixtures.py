"""Small stand-ins for Meta's files, built on the spot: a SentencePiece tokenizer with Llama's
special ids trained on text that ships with Python, and random weights in Meta's checkpoint
layout. Used by the tests, the benchmarks and the demo-model trainer."""

import io
from pathlib import Path
from typing import Dict, Optional

import torch

from llama.checkpoints.meta import IGNORED_KEYS, full_shapes
from llama.checkpoints.saving import params_json, save_checkpoint, split_state_dict
from llama.model import ModelArgs, precompute_freqs_cis

# Llama 3.x's shape rules in miniature: grouped-query heads, ffn_dim_multiplier with a large
# multiple_of, rope_theta 500000 and Meta's llama3 scaling (a head of 16 has frequencies in
# all three of its bands: kept, blended, slowed).
LLAMA3_SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64,
                    ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                    use_scaled_rope=True)


def python_docs_text() -> str:
    """English prose available offline: the topic pages of Python's documentation."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def train_tokenizer(model_path: Path, vocab_size: int = 1000, text: Optional[str] = None,
                    extra_pieces: int = 0) -> Path:
    """Train a BPE SentencePiece model with Llama's conventions: unk 0, bos 1, eos 2, no pad,
    byte fallback (so any text, Chinese and emoji included, round-trips), split digits.
    `extra_pieces` of the vocabulary are placeholder symbols (<extra_N>, never produced from
    plain text): a vocabulary as large as a real model's (Code Llama's 32016) without
    training that many pieces on a small text."""
    import sentencepiece as spm

    text = text if text is not None else python_docs_text()
    lines = [line for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=0.9995, num_threads=1, minloglevel=2,
        add_dummy_prefix=True, normalization_rule_name="identity",
        max_sentence_length=1 << 16, train_extremely_large_corpus=False,
        user_defined_symbols=[f"<extra_{i}>" for i in range(extra_pieces)])
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model.getvalue())
    return model_path


def random_weights(args: ModelArgs, seed: int = 0, dtype=torch.bfloat16, device="cpu"
                   ) -> Dict[str, torch.Tensor]:
    """An unsharded state dict of the model's shape (on the CPU), with the rope.freqs extra
    real shards carry. Norm weights are near 1, as in trained models; the output layer is
    scaled so that logits spread over several units, like a trained model's, rather than sit
    in near-ties. `device` draws the numbers there (a GPU draws 7B's in a second rather than a
    minute; other numbers than the CPU's for the same seed)."""
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in full_shapes(args).items():
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device)
        else:
            scale = (4.0 if name == "output.weight" else 1.0) / shape[1] ** 0.5
            tensor = scale * torch.randn(shape, generator=generator, device=device)
        state[name] = tensor.to(dtype).cpu()
    freqs = precompute_freqs_cis(args.head_dim, 2, args.rope_theta,
                                 scaling=args.rope_scaling).angle()[1]  # position 1
    state[IGNORED_KEYS[0]] = freqs.to(dtype)
    return state


def write_random_checkpoint(out_dir: Path, args: ModelArgs, n_shards: int = 1, seed: int = 0,
                            dtype=torch.bfloat16, device="cpu", checklist: bool = True
                            ) -> Dict[str, torch.Tensor]:
    """Save random weights as an n_shards checkpoint; returns the unsharded state dict.
    `device`: see random_weights; `checklist`: see save_checkpoint."""
    full = random_weights(args, seed, dtype, device)
    save_checkpoint(Path(out_dir), split_state_dict(full, n_shards), params_json(args),
                    checklist)
    return full
