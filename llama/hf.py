"""Meta's checkpoint as a Hugging Face `LlamaForCausalLM` (transformers is optional: only the
comparison test and `benchmarks --compare hf` use this)."""

from typing import Dict

import torch

from llama.args import ModelArgs


def permute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs (x0, x1), (x2, x3), ...; Hugging Face rotates the two halves
    of each head. Reorder each head's rows from pairs to halves."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    # (n_heads, head_dim // 2, 2, dim) -> (n_heads, 2, head_dim // 2, dim)
    return weight.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
           "model.norm.weight": state["norm.weight"], "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        meta, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "self_attn.q_proj.weight"] = permute_rotary_rows(
            state[meta + "attention.wq.weight"], args.n_heads)
        out[hf + "self_attn.k_proj.weight"] = permute_rotary_rows(
            state[meta + "attention.wk.weight"], args.n_kv_heads)
        out[hf + "self_attn.v_proj.weight"] = state[meta + "attention.wv.weight"]
        out[hf + "self_attn.o_proj.weight"] = state[meta + "attention.wo.weight"]
        out[hf + "mlp.gate_proj.weight"] = state[meta + "feed_forward.w1.weight"]
        out[hf + "mlp.down_proj.weight"] = state[meta + "feed_forward.w2.weight"]
        out[hf + "mlp.up_proj.weight"] = state[meta + "feed_forward.w3.weight"]
        out[hf + "input_layernorm.weight"] = state[meta + "attention_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[meta + "ffn_norm.weight"]
    return out


def hf_model(state: Dict[str, torch.Tensor], args: ModelArgs, dtype=torch.float32,
             device="cpu"):
    """A transformers LlamaForCausalLM holding the same weights (unsharded Meta state dict),
    on `device` (built there: transformers' random initialisation of a 7B model takes
    minutes on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, rope_theta=args.rope_theta)
    config.rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    hf_state = {k: v.to(dtype) for k, v in to_hf_state_dict(state, args).items()}
    model.load_state_dict(hf_state, strict=True)
    return model.eval()
