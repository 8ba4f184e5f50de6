"""This library against llama.cpp on the same checkpoint, turn by turn in one run.

    python -m benchmarks.vs_llamacpp --ckpt ~/rs/7B --gguf ~/rs/7B-q8_0.gguf \\
        --llama-cpp ~/llama.cpp/build/bin --formats int8 default --rounds 2

Each round runs every one of our --formats (benchmarks/real_size.py's measurement in a process
of its own, without its chat: load, prefill of one --prompt-len prompt, greedy decode of
--gen-len tokens at batch 1 and 4) and then llama.cpp on every --gguf file (llama-bench for the
prefill of --prompt-len tokens and the decode of --gen-len; llama-batched-bench for --gen-len
tokens on 4 sequences after --prompt-len each), on --threads threads. Rounds alternate the
programs, so a change in the machine's load shows as a spread between rounds rather than as
a difference between programs; compare within a round.

llama.cpp is not part of this project: build it outside the repository (its CMake build, the
llama-bench and llama-batched-bench targets) and convert the checkpoint with its
convert_hf_to_gguf.py from the Hub layout this library writes (`python -m llama.convert CKPT
CKPT-hf --to hf`), e.g. `--outtype q8_0`. Prints one table per round and the command line.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import real_size


def ours(ckpt: Path, fmt: str, a) -> dict:
    """benchmarks.real_size's figures for one format, in a process of its own (no chat)."""
    options = ["--threads", str(a.threads), "--max-seq-len", str(a.prompt_len + a.gen_len),
               "--batch", "1", "4", "--prompt-len", str(a.prompt_len), "--gen-len",
               str(a.gen_len), "--turns", "0"]
    result = real_size.run_format(ckpt, fmt, options, None)
    if "not_run" in result:
        return {"error": result["not_run"]}
    return {"prefill": result["prefill_tok_s"], "b1": result["decode_tok_s"]["1"],
            "b4": result["decode_tok_s"]["4"], "load_s": result["load_s"]}


def llama_cpp(gguf: Path, a) -> dict:
    """llama-bench's prefill and decode at one sequence; llama-batched-bench's decode at 4."""
    bench = subprocess.run([str(a.llama_cpp / "llama-bench"), "-m", str(gguf), "-t",
                            str(a.threads), "-p", str(a.prompt_len), "-n", str(a.gen_len),
                            "-r", "1", "-o", "json"], capture_output=True, text=True)
    if bench.returncode != 0:
        return {"error": bench.stderr.strip().splitlines()[-1:]}
    tests = json.loads(bench.stdout)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] and not t["n_gen"])
    b1 = next(t["avg_ts"] for t in tests if t["n_gen"] and not t["n_prompt"])
    batched = subprocess.run([str(a.llama_cpp / "llama-batched-bench"), "-m", str(gguf), "-t",
                              str(a.threads), "-c", str(4 * (a.prompt_len + a.gen_len) + 64),
                              "-npp", str(a.prompt_len), "-ntg", str(a.gen_len), "-npl", "4"],
                             capture_output=True, text=True)
    b4 = None
    for line in batched.stdout.splitlines():  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0]) and cells[2] == "4":
            b4 = float(cells[7])  # S_TG t/s
    return {"prefill": prefill, "b1": b1, "b4": b4}


def row(name: str, r: dict) -> str:
    if "error" in r:
        return f"| {name} | failed: {r['error']} | | |"
    return f"| {name} | {r['prefill']:.1f} | {r['b1']:.2f} | " + (
        f"{r['b4']:.2f} |" if r["b4"] else "n/a |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint in Meta's layout")
    parser.add_argument("--gguf", type=Path, nargs="+", required=True)
    parser.add_argument("--llama-cpp", type=Path, required=True,
                        help="the folder of llama-bench and llama-batched-bench")
    parser.add_argument("--formats", nargs="+", default=["int8"],
                        choices=["default", "float32", "bf16", "int8", "int4", "w8a8", "w4a8"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args(argv)
    for tool in ("llama-bench", "llama-batched-bench"):
        if not (a.llama_cpp / tool).exists():
            parser.error(f"no {tool} in {a.llama_cpp}: build llama.cpp's {tool} target")
    real_size.native_kernels()  # built now, if not yet, rather than in a format's load time
    for number in range(1, a.rounds + 1):
        results = []
        for fmt in a.formats:
            results.append((f"ours, {fmt}", ours(a.ckpt.expanduser(), fmt, a)))
            print(row(*results[-1]), file=sys.stderr, flush=True)
        for gguf in a.gguf:
            results.append((f"llama.cpp, {gguf.name}", llama_cpp(gguf.expanduser(), a)))
            print(row(*results[-1]), file=sys.stderr, flush=True)
        print(f"\nround {number} ({a.threads} threads; prefill of {a.prompt_len} tokens, "
              f"decode of {a.gen_len})\n\n| program | prefill tok/s | decode b1 tok/s | "
              f"decode b4 tok/s |\n|---|---|---|---|")
        print("\n".join(row(name, r) for name, r in results), flush=True)
    print("\n" + " ".join(["python -m benchmarks.vs_llamacpp"] + (argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
