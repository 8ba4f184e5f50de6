"""A quantized model of a named shape, built in memory on the device, then decoded greedily.

    python -m benchmarks.quant_gpu --shape 70B --mode int8          # 70B on one GPU
    python -m benchmarks.quant_gpu --shape 7B --mode int8 int4 --compile
    python -m benchmarks.quant_gpu --shape tiny --device cpu        # a smoke run

Random weights are drawn tensor by tensor on the device in bfloat16 and quantized there at
once, so no float copy of the model ever exists and no checkpoint is written (70B in int8 is
65 GiB, more than the lent GPU machine's disk). Prints, per mode: the weights' bytes on the
device, the peak device memory while building, the build time, and decode tok/s at batch 1
over --gen-len greedy tokens after a --prompt-len prompt (eager, and with --compile the
compiled step, CUDA graphs on a GPU). Loading real checkpoints quantized, and their speed
against bfloat16 in one run, is `benchmarks/bench.py --quantize`.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.shapes import SHAPES, VOCAB, NoEosTokenizer
from llama.args import ModelArgs
from llama.checkpoints.meta import full_shapes
from llama.engine.distributed import init_process_groups
from llama.generation import Llama
from llama.model import Transformer
from llama.quantize.formats import DEFAULT_GROUP_SIZE, is_quantized, quantize

REPO = Path(__file__).resolve().parent.parent


def random_quantized_model(args: ModelArgs, mode: str, group_size: int, device, dtype,
                           seed: int = 0) -> Transformer:
    """The model with random weights, each quantized (or cast) as soon as it is drawn."""
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in full_shapes(args).items():
        if name.endswith("norm.weight"):
            state[name] = (1.0 + 0.1 * torch.randn(shape, generator=generator, device=device,
                                                   dtype=torch.bfloat16)).to(dtype)
            continue
        scale = (4.0 if name == "output.weight" else 1.0) / shape[1] ** 0.5
        weight = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
        weight.mul_(scale)
        if is_quantized(name):
            state[name] = quantize(weight, mode, group_size, name=name)
        else:
            state[name] = weight.to(dtype)
        del weight
    return Transformer.from_state_dict(args, state)


def model_bytes(model: Transformer) -> int:
    """Bytes of every weight: the products' (packed or float), the embedding and the norms."""
    products = [model.output.weight]
    for layer in model.layers:
        products += [layer.attention.wqkv, layer.attention.wo.weight, layer.feed_forward.w13,
                     layer.feed_forward.w2.weight]
    total = sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
                for w in products)
    others = [model.tok_embeddings.weight, model.norm.weight]
    for layer in model.layers:
        others += [layer.attention_norm.weight, layer.ffn_norm.weight]
    return total + sum(w.numel() * w.element_size() for w in others)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(llama: Llama, prompt_len: int, gen_len: int, device) -> float:
    """Greedy tok/s of the new tokens after the first (the first one's time is the prefill)."""
    prompt = [[(7 * i) % (VOCAB - 3) + 3 for i in range(prompt_len)]]
    llama.generate(prompt, 2, temperature=0)  # warm-up (and compilation)
    synchronize(device)
    start = time.perf_counter()
    llama.generate(prompt, 1, temperature=0)
    synchronize(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    llama.generate(prompt, gen_len, temperature=0)
    synchronize(device)
    return (gen_len - 1) / max(time.perf_counter() - start - prefill, 1e-9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7B", choices=sorted(SHAPES))
    parser.add_argument("--mode", nargs="+", default=["int8"], choices=["int8", "int4"])
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also the compiled decode step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    init_process_groups(device, 1, announce=False)
    model_args = ModelArgs(vocab_size=VOCAB, max_seq_len=args.prompt_len + args.gen_len,
                           max_batch_size=1, **SHAPES[args.shape])
    print(f"shape {args.shape}, device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"activations {str(dtype)[6:]}, torch {torch.__version__}", flush=True)
    for mode in args.mode:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        model = random_quantized_model(model_args, mode, args.group_size, device, dtype)
        synchronize(device)
        built = time.perf_counter() - start
        weights = model_bytes(model)
        label = mode + (f" g{args.group_size}" if mode == "int4" else "")
        memory = (f", peak device memory while building "
                  f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                  if device.type == "cuda" else "")
        print(f"{label}: built in {built:.1f} s; weights {weights / 2**30:.2f} GiB{memory}",
              flush=True)
        llama = Llama(model, NoEosTokenizer())
        rate = decode_rate(llama, args.prompt_len, args.gen_len, device)
        print(f"  eager decode, batch 1: {rate:.1f} "
              f"tok/s", flush=True)
        if args.compile:
            llama.compile_decode()
            print(f"  compiled decode, batch 1: "
                  f"{decode_rate(llama, args.prompt_len, args.gen_len, device):.1f} tok/s",
                  flush=True)
        del llama, model
    return 0


if __name__ == "__main__":
    sys.exit(main())
