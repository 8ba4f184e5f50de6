"""Part 2 of benchmarks/quant_quality.py: a random model of bench.py's S shape with planted
outlier channels, teacher-forced on random tokens: top-1 agreement and KL against its own
float32 model for our weight-only int8 and int4, our int8 activations (opt-in), and W8A8 foils
that round every product's activations to int8 with one scale per tensor, token or 32 values
(the foils live here only). Run through `python -m benchmarks.quant_quality --part outliers`.
"""

from typing import Dict, List, Optional

import torch

from benchmarks.quant_measures import distributions, leads, routes, routes_line
from llama.args import ModelArgs
from llama.checkpoints.fixtures import random_weights
from llama.engine.distributed import init_process_groups
from llama.kernels import cpu_kernels
from llama.model import Transformer
from llama.quantize.formats import is_quantized, quantize

S_SHAPE = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000)  # bench.py's S
OUTLIER_SCALES = (50.0, 66.7, 83.3, 100.0)  # 4 channels, as docs/QUANTIZATION.md's study
# Products whose input is an RMSNorm's output, by the norm that feeds them.
NORM_READERS = {"attention_norm": ("attention.wq", "attention.wk", "attention.wv"),
                "ffn_norm": ("feed_forward.w1", "feed_forward.w3")}


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
    Llama.build(quantize=...) builds on one process (llama/loading.py's quantizer)."""
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
    native int8 kernel (ActivationInt8); "w8a8": the library's int8 activations
    (Transformer.use_int8_activations; int8 or int4 weights)."""
    if per == "float32":
        state = {k: v if isinstance(v, torch.Tensor) else v.dequantize()
                 for k, v in state.items()}
    model = Transformer.from_state_dict(args, dict(state))  # (it rearranges its argument)
    if per in ("tensor", "token", "block32", "kernel"):
        use_activation_int8(model, per)
    if per == "w8a8":
        model.use_int8_activations()
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
               ("int8, int8 activations in blocks of 32 (ours, opt-in: activations='int8')",
                "int8", None, "w8a8"),
               ("int4 g32, int8 activations in blocks of 32 (ours, opt-in)", "int4", 32,
                "w8a8"),
               ("float32 + noise of int8's error size (reference)", "int8", None, "noise")]
    schemes = [s for s in schemes if not (quick and s[2] == 128)
               and (s[3] not in ("kernel", "w8a8") or cpu_kernels.available())]
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
