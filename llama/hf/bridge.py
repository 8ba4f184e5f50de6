"""Meta's weights as a Hugging Face `LlamaForCausalLM` object (transformers is optional: only
the comparison tests and `benchmarks --compare hf` use this). The layout rules are those of
hf_format.py and hf_config.py."""

from typing import Dict

import torch

from llama.args import ModelArgs
from llama.checkpoints.meta import full_shapes
from llama.hf.config import hf_config
from llama.hf.format import hf_name, rotary_heads, rotary_rows_to_hf


def to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs,
                     tie_word_embeddings: bool = False) -> Dict[str, torch.Tensor]:
    """An unsharded Meta state dict in Hugging Face's names and rotary row order (without
    lm_head.weight when the output layer is the embedding)."""
    out = {}
    for name in full_shapes(args):
        if name == "output.weight" and tie_word_embeddings:
            continue
        heads = rotary_heads(name, args)
        out[hf_name(name)] = rotary_rows_to_hf(state[name], heads) if heads else state[name]
    return out


def hf_model(state: Dict[str, torch.Tensor], args: ModelArgs, dtype=torch.float32,
             device="cpu", tie_word_embeddings: bool = False):
    """A transformers LlamaForCausalLM holding the same weights (unsharded Meta state dict),
    on `device` (built there: transformers' random initialisation of a 7B model takes
    minutes on a CPU). With `tie_word_embeddings`, the output layer is the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict(hf_config(
        args, str(dtype).replace("torch.", ""), tie_word_embeddings,
        max_position_embeddings=args.max_seq_len))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if tie_word_embeddings and not torch.equal(state["output.weight"],
                                               state["tok_embeddings.weight"]):
        raise ValueError("tie_word_embeddings needs output.weight equal to tok_embeddings.weight")
    # every name, lm_head too: a tied model lists it as well (one parameter, two names)
    hf_state = {k: v.to(dtype) for k, v in to_hf_state_dict(state, args).items()}
    model.load_state_dict(hf_state, strict=True)
    return model.eval()
