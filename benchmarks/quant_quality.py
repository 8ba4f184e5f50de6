"""Quality of quantized weights (issue #14): what int8 and int4 cost against float32.

    python -m benchmarks.quant_quality            # both parts, ~7 min on 2 busy cores
    python -m benchmarks.quant_quality --quick    # every code path on little data, ~1 min
    python -m benchmarks.quant_quality --part demo|outliers [--plants none compensated ...]

1. The bundled demo model (trained) on held-out `pydoc_data` text, in the windows its
   training script evaluates (all 33 of BOS + 256 tokens): perplexity, its ratio to
   float32's with the standard error of the paired per-window log-ratios, mean
   KL(float32 || quantized) of the next-token distributions, top-1 agreement. Then greedy
   decoding (64 tokens) of example_text_completion.py's prompts and example_chat_completion.py's
   dialogs (as chat_completion builds them, a batch of four as the scripts run them): tokens
   equal before the first difference, and position-by-position agreement.
2. A random model of bench.py's S shape with planted outlier channels, teacher-forced on
   random tokens: top-1 agreement and KL against its own float32 model for our weight-only
   int8 and int4, and for W8A8 foils that also round every product's activations to int8,
   with one scale per activation tensor or per token (the foils live here only).

Products take the library's routes (llama/layers/linear.py); the routes that ran and their
activations' dtype are printed under each table. Seeds are fixed; output is markdown.
"""

import argparse
import ast
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import llama.layers.linear as lin
from llama import Llama
from llama.args import ModelArgs
from llama.chat_format import dialog_to_tokens
from llama.checkpoints.fixtures import random_weights
from llama.cli.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, heldout_windows
from llama.engine.distributed import init_process_groups
from llama.kernels import cpu_kernels
from llama.model import Transformer
from llama.quantize.formats import group_sizes_for, is_quantized, quantize

REPO = Path(__file__).resolve().parent.parent

DEMO_WINDOW = 257  # BOS + 256 tokens: scripts/train_demo_model.py's evaluation windows
GREEDY_TOKENS = 64
# (mode, group size, dequantized: the same weights in a float32 model, float32 activations)
DEMO_VARIANTS = [("int8", None, False), ("int8", None, True), ("int4", 32, False),
                 ("int4", 32, True), ("int4", 64, False), ("int4", 128, False)]

S_SHAPE = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000)  # bench.py's S
OUTLIER_SCALES = (50.0, 66.7, 83.3, 100.0)  # 4 channels, as docs/QUANTIZATION.md's study
# Products whose input is an RMSNorm's output, by the norm that feeds them.
NORM_READERS = {"attention_norm": ("attention.wq", "attention.wk", "attention.wv"),
                "ffn_norm": ("feed_forward.w1", "feed_forward.w3")}


# ------------------------------------------------------------------------- routes
@contextmanager
def routes():
    """Counts the packed weights' products by the route they took and the dtype of its
    activations, from the kernels and helpers llama/layers/linear.py calls (their names as of this
    writing; a product that reached none of them counts as 'other')."""
    counts: Dict[str, int] = {}

    def spy(original, name):
        def wrapped(x, *rest):
            key = f"{name(*rest) if callable(name) else name}, {str(x.dtype)[6:]} activations"
            counts[key] = counts.get(key, 0) + 1
            return original(x, *rest)
        return wrapped

    def product(original, cls):
        def wrapped(self, x):
            before = sum(counts.values())
            out = original(self, x)
            if sum(counts.values()) == before:
                spy(lambda x: None, f"{cls.__name__}: other")(x)
            return out
        return wrapped

    spies = [(cpu_kernels, "int8_mm", "our int8 kernel (rows rounded to int16)"),
             (cpu_kernels, "int4_mm", "our int4 kernel"),
             (torch, "_weight_int8pack_mm", "int8 kernel _weight_int8pack_mm"),
             (torch, "_weight_int4pack_mm_for_cpu", "int4 kernel _weight_int4pack_mm_for_cpu"),
             (lin, "_by_row_blocks", lambda block_t, n: "dequantised bf16 GEMM ("
              + type(block_t.__self__).__name__ + ")")]
    spies = [(owner, attr, spy(getattr(owner, attr), name)) for owner, attr, name in spies
             if hasattr(owner, attr)] + [(cls, "product", product(cls.product, cls))
                                         for cls in (lin.PackedInt8, lin.PackedInt4)]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in spies]
    for owner, attr, wrapped in spies:
        setattr(owner, attr, wrapped)
    try:
        yield counts
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def routes_line(counts: Dict[str, int]) -> str:
    return "; ".join(f"{name}: {n}" for name, n in sorted(counts.items())) or "none"


# ------------------------------------------------------------------------- metrics
def distributions(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Mean KL(ref || got) of the next-token distributions, top-1 agreement, and the logits'
    relative difference; ref, got: logits (rows, positions, vocab)."""
    lp_ref, lp = ref.log_softmax(-1), got.log_softmax(-1)
    return dict(kl=float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean()),
                top1=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
                rel=float((got - ref).norm() / ref.norm()))


def perplexities(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict:
    """Perplexity of `got`, its ratio to `ref`'s and the ratio's standard error over windows
    (of the paired per-window log-ratios); targets (windows, positions)."""
    nll_ref = F.cross_entropy(ref.transpose(1, 2), targets, reduction="none").mean(1)
    nll = F.cross_entropy(got.transpose(1, 2), targets, reduction="none").mean(1)
    diff = nll - nll_ref
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return dict(ppl=math.exp(nll.mean()), ratio=math.exp(diff.mean()), se=se)


def agreement(ref: List[int], got: List[int], n: int):
    """(tokens equal before the first difference, share of the n positions equal); a
    generation that stopped (EOS) has None in the positions after its end."""
    same = [a == b for a, b in zip(*(t[:n] + [None] * (n - len(t[:n])) for t in (ref, got)))]
    return (same + [False]).index(False), sum(same) / n


# ------------------------------------------------------------------------- demo model
def example_inputs():
    """The prompts of example_text_completion.py and the dialogs of example_chat_completion.py,
    read from the scripts themselves (literals inside their main())."""
    def literal(script: str, name: str):
        for node in ast.walk(ast.parse((REPO / script).read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return ast.literal_eval(node.value)
        raise LookupError(f"{script} assigns no {name}")
    return (literal("example_text_completion.py", "prompts"),
            literal("example_chat_completion.py", "dialogs"))


def build_demo(mode=None, group=None, dequantized=False) -> Llama:
    """The demo model with quantized weights (the library's packed products), or with
    `dequantized`, a float32 model holding those weights' dequantized values: the same weights
    with float32 activations, which separates the weights' error from that of the bfloat16
    activations the CPU routes take."""
    mode, group, deq = (None, None, (mode, group)) if dequantized else (mode, group, None)
    llama = Llama.build(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, max_seq_len=512, max_batch_size=4,
                        verbose=False, device="cpu", quantize=mode, group_size=group)
    with torch.no_grad():  # the parameters, in place
        for name, param in llama.model.named_parameters() if deq else ():
            if is_quantized(name):
                param.copy_(quantize(param.float(), deq[0], deq[1] or 32).dequantize())
    return llama


def window_logits(llama: Llama, windows: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Logits of positions 0..n-2 of each window (predicting tokens 1..n-1), in prefills of
    `chunk` windows as the training script evaluates them."""
    out = []
    for i in range(0, len(windows), chunk):
        batch = windows[i: i + chunk]
        out.append(llama.model.forward(batch, 0, llama.model.new_cache(*batch.shape))[:, :-1])
    return torch.cat(out)


def greedy(llama: Llama, prompt_tokens: List[List[int]], n: int) -> List[List[int]]:
    tokens, _ = llama.generate(prompt_tokens, max_gen_len=n, temperature=0.0)
    return tokens


def leads(logits: torch.Tensor) -> torch.Tensor:
    """How far each position's first choice leads its second, in logits."""
    top = logits.topk(2, -1).values
    return top[..., 0] - top[..., 1]


def next_lead(llama: Llama, tokens: List[int]) -> float:
    return float(leads(llama.model.forward(torch.tensor([tokens]), 0,
                                           llama.model.new_cache(1, len(tokens)))[0, -1]))


def demo_part(quick: bool) -> None:
    float_model = build_demo()
    tok = float_model.tokenizer
    windows = torch.tensor(heldout_windows(tok, DEMO_WINDOW, 4 if quick else None))
    targets = windows[:, 1:]
    n_gen = 16 if quick else GREEDY_TOKENS
    prompts, dialogs = example_inputs()
    inputs = [tok.encode(p, bos=True, eos=False) for p in prompts]
    inputs += [dialog_to_tokens(d, tok.encode, i) for i, d in enumerate(dialogs)]
    print(f"\n## Demo model: held-out pydoc_data, {len(windows)} windows of BOS + "
          f"{DEMO_WINDOW - 1} tokens ({targets.numel()} predicted tokens)\n")
    ref = window_logits(float_model, windows)
    # one batch of four each, as the example scripts run them
    ref_greedy = greedy(float_model, inputs[:4], n_gen) + greedy(float_model, inputs[4:], n_gen)
    # The chat ids are those chat_completion generates: its answers are their decoding.
    answers = float_model.chat_completion(dialogs, temperature=0.0, max_gen_len=n_gen)
    if [a["generation"]["content"] for a in answers] != [tok.decode(t) for t in ref_greedy[4:]]:
        raise RuntimeError("chat_completion's answers are not generate()'s tokens decoded")
    print("| weights | perplexity | ratio to float32 (± s.e.) | mean KL(float32 ‖ q) | top-1 "
          "agreement | text: prefix / agreement | chat: prefix / agreement |\n" + "|---" * 7 + "|")
    print(f"| float32 | {perplexities(ref, ref, targets)['ppl']:.2f} | 1 | 0 | 1 "
          f"| {n_gen} / 1 | {n_gen} / 1 |")
    hidden = float_model.model.params.ffn_hidden_dim
    per_prompt, gaps, route_lines = {}, {}, []
    for mode, group, dequantized in DEMO_VARIANTS:
        name = (mode if group is None else f"{mode} g{group}") + (
            ", float32 activations" if dequantized else "")
        if group is not None and group not in group_sizes_for(hidden):
            print(f"| {name} | n/a: w2's {hidden} input columns are not a multiple of {group} "
                  f"| | | | | |")
            continue
        llama = build_demo(mode, group, dequantized)
        with routes() as window_routes:
            got = window_logits(llama, windows)
        ppl, dist = perplexities(ref, got, targets), distributions(ref, got)
        with routes() as greedy_routes:
            generated = greedy(llama, inputs[:4], n_gen) + greedy(llama, inputs[4:], n_gen)
        pairs = [agreement(want, have, n_gen) for want, have in zip(ref_greedy, generated)]
        gaps.update({(i, prefix): next_lead(float_model, inputs[i] + ref_greedy[i][:prefix])
                     for i, (prefix, _) in enumerate(pairs) if prefix < n_gen})
        per_prompt[name] = pairs
        cells = [f"{sum(p for p, _ in half) / 4:.1f} / {sum(a for _, a in half) / 4:.3f}"
                 for half in (pairs[:4], pairs[4:])]
        print(f"| {name} | {ppl['ppl']:.2f} | {ppl['ratio']:.4f} (± {ppl['se']:.4f}) "
              f"| {dist['kl']:.2e} | {dist['top1']:.4f} | {cells[0]} | {cells[1]} |",
              flush=True)
        if not dequantized:
            route_lines.append(f"- {name}: windows: {routes_line(window_routes)}; greedy: "
                               f"{routes_line(greedy_routes)}")
    print(f"\nGreedy decoding, {n_gen} tokens: matching prefix (agreement) per prompt, the "
          f"four text prompts then the four dialogs:\n")
    for name, pairs in per_prompt.items():
        print(f"- {name}: " + ", ".join(f"{p} ({a:.2f})" for p, a in pairs))
    gaps = sorted(gaps.values())
    if gaps:
        print(f"\nAt the {len(gaps)} distinct first differences, float32's first choice led its "
              f"second by {gaps[0]:.2f} to {gaps[-1]:.2f} logits (median "
              f"{gaps[len(gaps) // 2]:.2f}); at the held-out windows' positions the median lead "
              f"is {float(leads(ref).median()):.2f}.")
    print("\nRoutes that ran (calls per route; the float32-activation rows run float32 "
          "products):\n")
    print("\n".join(route_lines))


# ------------------------------------------------------------------------- S with outliers
class ActivationInt8:
    """W8A8, the foil: our int8 weight (its int8 values and row scales) times activations
    rounded to int8 as well, with one scale for the whole activation tensor of a product call
    ("tensor"), one per token ("token"), or one per 32 values of a token ("block32", as
    llama.cpp's q8_0 x q8_0 dot product rounds its activations); absmax / 127, as LLM.int8()'s
    vector-wise and dynamic per-tensor schemes do. Computed in float32 (the integer sums are
    exact up to float32 rounding). per="kernel": not a foil but our native int8 kernel itself
    (int16 activations per token) for every product, prefills included."""

    def __init__(self, packed, per: str):
        self.per, self.device, self.dtype = per, packed.device, torch.float32
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.q = packed.weight[:, : packed.in_features].to(torch.float32)  # (out, in)
        self.scales = packed.scales.to(torch.float32)  # (out,)
        self.weight, self.kernel_scales = packed.weight, packed.scales  # padded, bfloat16

    def product(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.float32)  # (rows, in)
        if self.per == "kernel":
            out = cpu_kernels.int8_mm(x2.contiguous(), self.weight, self.kernel_scales)
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if self.per == "block32":
            xb = x2.view(x2.shape[0], -1, 32)
            sx = (xb.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
            xd = (torch.round(xb / sx).clamp_(-127, 127) * sx).view_as(x2)
            out = (xd @ self.q.t()) * self.scales
            return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        absmax = x2.abs().amax() if self.per == "tensor" else x2.abs().amax(1, keepdim=True)
        sx = (absmax / 127).clamp(min=1e-12)
        xq = torch.round(x2 / sx).clamp_(-127, 127)
        out = (xq @ self.q.t()) * sx * self.scales
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def use_activation_int8(model: Transformer, per: str) -> None:
    """Every packed int8 product of `model` as ActivationInt8."""
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        a._qkv.set_packed(ActivationInt8(a._qkv.packed, per))
        f._w13.set_packed(ActivationInt8(f._w13.packed, per))
        a.wo.weight = ActivationInt8(a.wo.weight, per)
        f.w2.weight = ActivationInt8(f.w2.weight, per)
    model.output.weight = ActivationInt8(model.output.weight, per)


def plant_outliers(state: Dict[str, torch.Tensor], dims: torch.Tensor, scales: torch.Tensor,
                   compensate: bool = True) -> Dict[str, torch.Tensor]:
    """A copy of a float state dict whose products that read an RMSNorm's output (wq, wk, wv,
    w1, w3, output) see channels `dims` `scales` times larger: those channels of every norm's
    weight are multiplied by them. With `compensate`, the same input columns of the products
    are divided by them, so the float model computes what it did (SmoothQuant's smoothing,
    run backwards); without, the model changes and the channels dominate every product."""
    out = dict(state)
    readers = [("norm.weight", ["output.weight"])] + [
        (f"layers.{i}.{norm}.weight", [f"layers.{i}.{p}.weight" for p in products])
        for i in range(sum(k.endswith("attention_norm.weight") for k in state))
        for norm, products in NORM_READERS.items()]
    for norm, products in readers:
        out[norm] = state[norm].clone()
        out[norm][dims] *= scales
        for name in products if compensate else ():
            out[name] = state[name].clone()
            out[name][:, dims] /= scales
    return out


def quantized_state(state, mode: str, group: Optional[int]) -> dict:
    """The state dict with the library's saved formats for the quantized tensors: what
    Llama.build(quantize=...) builds on one process (llama/checkpoints/loading.py's quantizer)."""
    return {k: quantize(v, mode, group or 32, name=k) if is_quantized(k) else v
            for k, v in state.items()}


def noisy_state(state: dict, int8: dict, seed: int = 3) -> dict:
    """The float weights plus Gaussian noise with, in each row, the rms of int8's rounding
    error there: an error of int8's size without its structure, to tell what the model's
    sensitivity does from what the scheme does."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for k, q in int8.items():
        if not isinstance(q, torch.Tensor):
            rms = (q.dequantize() - state[k]).pow(2).mean(1, keepdim=True).sqrt()
            out[k] = state[k] + rms * torch.randn(state[k].shape, generator=gen)
    return out


def s_model(args: ModelArgs, state: dict, per: Optional[str] = None) -> Transformer:
    """The model of `state`; per="float32": its quantized weights dequantized into a float32
    model; "tensor", "token", "block32": its int8 weights as W8A8 foils, "kernel": as our
    native int8 kernel (ActivationInt8)."""
    if per == "float32":
        state = {k: v if isinstance(v, torch.Tensor) else v.dequantize()
                 for k, v in state.items()}
    model = Transformer.from_state_dict(args, dict(state))  # (it rearranges its argument)
    if per in ("tensor", "token", "block32", "kernel"):
        use_activation_int8(model, per)
    return model


def s_logits(model: Transformer, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([model.forward(tokens[i: i + chunk], 0,
                                    model.new_cache(len(tokens[i: i + chunk]), tokens.shape[1]))
                      for i in range(0, len(tokens), chunk)])


def input_outlier_ratios(model: Transformer, tokens: torch.Tensor, dims: torch.Tensor) -> str:
    """Mean |x| of the planted channels over that of the others, in the inputs of the first
    and the last layer's q/k/v product (seen by a pre-hook on their Attention)."""
    ratios = []

    def hook(module, inputs):
        x = inputs[0].abs().flatten(0, -2)  # (tokens, dim)
        others = torch.ones(x.shape[-1], dtype=torch.bool)
        others[dims] = False
        ratios.append(", ".join(f"{r:.0f}x" for r in x[:, dims].mean(0) / x[:, others].mean()))

    handles = [model.layers[i].attention.register_forward_pre_hook(hook) for i in (0, -1)]
    model.forward(tokens[:1], 0, model.new_cache(1, tokens.shape[1]))
    for handle in handles:
        handle.remove()
    return f"first layer {ratios[0]}; last layer {ratios[1]}"


PLANTS = {"none": "no outliers (control)",
          "compensated": "outliers, compensated: the same float function as the control",
          "uncompensated": "outliers, uncompensated: the channels dominate every product"}


def outlier_part(quick: bool, plants: List[str]) -> None:
    init_process_groups(torch.device("cpu"), 1, announce=False)
    bsz, seqlen, chunk = (2, 32, 2) if quick else (8, 128, 2)
    args = ModelArgs(**dict(S_SHAPE, n_layers=2 if quick else S_SHAPE["n_layers"]),
                     max_seq_len=seqlen, max_batch_size=chunk)
    base = {k: v.float() for k, v in random_weights(args, seed=0).items() if k != "rope.freqs"}
    dims = torch.randperm(args.dim, generator=torch.Generator().manual_seed(1))[:4]
    tokens = torch.randint(3, args.vocab_size, (bsz, seqlen),
                           generator=torch.Generator().manual_seed(2))
    schemes = [("int8 weight-only (ours)", "int8", None, None),
               ("int8 weights, float32 activations", "int8", None, "float32"),
               ("int4 g32 weight-only (ours)", "int4", 32, None),
               ("int4 g128 weight-only (ours)", "int4", 128, None),
               ("W8A8, one activation scale per tensor (foil)", "int8", None, "tensor"),
               ("W8A8, one activation scale per token (foil)", "int8", None, "token"),
               ("W8A8, one activation scale per 32 values (llama.cpp's q8_0; foil)", "int8",
                None, "block32"),
               ("int8, int16 activations per token (our decode kernel, for every product)",
                "int8", None, "kernel"),
               ("float32 + noise of int8's error size (reference)", "int8", None, "noise")]
    schemes = [s for s in schemes if not (quick and s[2] == 128)
               and (s[3] != "kernel" or cpu_kernels.available())]
    print(f"\n## Random S model (dim 768, {args.n_layers} layers, vocab 32000; random_weights "
          f"seed 0): {bsz} sequences of {seqlen} random tokens, teacher-forced in prefills of "
          f"{chunk} sequences ({bsz * seqlen} positions)\n")
    print(f"Planted channels {dims.tolist()}, x{', x'.join(f'{s:g}' for s in OUTLIER_SCALES)}."
          f" 'margin > 1': positions where float32's top two logits differ by more than 1.\n")
    control = None
    for plant in plants:
        state = base if plant == "none" else plant_outliers(base, dims, torch.tensor(
            OUTLIER_SCALES), plant == "compensated")
        float_model = s_model(args, state)
        ref = s_logits(float_model, tokens, chunk)
        confident = leads(ref) > 1
        quantized = {("int8", None): quantized_state(state, "int8", None)}
        q = quantized["int8", None]["layers.0.attention.wq.weight"].weight  # int8 (out, in)
        planted = torch.zeros(q.shape[1], dtype=torch.bool)
        planted[dims] = True
        control = ref if control is None else control
        zeros = [f"{(q[:, cols] == 0).float().mean():.1%}" for cols in (planted, ~planted)]
        notes = [f"float32: mean top-1 probability {ref.softmax(-1).amax(-1).mean():.2f}, "
                 f"{confident.float().mean():.0%} of positions with margin > 1; its logits "
                 f"differ from the control's by {(ref - control).norm() / control.norm():.1e}",
                 f"int8 values that are 0 in layer 0's wq: {zeros[0]} in the planted columns, "
                 f"{zeros[1]} in the others"]
        if plant != "none":
            notes.insert(1, "products' inputs, planted channels' mean |x| over the others': "
                         + input_outlier_ratios(float_model, tokens, dims))
        del float_model
        print(f"### {PLANTS[plant]}\n\n" + "".join(f"- {n}\n" for n in notes))
        print("| scheme | top-1 agreement | top-1, margin > 1 | mean KL(float32 ‖ q) "
              "| relative logit error |\n|---|---|---|---|---|")
        seen = {}
        for name, mode, group, per in schemes:
            if (mode, group) not in quantized:  # the foils reuse the int8 weights
                quantized[mode, group] = quantized_state(state, mode, group)
            with routes() as counts:
                model = (s_model(args, noisy_state(state, quantized[mode, group])) if
                         per == "noise" else s_model(args, quantized[mode, group], per))
                got = s_logits(model, tokens, chunk)
            m = distributions(ref, got)
            agree = ref.argmax(-1) == got.argmax(-1)
            print(f"| {name} | {m['top1']:.3f} | {agree[confident].float().mean():.3f} "
                  f"| {m['kl']:.3g} | {m['rel']:.3f} |", flush=True)
            if per is None:
                seen[name.split(" (")[0]] = routes_line(counts)
        print("\nRoutes (calls): " + "; ".join(f"{k}: {v}" for k, v in seen.items())
              + "; the other rows: float32 products.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 windows, "
                        "16 greedy tokens; S with 2 layers, 2 x 32 tokens, no g128")
    parser.add_argument("--part", choices=["demo", "outliers", "both"], default="both")
    parser.add_argument("--plants", nargs="+", default=list(PLANTS), choices=list(PLANTS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    print("`" + " ".join(["python -m benchmarks.quant_quality"] + sys.argv[1:]) + "`")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        if args.part in ("demo", "both"):
            demo_part(args.quick)
        if args.part in ("outliers", "both"):
            outlier_part(args.quick, args.plants)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
