"""Train the demo model bundled in llama/demo_model/ (see docs/DEMO_MODEL.md).

    python scripts/train_demo_model.py --out llama/demo_model --seed 0

A small Llama-architecture model, trained on the CPU on the topic pages of Python's
documentation that ship with CPython (pydoc_data), every 10th page held out (llama/cli/demo.py).
Steps:
  1. train a SentencePiece tokenizer with Llama's ids (unk 0, bos 1, eos 2, byte fallback) on
     the training pages;
  2. train the model below -- plain torch, the math of llama/model.py, Meta's parameter names --
     for a fixed number of AdamW steps with a cosine learning rate, on batches of windows of BOS
     and 256 tokens from a random paragraph start or (half of them) from any token;
  3. save it in Meta's layout (params.json, consolidated.00.pth in bfloat16 with rope.freqs,
     checklist.chk) next to tokenizer.model;
  4. load it back with Llama.build, check that the library's model computes the same logits as
     the one trained here, report the held-out perplexity, and print greedy completions.

Everything is seeded: the same command on the same machine and library versions gives the same
files (floating-point sums may differ across CPUs and thread counts).
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.checkpoints.fixtures import params_json, train_tokenizer, write_random_checkpoint  # noqa: E402
from llama.checkpoints.meta import IGNORED_KEYS, full_shapes  # noqa: E402
from llama.checkpoints.saving import save_checkpoint, split_state_dict  # noqa: E402
from llama.cli.demo import encode_pages, heldout_windows, split_topics, windows  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.model import ModelArgs, RMSNorm, apply_rotary_emb, precompute_freqs_cis  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["The list is", "A class is", "The return value of the function", "If the object"]


# --------------------------------------------------------------------------- the model
class Attention(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        # Query head h uses kv head h // n_rep, as the reference's repeat_kv does.
        n_rep = self.n_heads // self.n_kv_heads
        keys = xk.repeat_interleave(n_rep, dim=2)
        values = xv.repeat_interleave(n_rep, dim=2)
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim))  # (bsz, n_heads, seqlen, head_dim)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.attention = Attention(args, dropout)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.dropout(self.attention(self.attention_norm(x), freqs_cis))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


class TrainingTransformer(nn.Module):
    """llama/model.py's Transformer without model parallelism or KV cache, for training.
    Dropout (on the embeddings, attention weights and residual branches) acts in training
    mode only: in eval mode this computes exactly what llama/model.py does."""

    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerBlock(args, dropout) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(
            args.head_dim, args.max_seq_len * 2, args.rope_theta), persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 style: N(0, 0.02), the residual projections scaled by 1/sqrt(2 n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seqlen = tokens.shape[1]
        h = self.dropout(self.tok_embeddings(tokens))
        freqs_cis = self.freqs_cis[None, :seqlen]  # (1, seqlen, head_dim // 2)
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.output(self.norm(h)).float()


# --------------------------------------------------------------------------- helpers
def mean_nll(logits_fn, batch: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of tokens 1.. of each row given those before."""
    logits = logits_fn(batch)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           batch[:, 1:].reshape(-1)).item()


@torch.no_grad()
def evaluate(model: nn.Module, batch: torch.Tensor, chunk: int = 8) -> float:
    model.eval()
    losses = [mean_nll(model, batch[i: i + chunk]) for i in range(0, len(batch), chunk)]
    model.train()
    sizes = [len(batch[i: i + chunk]) for i in range(0, len(batch), chunk)]
    return sum(loss * n for loss, n in zip(losses, sizes)) / len(batch)


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="llama/demo_model", help="checkpoint directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=900, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256, help="training window (tokens)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min_lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.2,
                        help="training only: the text is small, the model would memorise it")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument("--multiple_of", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--eval_every", type=int, default=100)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    begin = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    training_pages, _ = split_topics()
    tokenizer_path = train_tokenizer(out / "tokenizer.model", vocab_size=args.vocab_size,
                                     text="\n\n".join(training_pages))
    tokenizer = Tokenizer(str(tokenizer_path))
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id) == (args.vocab_size, 1, 2)
    tokens, paragraph_starts = encode_pages(training_pages, tokenizer)
    stream = torch.tensor(tokens, dtype=torch.long)
    heldout = torch.tensor(heldout_windows(tokenizer, args.seq_len + 1))
    # Each training window: BOS, then seq_len tokens from a paragraph start (as a prompt
    # begins) or, for half of them, from any token (many more distinct windows).
    starts = torch.tensor([s for s in paragraph_starts if s + args.seq_len <= len(tokens)])
    n_offsets = len(tokens) - args.seq_len + 1
    offsets = torch.arange(args.seq_len)
    print(f"tokenizer: {tokenizer.n_words} pieces; training text {len(tokens)} tokens "
          f"({len(starts)} paragraph starts); held out {tuple(heldout.shape)} windows",
          flush=True)

    model_args = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                           n_kv_heads=args.n_kv_heads, multiple_of=args.multiple_of,
                           vocab_size=tokenizer.n_words, max_seq_len=args.seq_len + 1)
    model = TrainingTransformer(model_args, args.dropout)
    generator = torch.Generator().manual_seed(args.seed)
    model.init_weights(generator)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, {model_args}", flush=True)

    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    bos = torch.full((args.batch_size, 1), tokenizer.bos_id, dtype=torch.long)
    train_begin, recent = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        picks = torch.where(
            torch.rand(args.batch_size, generator=generator) < 0.5,
            starts[torch.randint(len(starts), (args.batch_size,), generator=generator)],
            torch.randint(n_offsets, (args.batch_size,), generator=generator))
        batch = torch.cat([bos, stream[picks[:, None] + offsets]], dim=1)  # (bsz, seq_len+1)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - train_begin
            print(f"step {step + 1}/{args.steps}  loss {sum(recent) / len(recent):.3f}  "
                  f"lr {learning_rate(step, args):.2e}  {elapsed:.0f}s", flush=True)
            final_loss, recent = sum(recent) / len(recent), []
        if (step + 1) % args.eval_every == 0 and step + 1 != args.steps:
            heldout_loss = evaluate(model, heldout)
            print(f"  held-out loss {heldout_loss:.3f} (perplexity {math.exp(heldout_loss):.1f})",
                  flush=True)
    train_seconds = time.time() - train_begin
    heldout_loss = evaluate(model, heldout)
    seen = torch.tensor(windows(tokens, paragraph_starts, args.seq_len + 1, tokenizer.bos_id,
                                count=len(heldout)))
    seen_loss = evaluate(model, seen)
    print(f"trained {args.steps} steps in {train_seconds:.0f}s; final training loss "
          f"{final_loss:.3f} (last {args.log_every} steps, with dropout); without dropout: "
          f"training text {seen_loss:.3f} (perplexity {math.exp(seen_loss):.1f}), held-out "
          f"{heldout_loss:.3f} (perplexity {math.exp(heldout_loss):.1f})", flush=True)

    # Save as Meta does: bfloat16 tensors, plus rope.freqs (the rotary inverse frequencies).
    state = {name: tensor.detach().to(torch.bfloat16).clone()
             for name, tensor in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == full_shapes(model_args)
    state[IGNORED_KEYS[0]] = precompute_freqs_cis(model_args.head_dim, 2).angle()[1].to(
        torch.bfloat16)
    save_checkpoint(out, split_state_dict(state, 1), params_json(model_args))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved {sorted(f.name for f in out.iterdir())} to {out} ({size / 1e6:.2f} MB)")

    # Load it back with the library, check its logits against the trained model's (with the
    # weights rounded to bfloat16 as saved), and show what it writes.
    llama = Llama.build(str(out), str(tokenizer_path), max_seq_len=args.seq_len + 1,
                        max_batch_size=len(PROMPTS), verbose=False)
    rounded = TrainingTransformer(model_args).eval()
    rounded.load_state_dict({k: v.float() for k, v in state.items() if k not in IGNORED_KEYS})
    sample = heldout[:2]
    with torch.no_grad():
        ours = rounded(sample)
    theirs = llama.model.forward(sample, 0, llama.model.new_cache(len(sample), sample.shape[1]))
    difference = (ours - theirs).abs().max().item()
    print(f"max |logit difference| between this script's model and Llama.build's: "
          f"{difference:.2e}")
    assert difference < 1e-3, difference
    library_loss = mean_nll(lambda b: llama.model.forward(b, 0, llama.model.new_cache(*b.shape)),
                            heldout)
    print(f"held-out perplexity with Llama.build's model (bfloat16 weights): "
          f"{math.exp(library_loss):.1f}")
    # Baselines on the same held-out tokens: token frequencies of the training text (add-one
    # smoothed), and random weights of the same shape (llama.checkpoints.fixtures.random_weights).
    counts = torch.bincount(stream, minlength=tokenizer.n_words) + 1.0
    unigram_loss = -(counts / counts.sum()).log()[heldout[:, 1:]].mean().item()
    with tempfile.TemporaryDirectory() as random_dir:
        write_random_checkpoint(Path(random_dir), model_args, 1, seed=args.seed)
        random_llama = Llama.build(random_dir, str(tokenizer_path), args.seq_len + 1,
                                   len(heldout), verbose=False)
        random_loss = mean_nll(lambda b: random_llama.model.forward(
            b, 0, random_llama.model.new_cache(*b.shape)), heldout)
    print(f"held-out perplexity of baselines: unigram {math.exp(unigram_loss):.1f}, random "
          f"model {math.exp(random_loss):.3g}, uniform {tokenizer.n_words}")
    results = llama.text_completion(PROMPTS, temperature=0.0, max_gen_len=24)
    for prompt, result in zip(PROMPTS, results):
        print(f"greedy: {prompt!r} -> {result['generation']!r}")
    print(f"total run time {time.time() - begin:.0f}s")


if __name__ == "__main__":
    main()
