"""An independent restatement of Meta's Llama 2 reference algorithm, for tests only.

Single process, plain tensors, the unsharded state dict: the reference's math (complex rotary,
repeat_kv, additive -inf mask, softmax in float32, full-position logits) and its generate loop
(pad id -1, prompts fed token by token past the shortest one, logprobs by cross-entropy).
Nothing here is imported from the `llama` package, so agreement with it is evidence.
"""

import math
from typing import Dict, List

import torch
import torch.nn.functional as F


class ReferenceModel:
    def __init__(self, state: Dict[str, torch.Tensor], params: dict, max_batch_size: int,
                 max_seq_len: int, cache_dtype: torch.dtype = torch.float32):
        """`cache_dtype`: what the cache keeps keys and values in (Meta's GPU runs keep them
        in the model's bfloat16); they are read back as float32."""
        self.w = {k: v.float() for k, v in state.items()}
        self.n_layers = params["n_layers"]
        self.n_heads = params["n_heads"]
        self.n_kv_heads = params.get("n_kv_heads") or self.n_heads
        self.dim = params["dim"]
        self.head_dim = self.dim // self.n_heads
        self.eps = params["norm_eps"]
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        theta = params.get("rope_theta", 10000.0)
        freqs = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2)[: self.head_dim // 2].float()
                                 / self.head_dim))
        t = torch.arange(max_seq_len * 2)
        freqs = torch.outer(t, freqs).float()
        self.freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
        shape = (max_batch_size, max_seq_len, self.n_kv_heads, self.head_dim)
        self.cache_k = [torch.zeros(shape, dtype=cache_dtype) for _ in range(self.n_layers)]
        self.cache_v = [torch.zeros(shape, dtype=cache_dtype) for _ in range(self.n_layers)]

    def _norm(self, x, weight):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * weight

    def _rotary(self, x, freqs_cis):
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        freqs = freqs_cis.view(1, x_.shape[1], 1, x_.shape[-1])
        return torch.view_as_real(x_ * freqs).flatten(3)

    def _attention(self, i, x, start_pos, freqs_cis, mask):
        p = f"layers.{i}.attention."
        bsz, seqlen, _ = x.shape
        xq = (x @ self.w[p + "wq.weight"].T).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = (x @ self.w[p + "wk.weight"].T).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = (x @ self.w[p + "wv.weight"].T).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = self._rotary(xq, freqs_cis), self._rotary(xk, freqs_cis)
        self.cache_k[i][:bsz, start_pos: start_pos + seqlen] = xk
        self.cache_v[i][:bsz, start_pos: start_pos + seqlen] = xv
        keys = self.cache_k[i][:bsz, : start_pos + seqlen].float()
        values = self.cache_v[i][:bsz, : start_pos + seqlen].float()
        n_rep = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(n_rep, dim=2)
        values = values.repeat_interleave(n_rep, dim=2)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return out @ self.w[p + "wo.weight"].T

    def forward(self, tokens, start_pos):
        bsz, seqlen = tokens.shape
        h = self.w["tok_embeddings.weight"][tokens]
        freqs_cis = self.freqs_cis[start_pos: start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"))
            mask = torch.triu(mask, diagonal=1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos)), mask])
        for i in range(self.n_layers):
            p = f"layers.{i}."
            h = h + self._attention(i, self._norm(h, self.w[p + "attention_norm.weight"]),
                                    start_pos, freqs_cis, mask)
            x = self._norm(h, self.w[p + "ffn_norm.weight"])
            ffn = (F.silu(x @ self.w[p + "feed_forward.w1.weight"].T)
                   * (x @ self.w[p + "feed_forward.w3.weight"].T))
            h = h + ffn @ self.w[p + "feed_forward.w2.weight"].T
        return (self._norm(h, self.w["norm.weight"]) @ self.w["output.weight"].T).float()


def reference_sample_top_p(probs, p):
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)


def reference_generate(model: ReferenceModel, prompt_tokens: List[List[int]], max_gen_len: int,
                       eos_id: int, logprobs: bool = False, echo: bool = False,
                       temperature: float = 0.0, top_p: float = 0.9):
    """Generation exactly as the reference's Llama.generate."""
    pad_id = -1
    bsz = len(prompt_tokens)
    min_prompt_len = min(len(t) for t in prompt_tokens)
    max_prompt_len = max(len(t) for t in prompt_tokens)
    total_len = min(model.max_seq_len, max_gen_len + max_prompt_len)
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long)
    for k, t in enumerate(prompt_tokens):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    token_logprobs = torch.zeros_like(tokens, dtype=torch.float)
    prev_pos = 0
    eos_reached = torch.tensor([False] * bsz)
    input_text_mask = tokens != pad_id
    if min_prompt_len == total_len:
        logits = model.forward(tokens, prev_pos)
        token_logprobs = -F.cross_entropy(input=logits.transpose(1, 2), target=tokens,
                                          reduction="none", ignore_index=pad_id)
    for cur_pos in range(min_prompt_len, total_len):
        logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos)
        if temperature > 0:
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            next_token = reference_sample_top_p(probs, top_p)
        else:
            next_token = torch.argmax(logits[:, -1], dim=-1)
        next_token = next_token.reshape(-1)
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if logprobs:
            token_logprobs[:, prev_pos + 1: cur_pos + 1] = -F.cross_entropy(
                input=logits.transpose(1, 2), target=tokens[:, prev_pos + 1: cur_pos + 1],
                reduction="none", ignore_index=pad_id)
        eos_reached |= (~input_text_mask[:, cur_pos]) & (next_token == eos_id)
        prev_pos = cur_pos
        if all(eos_reached):
            break
    token_logprobs = token_logprobs.tolist()
    out_tokens, out_logprobs = [], []
    for i, toks in enumerate(tokens.tolist()):
        start = 0 if echo else len(prompt_tokens[i])
        toks = toks[start: len(prompt_tokens[i]) + max_gen_len]
        probs = token_logprobs[i][start: len(prompt_tokens[i]) + max_gen_len]
        if eos_id in toks:
            eos_idx = toks.index(eos_id)
            toks, probs = toks[:eos_idx], probs[:eos_idx]
        out_tokens.append(toks)
        out_logprobs.append(probs)
    return out_tokens, (out_logprobs if logprobs else None)
