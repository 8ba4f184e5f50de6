"""Speed of loading and generation on random-weight checkpoints in Meta's layout.

    python -m benchmarks.bench --shape S                     # this library alone
    python -m benchmarks.bench --shape S --compare reference hf
    python -m benchmarks.bench --shape S --meta ~/src/llama   # a checkout of Meta's repository
    python -m benchmarks.bench --shape 7B --device cuda --batch 1 8
    python -m benchmarks.bench --shape S --load --format hf   # loading Meta's vs Hub layout
    python -m benchmarks.bench --shape M --load --quantize int8 --prequantized
    python -m benchmarks.bench --shape S --quantize int8 int4 --bandwidth   # float32 vs both

Prints load time and peak RSS (in a fresh process), prefill tok/s, time to first token and
decode tok/s for each batch size, KV-cache bytes, and, with --compare, the same figures for the
reference algorithm (Meta's generate loop and model math, restated in tests/meta_reference.py)
and for Hugging Face transformers on the same weights, with ratios, and whether their greedy
tokens equal ours. Medians of --runs runs; a ratio is the median of run-by-run ratios.

--format hf also converts the checkpoint to Hugging Face's layout (safetensors, as
`python -m llama.convert --to hf` writes it) and measures loading both, --runs times each in
turns, each load in a fresh process.

--load --quantize int8|int4 also loads the checkpoint quantized while loading, and with
--prequantized the checkpoint `python -m llama.quantize` writes from it (written once, timed):
peak RSS against the float32 weights' bytes and the issue's bound (0.3 GiB + 0.4 x those).

--quantize int8 int4 (--group-size G) also loads the same checkpoint quantized, once per mode,
and times each against the float model in the same turns: their figures come with "x float",
their speed over the float model's (the median of run-by-run ratios). --bandwidth measures the
machine's read bandwidth in the same run (x.sum() over 1 GiB of float32, on the benchmark's
threads) and puts each model's decode tok/s x bytes read per token (its product weights, and
the KV cache its attention reads, per row) against it.

--meta PATH times Meta's own model code (PATH/llama/model.py, from a checkout of
github.com/meta-llama/llama; nothing of it ships here) on the CPU in float32: one gloo process,
fairscale's model parallelism of size 1, its `.cuda()` calls made no-ops while the model is
built, and its generate loop as restated in tests/meta_reference.py (Meta's own generate
creates its tensors on "cuda" only).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.compared import HuggingFace, MetaOriginal, Ours, Reference
from benchmarks.shapes import SHAPES, VOCAB, prompts
from llama.checkpoints.fixtures import write_random_checkpoint
from llama.engine.distributed import choose_device, choose_dtype
from llama.model import KVCache, ModelArgs, count_parameters

REPO = Path(__file__).resolve().parent.parent


def checkpoint_dir(shape: str, root: Path, device: torch.device) -> Path:
    """A random checkpoint of the shape, written once (numbers drawn on `device`; no md5
    checklist, which would take half a minute for 7B)."""
    out = root / f"{shape}-mp1"
    done = out / "written"
    if not done.exists():
        args = ModelArgs(vocab_size=VOCAB, **SHAPES[shape])
        print(f"writing a random {shape} checkpoint ({count_parameters(args) / 1e6:.0f} M "
              f"parameters) to {out} ...", file=sys.stderr)
        write_random_checkpoint(out, args, 1, seed=0, device=device, checklist=False)
        done.touch()
    return out


def hf_dir(meta_dir: Path) -> Path:
    """The same weights in Hugging Face's layout, converted once."""
    from llama.hf.convert import meta_to_hf

    out = meta_dir.with_name(meta_dir.name.replace("-mp1", "-hf"))
    if not (out / "written").exists():
        meta_to_hf(meta_dir, out, say=lambda line: print(line, file=sys.stderr))
        (out / "written").touch()
    return out


def quantized_dir(meta_dir: Path, mode: str) -> Path:
    """The checkpoint `python -m llama.quantize` writes from the bench checkpoint, once."""
    out = meta_dir.with_name(meta_dir.name.replace("-mp1", f"-{mode}"))
    if not (out / "written").exists():
        start = time.time()
        subprocess.run([sys.executable, "-m", "llama.quantize", str(meta_dir), str(out),
                        "--mode", mode], check=True, cwd=REPO)
        print(f"python -m llama.quantize --mode {mode}: {time.time() - start:.1f} s",
              file=sys.stderr)
        (out / "written").touch()
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_only(ckpt: Path, device, dtype, quantize=None) -> dict:
    """Run in a fresh process: load time (wall and this process's CPU) and peak RSS against
    the weights' bytes (and the float32 weights' bytes)."""
    from llama.loading import LoadOptions, load_model

    baseline = rss_bytes()
    cpu = time.process_time()
    start = time.time()
    model = load_model(str(ckpt), VOCAB, 2048, 1, LoadOptions(device=device, dtype=dtype,
                                                              verbose=False, quantize=quantize))
    if model.norm.weight.is_cuda:
        torch.cuda.synchronize()
    seconds = time.time() - start
    cpu = time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    if model.layers[0].attention.wq.weight is None:  # quantized: packed weights are no state
        from llama.checkpoints.memory import weight_bytes
        from llama.checkpoints.meta import read_quantization

        saved = read_quantization(ckpt) if quantize is None else None
        mode = quantize or saved.mode
        weights = weight_bytes(model.params, mode, dtype=model.norm.weight.dtype,
                               **({"group_size": saved.group_size} if saved and mode == "int4"
                                  else {}))
    return {"load_s": seconds, "cpu_s": cpu, "baseline_rss": baseline, "peak_rss": peak,
            "weights": weights, "float32_weights": 4 * count_parameters(model.params)}


def measure_load(ckpt: Path, device, dtype, quantize=None) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench", "--load-only", str(ckpt)]
    if device:
        command += ["--device", device]
    if dtype:
        command += ["--dtype", dtype]
    if quantize:
        command += ["--quantize", quantize]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_line(label: str, loads, base=None, against="Meta's layout", bound=False) -> str:
    """Medians of the runs' load figures; against `base` (the same runs of another layout),
    the median of the run-by-run time ratios and the peak difference. `bound`: the peak
    against the float32 weights and the issue's bound for quantized loads."""
    gib = 1024 ** 3
    median = {key: statistics.median(load[key] for load in loads) for key in loads[0]}
    above = (median["peak_rss"] - median["baseline_rss"]) / median["weights"]
    line = (f"{label}: {median['load_s']:.2f} s ({median['cpu_s']:.2f} s of CPU); "
            f"weights {median['weights'] / gib:.3f} GiB; "
            f"peak RSS {median['peak_rss'] / gib:.3f} GiB = {median['baseline_rss'] / gib:.3f} "
            f"GiB before loading + {above:.2f} x the weights")
    if bound:  # the issue's: peak <= 0.3 GiB + 0.4 x the float32 weights' bytes
        float32, peak = median["float32_weights"], median["peak_rss"]
        limit = 0.3 * gib + 0.4 * float32
        line += (f"; peak - before = {(peak - median['baseline_rss']) / float32:.2f} x the "
                 f"{float32 / gib:.3f} GiB of float32 weights; bound 0.3 GiB + 0.4 x = "
                 f"{limit / gib:.3f} GiB: {'within' if peak <= limit else 'OVER'}")
    if base is not None:
        ratio = statistics.median(a["load_s"] / b["load_s"] for a, b in zip(loads, base))
        cpu = statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in zip(loads, base))
        peak = statistics.median(a["peak_rss"] - b["peak_rss"] for a, b in zip(loads, base))
        line += (f" | against {against}: {ratio:.2f}x the time ({cpu:.2f}x the CPU time), "
                 f"peak {peak / 2 ** 20:+.1f} MiB")
    return line


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def bench(impls, batches, prompt_len, gen_len, mixed, runs, warmup_len=2):
    """Per implementation and case, each run's figures (prefill, and decode per batch size),
    and the greedy tokens of its last run. The implementations take turns run by run, so a
    slower or busier spell of the machine hits them alike, and ratios are taken run by run.
    Each case starts with a warm-up generation of warmup_len tokens per implementation (a
    compiled step needs the full length: it compiles once per cache size)."""
    cases = [(f"batch {bsz}", prompts([prompt_len] * bsz), gen_len > 1) for bsz in batches]
    if mixed:
        cases.append((f"mixed {'/'.join(map(str, mixed))}", prompts(mixed), False))
    results = {impl.name: {} for impl in impls}
    tokens_out = {}
    for case, batch, decode in cases:
        first, total = {impl.name: [] for impl in impls}, {impl.name: [] for impl in impls}
        for impl in impls:
            impl.generate(batch, warmup_len if decode else 1)
        for _ in range(runs):
            for impl in impls:
                seconds, out = timed(lambda: impl.generate(batch, 1))
                first[impl.name].append(seconds)
                if decode:
                    seconds, out = timed(lambda: impl.generate(batch, gen_len))
                    total[impl.name].append(seconds)
                tokens_out.setdefault(case, {})[impl.name] = out
        tokens = sum(len(p) for p in batch)
        for impl in impls:
            figures = {"time to first token (s)": first[impl.name],
                       "prefill tok/s": [tokens / ttft for ttft in first[impl.name]]}
            if decode:  # each run's decode time against the same run's first token
                figures["decode tok/s"] = [
                    len(batch) * (gen_len - 1) / (whole - prefill)
                    for whole, prefill in zip(total[impl.name], first[impl.name])]
            results[impl.name][case] = figures
    return results, tokens_out


def report(results, tokens_out=None, ours="this library", against_ours=None):
    """Medians of each figure, and how many times faster we are: the median of the run-by-run
    ratios (each run's figures were taken back to back); for the implementations named in
    `against_ours` (our quantized models) how many times faster they are than ours instead.
    Then whether each implementation's greedy tokens equal ours."""
    for case, figures in results[ours].items():
        for metric, values in figures.items():
            line = f"{case:>22} {metric:>24}: {statistics.median(values):9.3f}"
            for name, other in results.items():
                if name != ours:
                    theirs = other[case][metric]
                    faster = statistics.median(
                        (b / a if "(s)" in metric else a / b) for a, b in zip(values, theirs))
                    line += f" | {name} {statistics.median(theirs):9.3f} " + (
                        f"(x{1 / faster:.2f} float)" if name in (against_ours or ())
                        else f"(we are {faster:.2f}x)")
            print(line)
    for case, outputs in (tokens_out or {}).items():
        verdicts = [f"{name} {agreement(outputs[ours], theirs)}"
                    for name, theirs in outputs.items() if name != ours]
        if verdicts:
            print(f"{case:>22} {'greedy tokens':>24}: " + "; ".join(verdicts))


def agreement(ours, theirs) -> str:
    """'identical', or where the first difference is."""
    for row, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"DIFFER (row {row}, new token {at})"
    return "identical" if len(ours) == len(theirs) else "DIFFER (row count)"


def cpu_description() -> str:
    """The CPU's model name and the flags that decide which kernels run."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
    return f"{name}, {os.cpu_count()} CPUs, flags " + " ".join(f for f in wanted if f in flags)


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """The machine's read bandwidth (bytes/s) on this process's threads: x.sum() over `gib` GiB
    of float32, the median of `repeats`."""
    x = torch.ones(int(gib * 2 ** 30) // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


def bandwidth_lines(impls, results, batches, prompt_len, gen_len, model_args, bandwidth):
    """Decode tok/s x bytes read per token against the measured read bandwidth, per model and
    batch size: a step reads every product's weights once and, per row, the KV cache up to its
    position (on average prompt_len + gen_len / 2 tokens)."""
    kv = KVCache.bytes_per_token(model_args, torch.float32) * (prompt_len + gen_len / 2)
    lines = [f"read bandwidth {bandwidth / 1e9:.1f} GB/s (x.sum() over 1 GiB, "
             f"{torch.get_num_threads()} threads)"]
    for impl in impls:
        if not hasattr(impl, "weight_bytes"):
            continue
        weights = impl.weight_bytes()
        for bsz in batches:
            figures = results[impl.name].get(f"batch {bsz}", {})
            if "decode tok/s" not in figures:
                continue
            tok_s = statistics.median(figures["decode tok/s"])
            per_token = weights / bsz + kv
            lines.append(f"{impl.name:>14} batch {bsz}: {tok_s:7.1f} tok/s x "
                         f"{per_token / 1e6:6.1f} MB/token (weights {weights / 1e6:.1f} MB per "
                         f"step, KV {kv / 1e6:.1f} MB per row) = {tok_s * per_token / 1e9:5.1f} "
                         f"GB/s = {tok_s * per_token / bandwidth:.0%} of the read bandwidth")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="S", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128,
                        help="new tokens per generation; 1: prefill only (decode figures "
                             "from a few tokens are mostly noise)")
    parser.add_argument("--mixed", type=int, nargs="*", default=[16, 48, 96, 128],
                        help="prompt lengths of a mixed batch for prefill (none: skip)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare", nargs="*", default=[], choices=["reference", "hf"])
    parser.add_argument("--meta", default=None, metavar="PATH",
                        help="also time Meta's llama/model.py from this checkout (CPU only)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--compile", action="store_true", help="compiled decode step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int4"],
                        help="also the same model quantized, timed against float in turns "
                             "(with --load: loaded quantized while loading)")
    parser.add_argument("--group-size", type=int, default=None, help="int4 group size")
    parser.add_argument("--bandwidth", action="store_true",
                        help="measure read bandwidth; tok/s x bytes per token against it")
    parser.add_argument("--root", default="/tmp/llama-bench", help="where checkpoints go")
    parser.add_argument("--load", action="store_true", help="only the loading figures")
    parser.add_argument("--format", default="meta", choices=["meta", "hf"],
                        help="hf: also load the same weights in Hugging Face's layout")
    parser.add_argument("--prequantized", action="store_true",
                        help="--load --quantize: also load the checkpoint python -m "
                             "llama.quantize writes")
    parser.add_argument("--load-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load_only:
        print(json.dumps(load_only(Path(args.load_only), args.device, args.dtype,
                                   args.quantize[0] if args.quantize else None)))
        return
    if args.prequantized and not args.quantize:
        raise SystemExit("--prequantized needs --quantize int8|int4")

    if args.gen_len < 1 or args.prompt_len < 1:
        raise SystemExit("--gen-len and --prompt-len must be at least 1")
    # one choice for every implementation: the library's own defaults
    device = choose_device(args.device)
    args.device, args.dtype = str(device), str(choose_dtype(device, args.dtype))[len("torch."):]
    if (args.meta or "reference" in args.compare) and (
            device.type != "cpu" or args.dtype != "float32"):
        raise SystemExit("--meta and --compare reference run on the CPU in float32 only")
    ckpt = checkpoint_dir(args.shape, Path(args.root), device)
    model_args = ModelArgs(vocab_size=VOCAB, **SHAPES[args.shape])
    layouts = {"meta": (ckpt, None)}
    if args.format == "hf":
        layouts["hf"] = (hf_dir(ckpt), None)
    for mode in args.quantize if args.load else []:
        layouts[f"{mode} at load"] = (ckpt, mode)
        if args.prequantized:
            layouts[f"{mode} pre-quantized"] = (quantized_dir(ckpt, mode), None)
    loads = {name: [] for name in layouts}
    for _ in range(1 if len(layouts) == 1 else args.runs):
        for name, (path, mode) in layouts.items():  # in turns: a busy spell hits all alike
            loads[name].append(measure_load(path, args.device, args.dtype, mode))
    print(f"shape {args.shape}: {count_parameters(model_args) / 1e6:.0f} M parameters, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"dtype {args.dtype}{', compiled decode step' if args.compile else ''}")
    if args.quantize and device.type == "cpu":
        from llama.kernels import cpu_kernels

        print(f"CPU: {cpu_description()}; native kernels: "
              f"{cpu_kernels.isa() or cpu_kernels.unavailable_reason()}")
    print(load_line("load", loads["meta"]))
    if "hf" in loads:
        print(load_line("load, Hugging Face layout", loads["hf"], loads["meta"]))
    for mode in args.quantize if args.load else []:
        at_load = loads[f"{mode} at load"]
        print(load_line(f"load, {mode} at load", at_load, loads["meta"], "float", bound=True))
        if args.prequantized:
            print(load_line(f"load, {mode} pre-quantized", loads[f"{mode} pre-quantized"],
                            at_load, "quantizing at load", bound=True))
    if args.load:
        return
    # (rows, tokens) of each case's calls: the mixed batch generates one token after its
    # prompts, which may be longer than --prompt-len
    calls = [(bsz, args.prompt_len + args.gen_len) for bsz in args.batch]
    if args.mixed:
        calls.append((len(args.mixed), max(args.mixed) + 1))
    per_token = KVCache.bytes_per_token(model_args, getattr(torch, args.dtype))
    bsz, length = max(calls, key=lambda call: call[0] * call[1])
    print(f"KV cache: {per_token / 1024:.0f} KiB per token; the largest call, batch {bsz} x "
          f"{length} tokens, allocates {per_token * bsz * length / 2**20:.0f} MiB")

    max_batch = max(rows for rows, _ in calls)
    max_seq_len = max(tokens for _, tokens in calls)
    impls = [impl_class(ckpt, args.device, args.dtype, max_seq_len, max_batch, args.compile)
             for impl_class in [Ours] + [{"reference": Reference, "hf": HuggingFace}[c]
                                         for c in args.compare]]
    impls += [Ours(ckpt, args.device, args.dtype, max_seq_len, max_batch, args.compile, mode,
                   args.group_size) for mode in args.quantize]
    if args.meta:
        impls.append(MetaOriginal(args.meta, ckpt, max_seq_len, max_batch))
    bandwidth = read_bandwidth() if args.bandwidth else None
    results, tokens_out = bench(impls, args.batch, args.prompt_len, args.gen_len, args.mixed,
                                args.runs, warmup_len=args.gen_len if args.compile else 2)
    report(results, tokens_out, against_ours=[i.name for i in impls
                                              if getattr(i, "against_ours", False)])
    if bandwidth:
        bandwidth = (bandwidth + read_bandwidth()) / 2  # before and after the timed turns
        print("\n".join(bandwidth_lines(impls, results, args.batch, args.prompt_len,
                                        args.gen_len, model_args, bandwidth)))


if __name__ == "__main__":
    main()
