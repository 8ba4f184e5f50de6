"""The same weight formats on two or more checkouts of this library, in turns, in one run: how
much faster (or slower) one commit is than another, measured on one machine at one time.

    git worktree add /tmp/before 090c443
    python -m benchmarks.trees --ckpt ~/rs/7B --trees /tmp/before . --formats int8 w8a8

Every tree and format runs in a process of its own, whose `llama` package is that tree's
(the child runs this file with the tree first on its path), through Meta's public API only:
`Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device="cpu",
verbose=False, **the format's arguments)` and `generate`. So any commit whose build takes the
format's arguments can be measured; one that refuses them (an argument it did not have yet)
is reported as such. Per process: the load time, its peak resident memory, the prefill of one
--prompt-len prompt of random tokens (`generate(..., max_gen_len=1)`, median of --runs), and
the one-row decode (`generate` of --gen-len tokens less the same prompt's first-token call,
median of --runs). Rounds go through every tree and format in turn, so a change in the
machine's load shows as a spread between rounds; each round's table gives every row's prefill
and decode over the first row's (the first tree's first format).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------- the child
def child(spec: dict) -> dict:
    """Runs in the tree's process: its figures for one format (or why it could not run)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import llama
    from llama import Llama

    out = {"llama": str(Path(llama.__file__).resolve().parent)}
    build = dict(spec["build"])
    if "dtype" in build:
        build["dtype"] = getattr(torch, build["dtype"])
    ckpt = Path(spec["ckpt"])
    began = time.perf_counter()
    try:
        model = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), spec["max_seq_len"], 1,
                            device="cpu", verbose=False, **build)
    except (TypeError, ValueError, RuntimeError, MemoryError) as error:
        return {**out, "error": f"Llama.build refused: {type(error).__name__}: {error}"}
    out["load_s"] = time.perf_counter() - began
    vocab = model.tokenizer.n_words
    generator = torch.Generator().manual_seed(0)
    prompt = [torch.randint(3, vocab, (spec["prompt_len"],), generator=generator).tolist()]

    def timed(gen_len: int):
        began = time.perf_counter()
        tokens, _ = model.generate(prompt, gen_len, temperature=0)
        return time.perf_counter() - began, len(tokens[0])

    timed(2)  # warm-up: the first call sets up the kernels and the KV cache
    prefill, decode = [], []
    for _ in range(spec["runs"]):
        before, _ = timed(1)
        whole, made = timed(spec["gen_len"])
        after, _ = timed(1)
        first = min(before, after)  # a busy spell only lengthens a call
        prefill.append(first)
        if made > 1 and whole > first:  # a row that met EOS counts what it made
            decode.append((made - 1) / (whole - first))
    out["prefill_tok_s"] = spec["prompt_len"] / statistics.median(prefill)
    out["decode_tok_s"] = statistics.median(decode) if decode else None
    # the process's peak resident memory (Linux and macOS give ru_maxrss in KiB and bytes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_rss_gib"] = peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)
    return out


def run_child(tree: Path, spec: dict) -> dict:
    """One tree and format in a process of its own, `llama` imported from `tree`."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(tree)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        done = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec),
                               "--result", str(result)], cwd=tree, env=env,
                              capture_output=True, text=True)
        if done.returncode == 0 and result.exists():
            return json.loads(result.read_text())
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {done.returncode}: {tail[0]}"}


# ---------------------------------------------------------------------- the parent
def label(tree: Path) -> str:
    """The tree's commit (and + where it has uncommitted changes), else its path."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode != 0:
        return str(tree)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "llama"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+" if dirty else "")


def figure(value, base) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" + (f" ({value / base:.2f}x)" if base else "")


def round_table(rows) -> str:
    """rows: (tree label, format, figures); ratios against the first row's."""
    first = rows[0][2]
    lines = ["| tree | format | load (s) | peak RSS (GiB) | prefill tok/s (over the first row) "
             "| decode b1 tok/s (over the first row) |", "|---|---|---|---|---|---|"]
    for tree, fmt, r in rows:
        if "error" in r:
            lines.append(f"| {tree} | {fmt} | {r['error']} | | | |")
            continue
        lines.append(f"| {tree} | {fmt} | {r['load_s']:.1f} | {r['peak_rss_gib']:.2f} | "
                     f"{figure(r['prefill_tok_s'], first.get('prefill_tok_s'))} | "
                     f"{figure(r['decode_tok_s'], first.get('decode_tok_s'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trees",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help="a checkpoint in Meta's layout with its "
                        "tokenizer.model (benchmarks/real_size.py --write)")
    parser.add_argument("--trees", type=Path, nargs="+", help="checkouts of this repository "
                        "(git worktree add DIR COMMIT); the first row of each round is the "
                        "first tree's first format")
    parser.add_argument("--formats", nargs="+", default=["int8"],
                        help="benchmarks/real_size.py's formats (int8, w8a8, bf16, ...)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args(argv)
    if a.child:  # in the tree's process
        a.result.write_text(json.dumps(child(json.loads(a.child))))
        return 0
    if not a.ckpt or not a.trees:
        parser.error("--ckpt and --trees are needed")
    from benchmarks.real_size import FORMATS  # the parent runs in this repository

    unknown = [f for f in a.formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; choose from {sorted(FORMATS)}")
    ckpt = a.ckpt.expanduser().resolve()
    trees = [t.expanduser().resolve() for t in a.trees]
    for tree in trees:
        if not (tree / "llama" / "__init__.py").exists():
            parser.error(f"{tree} holds no llama package: give checkouts of this repository")
    names = [label(t) for t in trees]
    print(f"{ckpt}: {a.prompt_len}-token prefill, {a.gen_len}-token one-row decode, "
          f"median of {a.runs}; {a.threads} threads; trees " +
          ", ".join(f"{n} ({t})" for n, t in zip(names, trees)), flush=True)
    for round_ in range(1, a.rounds + 1):
        rows = []
        for tree, name in zip(trees, names):
            for fmt in a.formats:
                build = {k: str(v).replace("torch.", "") if k == "dtype" else v
                         for k, v in FORMATS[fmt].items()}
                spec = {"ckpt": str(ckpt), "build": build, "threads": a.threads,
                        "max_seq_len": a.prompt_len + a.gen_len, "prompt_len": a.prompt_len,
                        "gen_len": a.gen_len, "runs": a.runs}
                result = run_child(tree, spec)
                if "error" not in result and Path(result["llama"]) != tree / "llama":
                    result = {"error": f"imported llama from {result['llama']}"}
                rows.append((name, fmt, result))
                print(f"  round {round_}: {name} {fmt} done", file=sys.stderr, flush=True)
        print(f"\nround {round_}\n\n{round_table(rows)}", flush=True)
    print("\npython -m benchmarks.trees --ckpt", a.ckpt, "--trees", *a.trees, "--formats",
          *a.formats, "--rounds", a.rounds, "--runs", a.runs, "--prompt-len", a.prompt_len,
          "--gen-len", a.gen_len, "--threads", a.threads)
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:  # run as a file: its folder must not stand before the tree
        sys.path.pop(0)
    raise SystemExit(main())
