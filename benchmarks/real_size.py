"""Llama 2 at its real size on this machine: a random checkpoint of the model's exact shape in
Meta's layout, and every weight format measured on it, each in a process of its own.

    python -m benchmarks.real_size --write ~/rs/7B --shape 7B     # 13.5 GB; peak RSS ~13 GiB
    python -m benchmarks.real_size --run ~/rs/7B --formats float32 bf16 int8 int4 --json 7B.json
    python -m benchmarks.real_size --write /tmp/rs-S --shape S --run /tmp/rs-S   # a quick run

--write DIR --shape SHAPE writes consolidated.00.pth (Meta's tensor names, bfloat16, one shard),
params.json (as Meta writes it) and a tokenizer.model with the shape's vocabulary (a
SentencePiece model trained on Python's documentation; the rest of the vocabulary placeholder
pieces). The weights are drawn in bfloat16 tensor by tensor (no float32 copy, the state dict
held once: 7B peaks near 13 GiB) and scaled as llama/checkpoints/fixtures.py's random_weights
scales them
(norms near 1, products by 1/sqrt(fan-in), the output layer so logits spread over several
units), so activations stay within a trained model's range. Shapes: benchmarks/shapes.py's
(tiny, S, M, 7B, 13B, 70B) and 1B, Llama 3.2 1B's params.json (its output matrix apart from
the embedding, as Meta's layout holds it; its 128256 pieces through a SentencePiece tokenizer,
so Llama 2's chat format).

--run DIR --formats ... loads the checkpoint once per format through the public API, as a user
would (float32: Llama.build(dtype=torch.float32), bf16: dtype=torch.bfloat16, int8 and int4:
quantize=..., default: neither), each in a fresh process, and reports per format: load time,
peak RSS (VmHWM) after loading and over the whole run, prefill tok/s of one --prompt-len
prompt, decode tok/s (greedy, --gen-len tokens) at each --batch size, the bytes of weights one
decode step reads and the GB/s that tok/s implies against this machine's read bandwidth
(the best of x.sum() and x.amax() over 1 GiB of float32, measured just before and just after
each format, as a shared machine's rate drifts), and time to first token, turn by turn, of a
--turns chat of ~--turn-tokens user messages: chat_completion of the growing dialog (its
answers replayed: the same fixed ~--answer-tokens texts for every format), and
Llama.chat_session's turns (its own greedy answers) where the library has chat sessions. The
native CPU kernels are built first if they are not yet, so that no format's load time includes
compiling them.

A format whose estimated need (weights, KV cache, working memory) exceeds what a process may
use (MemAvailable, the cgroup's limit, --memory-limit) is not run, and its row says why; a
refusal by Llama.build (its memory check, where the library has one: the default format's
weights are then left to it) is reported with its message.

Prints a markdown table (one row per format), the turns' times and the command line; --json
FILE writes the figures too. Numbers from a shared machine are noisy: compare formats within a
run, and run again before trusting a difference of a few percent.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from benchmarks.bench import cpu_description
from benchmarks.real_size_measure import chat_length, measure_format, peak_rss
from benchmarks.shapes import SHAPES as BENCH_SHAPES
from llama.args import ModelArgs, count_parameters
from llama.checkpoints.fixtures import train_tokenizer
from llama.checkpoints.memory import weight_bytes
from llama.checkpoints.meta import IGNORED_KEYS, full_shapes
from llama.checkpoints.saving import params_json
from llama.layers.cache import KVCache
from llama.model import precompute_freqs_cis

REPO = Path(__file__).resolve().parent.parent

SHAPES = {**BENCH_SHAPES,
          # Llama 3.2 1B's params.json
          "1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8,
                 "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5,
                 "rope_theta": 500000.0, "use_scaled_rope": True}}
VOCABS = {"1B": 128256}  # the others: Llama 2's 32000
TRAINED_PIECES = 1000  # the tokenizer's real pieces; the rest are placeholders
FORMATS = {  # Llama.build's arguments per format
    "default": {},  # what a user gets who names no format
    "float32": {"dtype": torch.float32},
    "bf16": {"dtype": torch.bfloat16},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "w8a8": {"quantize": "int8", "activations": "int8"},  # int8 activations too (opt-in)
    "w4a8": {"quantize": "int4", "activations": "int8"},
}
GIB = 1024 ** 3
WORKING = GIB  # what a process holds beyond weights and cache: torch, activations, temporaries


# ---------------------------------------------------------------------- writing
def shape_args(shape: str) -> ModelArgs:
    return ModelArgs(vocab_size=VOCABS.get(shape, 32000), **SHAPES[shape])


def random_state(args: ModelArgs, seed: int):
    """The checkpoint's tensors, drawn in bfloat16 one at a time (no float32 copy)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in full_shapes(args).items():
        tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(generator=generator)
        if name.endswith("norm.weight"):
            tensor.mul_(0.1).add_(1.0)
        else:  # as fixtures.random_weights: 1/sqrt(fan-in), the output layer 4x
            tensor.mul_((4.0 if name == "output.weight" else 1.0) / shape[1] ** 0.5)
        state[name] = tensor
    freqs = precompute_freqs_cis(args.head_dim, 2, args.rope_theta,
                                 scaling=args.rope_scaling).angle()[1]  # position 1
    state[IGNORED_KEYS[0]] = freqs.to(torch.bfloat16)
    return state


def write(out: Path, shape: str, seed: int) -> None:
    args = shape_args(shape)
    params = params_json(args)
    shard = out / "consolidated.00.pth"
    if (out / "params.json").exists():
        found = json.loads((out / "params.json").read_text())
        if found != params:
            raise SystemExit(f"{out} holds another checkpoint ({found}); give an empty or new "
                             f"directory for {shape}")
        if shard.exists() and (out / "tokenizer.model").exists():
            print(f"{out} already holds the {shape} checkpoint; not written again",
                  file=sys.stderr)
            return
    size = 2 * count_parameters(args)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < size * 1.02:
        raise SystemExit(f"writing {shape} needs {size / 1e9:.1f} GB of disk in {out}; "
                         f"{free / 1e9:.1f} GB are free")
    available, source = memory_available()
    if size + WORKING > available:
        raise SystemExit(f"writing {shape} holds its {size / GIB:.1f} GiB of bfloat16 weights "
                         f"at once, plus ~1 GiB; {available / GIB:.1f} GiB are available "
                         f"({source})")
    start = time.time()
    vocab = args.vocab_size
    train_tokenizer(out / "tokenizer.model", vocab, extra_pieces=vocab - TRAINED_PIECES)
    print(f"writing a random {shape} checkpoint ({count_parameters(args) / 1e9:.2f} B "
          f"parameters, {size / 1e9:.1f} GB of bfloat16) to {out} ...", file=sys.stderr)
    state = random_state(args, seed)
    drawn = time.time() - start
    part = shard.with_name(shard.name + ".part")  # not *.pth until whole
    torch.save(state, part)
    del state
    part.rename(shard)
    (out / "params.json").write_text(json.dumps(params))
    print(f"written in {time.time() - start:.0f} s ({drawn:.0f} s drawing); peak RSS "
          f"{peak_rss() / GIB:.2f} GiB", file=sys.stderr)


# ---------------------------------------------------------------------- memory
def memory_available(limit_gib=None):
    """(bytes a new process may use, where the figure comes from): the least of MemAvailable,
    the cgroup's remaining limit and `limit_gib`."""
    found = []
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    group = Path("/sys/fs/cgroup")
    try:
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            used = int((group / "memory.current").read_text())
            found.append((int(limit) - used, "the cgroup's limit"))
    except (OSError, ValueError):
        pass
    if limit_gib is not None:
        found.append((int(limit_gib * GIB), "--memory-limit"))
    return min(found) if found else (1 << 62, "unknown")


def memory_need(args: ModelArgs, fmt: str, cache_tokens: int):
    """(bytes, how they add up) a format's process will hold: its weights (embedding and norms
    in float32 beside quantized products: the most the CPU's default can take), the KV cache
    it allocates in float32, and working memory (1 GiB, or a tenth of the weights for loading
    temporaries when more). The default format counts as float32 weights, the CPU's default
    where Llama.build does not decide memory itself."""
    mode = FORMATS[fmt].get("quantize")
    dtype = FORMATS[fmt].get("dtype", torch.float32)
    weights = weight_bytes(args, mode, dtype=dtype)
    cache = KVCache.bytes_per_token(args, torch.float32) * cache_tokens
    working = max(WORKING, weights // 10)
    total = weights + cache + working
    return total, (f"~{total / GIB:.1f} GiB (weights {weights / GIB:.1f}, KV cache "
                   f"{cache / GIB:.1f}, working {working / GIB:.1f})")


def library_checks_memory() -> bool:
    """Whether Llama.build refuses a model that will not fit before loading it (then the
    default format, whose weights' dtype the library chooses, is left to it)."""
    return importlib.util.find_spec("llama.checkpoints.memory_fit") is not None


# ---------------------------------------------------------------------- bandwidth
def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s: the best pass of x.sum() or x.amax() over `gib` GiB of float32 (torch's
    reductions stream memory on this process's threads; a lower bound of what it gives)."""
    x = torch.ones(int(gib * GIB) // 4)
    best = float("inf")
    for reduce in (torch.sum, torch.amax):
        reduce(x)
        for _ in range(repeats):
            start = time.perf_counter()
            reduce(x)
            best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def native_kernels() -> str:
    """The native CPU kernels' instruction set, or why they are unavailable."""
    from llama.kernels import cpu_kernels

    return cpu_kernels.isa() or f"unavailable ({cpu_kernels.unavailable_reason()})"


# ---------------------------------------------------------------------- one format
def run_format(ckpt: Path, fmt: str, options, limit_gib) -> dict:
    """Run `fmt` in a child process (this script with --child); its figures, or why not."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "benchmarks.real_size", "--run", str(ckpt), "--child",
                   fmt, "--result",
                   str(result)] + options
        env = dict(os.environ)
        if limit_gib is not None:  # Llama.build's memory check reads it, where it has one
            env["LLAMA_MEMORY_LIMIT"] = f"{limit_gib}GiB"
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        tail = deque(maxlen=8)
        for line in child.stdout:  # shown as it comes: a 7B run takes minutes
            sys.stderr.write(f"  [{fmt}] {line}")
            tail.append(line.rstrip())
        code = child.wait()
        if code == 0 and result.exists():
            return json.loads(result.read_text())
    if code < 0:
        why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    else:
        why = f"failed (exit {code}): {tail[-1] if tail else 'no output'}"
    return {"format": fmt, "not_run": why}


# ---------------------------------------------------------------------- the report
def table(results, bandwidth: float, batches) -> str:
    """One row per format; its read rates as a share of the read bandwidth measured around
    it (`bandwidth` where a row has none)."""
    head = (["format", "weights", "load (s)", "peak RSS, loaded / run (GiB)", "prefill tok/s"]
            + [f"decode b{b} tok/s" for b in batches]
            + ["weights read per step (GB)", "read bandwidth before / after it (GB/s)"]
            + [f"b{b} reads GB/s (share of the higher)" for b in batches]
            + ["TTFT turn 1 -> last (s): chat_completion", "chat_session"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "not_run" in r:
            cells = [r["format"], "not run: " + r["not_run"]] + [""] * (len(head) - 2)
        else:
            rates = [r["decode_tok_s"][str(b)] for b in batches]
            kind = r["weight_dtype"]
            measured = r.get("read_bandwidth_before_after", [bandwidth])
            around = max(measured)
            if r["format"] in ("int8", "int4", "w8a8", "w4a8"):
                kind = f"{r['format']}, {kind} embedding"
            cells = ([r["format"], kind, f"{r['load_s']:.1f}",
                      f"{r['peak_rss_load'] / GIB:.2f} / {r['peak_rss'] / GIB:.2f}",
                      f"{r['prefill_tok_s']:.1f}"]
                     + [f"{t:.2f}" if t else "n/a" for t in rates]
                     + [f"{r['weights_per_step'] / 1e9:.3g}",
                        " / ".join(f"{b / 1e9:.1f}" for b in measured)]
                     + [f"{g / 1e9:.3g} ({g / around:.0%})" if g else "n/a"
                        for g in (read_rate(r, b, t) if t else None
                                  for b, t in zip(batches, rates))]
                     + [first_to_last(r.get("chat_completion")),
                        first_to_last(r.get("chat_session"))])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_rate(r, bsz: int, tok_s: float) -> float:
    """Bytes/s a decode rate implies: per token, the step's weights shared by the batch's
    rows, and the row's KV cache up to its average position."""
    context = r["prompt_len"] + r["gen_len"] / 2
    return tok_s * (r["weights_per_step"] / bsz + r["kv_per_token"] * context)


def first_to_last(turns) -> str:
    if turns is None:
        return "(not measured)"
    ttft = turns["ttft_s"]
    return f"{ttft[0]:.2f} -> {ttft[-1]:.2f} (x{ttft[-1] / ttft[0]:.2f})"


def turn_lines(results) -> str:
    """Each format's turns: time to first token, the prompt's tokens (and how many of them a
    session prefilled)."""
    lines = []
    for r in results:
        for way in ("chat_completion", "chat_session"):
            turns = r.get(way)
            if turns:
                prefilled = turns.get("prefilled_tokens") or [None] * len(turns["ttft_s"])
                lines.append(f"{r['format']:>7} {way:>15}: " + ", ".join(
                    f"{t:.2f} s ({n} tokens" + (f", {p} prefilled)" if p is not None else ")")
                    for t, n, p in zip(turns["ttft_s"], turns["prompt_tokens"], prefilled)))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, metavar="DIR", help="write a checkpoint here")
    parser.add_argument("--shape", choices=list(SHAPES), help="--write's shape")
    parser.add_argument("--seed", type=int, default=0, help="--write's random numbers")
    parser.add_argument("--run", type=Path, metavar="DIR", help="measure this checkpoint")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS),
                        default=["float32", "bf16", "int8", "int4"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64, help="greedy tokens per decode")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--turn-tokens", type=int, default=150, help="a user message's")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1,
                        help="prefill and decode: the median of this many")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--native-kernels", action="store_true",
                        help="model.use_native_kernels() after building, as the server does")
    parser.add_argument("--memory-limit", type=float, metavar="GIB",
                        help="use at most this much (passed on as LLAMA_MEMORY_LIMIT too)")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0,
                        help="the buffer the read bandwidth is measured on")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument("--child", choices=list(FORMATS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-seq-len", type=int, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.child:  # one format, in the process run_format started
        figures = measure_format(a.run, a.child, FORMATS[a.child], a,
                                 say=lambda line: print(line, flush=True))
        a.result.write_text(json.dumps(figures))
        return 0
    if not a.write and not a.run:
        parser.error("give --write DIR --shape SHAPE, --run DIR, or both")
    if a.write and not a.shape:
        parser.error("--write needs --shape (" + ", ".join(SHAPES) + ")")
    if min(a.batch + [a.prompt_len, a.turn_tokens, a.answer_tokens, a.runs,
                      a.threads]) < 1 or a.gen_len < 2 or a.bandwidth_gib <= 0 or a.turns < 0:
        parser.error("--batch, --prompt-len, --turn-tokens, --answer-tokens, --runs "
                     "and --threads must be at least 1, --turns at least 0 (no chat), --gen-len "
                     "at least 2, --bandwidth-gib above 0")
    if a.write:
        write(a.write, a.shape, a.seed)
    if a.run:
        measure(a, argv if argv is not None else sys.argv[1:])
    return 0


def measure(a, argv) -> None:
    """Every format in turn, each in its own process, and the report."""
    from llama.checkpoints.meta import model_args
    from llama.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(a.run / "tokenizer.model"))
    a.max_seq_len = max(a.prompt_len + a.gen_len,
                        chat_length(tokenizer, a.turns, a.turn_tokens, a.answer_tokens))
    args = model_args(a.run, a.max_seq_len, max(a.batch), tokenizer.n_words)
    torch.set_num_threads(a.threads)
    options = ["--threads", str(a.threads), "--max-seq-len", str(a.max_seq_len), "--batch",
               *map(str, a.batch)]
    for name in ("prompt_len", "gen_len", "turns", "turn_tokens", "answer_tokens", "runs"):
        options += ["--" + name.replace("_", "-"), str(getattr(a, name))]
    options += ["--native-kernels"] if a.native_kernels else []
    kernels = native_kernels()  # built now, if not yet, rather than in a format's load time
    bandwidth = read_bandwidth(a.bandwidth_gib)  # the run's best, for the header
    # the generation cache grows to the largest batch's rows; then a chat's one row
    cache_tokens = max(max(a.batch) * (a.prompt_len + a.gen_len), a.max_seq_len)
    results = []
    for fmt in a.formats:
        need, parts = memory_need(args, fmt, cache_tokens)
        available, source = memory_available(a.memory_limit)
        if need > available and not (fmt == "default" and library_checks_memory()):
            results.append({"format": fmt, "not_run": f"needs {parts}; "
                            f"{available / GIB:.1f} GiB available ({source})"})
        else:
            # The machine's read rate drifts over a long run (a shared host's memory): each
            # format's rates are set against the best of a measure just before and just after it.
            before = read_bandwidth(a.bandwidth_gib)
            results.append(run_format(a.run, fmt, options, a.memory_limit))
            after = read_bandwidth(a.bandwidth_gib)
            results[-1].update(read_bandwidth=max(before, after),
                               read_bandwidth_before_after=[before, after])
            bandwidth = max(bandwidth, before, after)
        print(f"{fmt}: {'not run' if 'not_run' in results[-1] else 'done'}", file=sys.stderr)
    size = count_parameters(args)
    params = json.loads((a.run / "params.json").read_text())
    print(f"{a.run}: {size / 1e9:.3g} B parameters, params.json {json.dumps(params)}, "
          f"vocabulary {args.vocab_size}; torch {torch.__version__}, {a.threads} threads; "
          f"{cpu_description()}; native kernels: {kernels}")
    print(f"prompt {a.prompt_len} tokens, {a.gen_len} greedy tokens per decode, batch "
          f"{' and '.join(map(str, a.batch))}; a chat of {a.turns} turns (~{a.turn_tokens}-token "
          f"messages, ~{a.answer_tokens}-token answers); max_seq_len {a.max_seq_len}; read "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s at best (x.sum(), x.amax() over "
          f"{a.bandwidth_gib:g} GiB, before and after each format)\n")
    print(table(results, bandwidth, a.batch))
    print("\ntime to first token by turn:\n" + turn_lines(results))
    command = "python -m benchmarks.real_size " + " ".join(argv)
    print(f"\n{command}")
    if a.json:
        a.json.write_text(json.dumps({"command": command, "cpu": cpu_description(),
                                      "torch": torch.__version__, "threads": a.threads,
                                      "read_bandwidth": bandwidth, "parameters": size,
                                      "params": params, "max_seq_len": a.max_seq_len,
                                      "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
