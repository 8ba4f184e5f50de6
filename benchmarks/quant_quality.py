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
   The int8 and int4 g32 rows include our opt-in int8 activations (activations="int8").
2. A random model of bench.py's S shape with planted outlier channels, teacher-forced on
   random tokens: top-1 agreement and KL against its own float32 model for our weight-only
   int8 and int4, our int8 activations, and W8A8 foils that also round every product's
   activations to int8, with one scale per activation tensor or per token
   (benchmarks/quant_outliers.py).

Products take the library's routes (llama/layers/linear.py); the routes that ran and their
activations' dtype are printed under each table. Seeds are fixed; output is markdown.
"""

import argparse
import ast
import math
import os
import sys
import time
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

from benchmarks.quant_measures import distributions, leads, routes, routes_line
from benchmarks.quant_outliers import PLANTS, outlier_part
from llama import Llama
from llama.chat_format import dialog_to_tokens
from llama.cli.demo import DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, heldout_windows
from llama.quantize.formats import group_sizes_for, is_quantized, quantize

REPO = Path(__file__).resolve().parent.parent

DEMO_WINDOW = 257  # BOS + 256 tokens: scripts/train_demo_model.py's evaluation windows
GREEDY_TOKENS = 64
# (mode, group size, dequantized: the same weights in a float32 model, float32 activations)
DEMO_VARIANTS = [("int8", None, False), ("int8", None, True), ("w8a8", None, False),
                 ("int4", 32, False), ("int4", 32, True), ("w4a8", 32, False),
                 ("int4", 64, False), ("int4", 128, False)]
# modes with int8 activations (opt-in): their weights' mode
INT8_ACTIVATIONS = {"w8a8": "int8", "w4a8": "int4"}



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
    activations = "int8" if mode in INT8_ACTIVATIONS else None
    llama = Llama.build(DEMO_CKPT_DIR, DEMO_TOKENIZER_PATH, max_seq_len=512, max_batch_size=4,
                        verbose=False, device="cpu",
                        quantize=INT8_ACTIVATIONS.get(mode, mode), group_size=group,
                        activations=activations)
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
        if mode in INT8_ACTIVATIONS:
            name = name.replace(mode, INT8_ACTIVATIONS[mode]) + ", int8 activations (opt-in)"
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
