"""The server under concurrent streaming clients, against the library one request at a time.

    python -m benchmarks.serve_bench --shape S               # clients 1 4 8 16, 48 requests
    python -m benchmarks.serve_bench --quick                 # a smoke run on the tiny shape

Builds (once, under bench_out/) a random-weight checkpoint of the shape in Meta's layout with
bench.py's helpers, and a 32000-token SentencePiece tokenizer trained on text that ships with
Python. A fixed, seeded mix of requests (prompt lengths x answer lengths, temperature 0) is
served twice in the same run:
- one at a time through the library in this process (`Llama.generate`, the same max_gen_len):
  aggregate tok/s, and each request's prefill (time to its first token) alone;
- by `python -m llama.server` on 127.0.0.1, for each client count N: N asyncio clients stream
  `/v1/completions`, each sending its next request as soon as the previous one ended. Client
  i starts i/N of a mean one-at-a-time request later (--ramp), so arrivals are spread as in a
  steady state rather than all at once.
Per N: aggregate generated tok/s (tokens from each stream's usage chunk, over the wall time
from the first request sent to the last answer), time to first token (first chunk with text)
and inter-token latency (gaps between a stream's chunks with text) p50/p95, whether every
answer equals the library's, and the server's peak RSS. Then the targets' pass/fail.
"""

import argparse
import asyncio
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import List, Tuple

import torch

from benchmarks.serve_clients import (
    ANSWER_LENS,
    PROMPT_LENS,
    REPO,
    Answer,
    Ask,
    expected_answer,
    request_mix,
    rss_bytes,
    run_clients,
    same_answer,
    scheduled_completion,
    start_run,
    stream_completion,
)
from benchmarks.shapes import SHAPES, VOCAB


# ---------------------------------------------------------------------- the library alone
def library_one_at_a_time(llama, asks: List[Ask]):
    """Each request alone through the library: its prefill (a one-token generation) and its
    whole generation, timed; and the answers (tokens, text, finish reason)."""
    llama.generate([asks[0].tokens], 2, temperature=0)  # warm-up
    prefill, whole, answers = [], [], []
    for ask in asks:
        start = time.perf_counter()
        llama.generate([ask.tokens], 1, temperature=0)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        tokens = llama.generate([ask.tokens], ask.max_tokens, temperature=0)[0][0]
        whole.append(time.perf_counter() - start)
        answers.append(expected_answer(llama.tokenizer, ask, tokens))
    return prefill, whole, answers


class EngineClock:
    """Time spent in an engine's prefills alone (add, with --prefill-chunk 0) and in the model
    runs of its steps (advance), those carrying prompt chunks counted apart, by wrapping the
    instance's methods: where a scheduler's wall time goes."""

    def __init__(self, engine):
        self.reset()
        add, advance = engine.add, engine.advance

        def timed_add(seq):
            start = time.perf_counter()
            try:
                return add(seq)
            finally:
                if not engine.prefill_chunk:
                    self.figures["prefill s"] += time.perf_counter() - start
                    self.figures["prefills"] += 1

        def timed_advance():
            rows = sum(seq.decoding for seq in engine.sequences)
            kind = "mixed" if engine.prefilling else "step"
            start = time.perf_counter()
            try:
                return advance()
            finally:
                self.figures[f"{kind} s"] += time.perf_counter() - start
                self.figures[f"{kind}s"] += 1
                self.figures[f"{kind} rows"] += rows

        engine.add, engine.advance = timed_add, timed_advance

    def reset(self) -> None:
        self.figures = dict.fromkeys(("prefill s", "prefills", "step s", "steps", "step rows",
                                      "mixed s", "mixeds", "mixed rows"), 0)


def clock_line(label: str, f: dict) -> str:
    def steps(kind):
        n = max(f[f"{kind}s"], 1)
        return (f"{f[f'{kind} s']:.1f} s ({f[f'{kind}s']:.0f} steps of {f[f'{kind} rows'] / n:.1f} "
                f"decode rows on average, {f[f'{kind} s'] / n * 1e3:.1f} ms each)")

    busy = f["prefill s"] + f["step s"] + f["mixed s"]
    return (f"{label}: of {f['wall']:.1f} s, prefills alone {f['prefill s']:.1f} s "
            f"({f['prefills']:.0f}), decode steps {steps('step')}, steps with prompt chunks "
            f"{steps('mixed')}, the rest {f['wall'] - busy:.1f} s")


# ---------------------------------------------------------------------- figures
def percentile(values: List[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    values = sorted(values)
    at = (len(values) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (at - low)


def served_figures(answers: List[Answer], wall: float, expected, peak_rss: int,
                   library_rate: float) -> dict:
    """Figures of one client count; `library_rate`: the library's one-at-a-time tok/s around
    that time (the ratio's denominator)."""
    tokens = sum(a.completion_tokens or 0 for a in answers)
    ttft = [a.ttft for a in answers if a.ttft is not None]
    gaps = [g for a in answers for g in a.gaps]
    return {"tok/s": tokens / wall, "ratio": tokens / wall / library_rate, "tokens": tokens,
            "wall": wall, "ttft p50": percentile(ttft, 50), "ttft p95": percentile(ttft, 95),
            "itl p50": percentile(gaps, 50) if gaps else 0.0,
            "itl p95": percentile(gaps, 95) if gaps else 0.0,
            "chunks": sum(len(a.times) for a in answers),
            "same": sum(same_answer(a, e) for a, e in zip(answers, expected)),
            "peak rss": peak_rss}


def library_figures(passes, expected) -> dict:
    """The library's one-at-a-time figures over its timed passes [(prefill, whole)] of the
    probe requests (the first of `expected`): tok/s of each pass, and of all."""
    tokens = sum(count for _, _, count in expected[: len(passes[0][1])])
    rates = [tokens / sum(whole) for _, whole in passes]
    prefill = [p for pass_prefill, _ in passes for p in pass_prefill]
    decode = [(w - p) / (n - 1) for pass_prefill, whole in passes
              for p, w, (_, _, n) in zip(pass_prefill, whole, expected) if n > 1]
    return {"tok/s": len(passes) * tokens / sum(sum(whole) for _, whole in passes),
            "lowest": min(rates), "highest": max(rates), "passes": len(passes),
            "prefill mean": statistics.mean(prefill), "prefill p50": percentile(prefill, 50),
            "prefill p95": percentile(prefill, 95), "decode per token": statistics.mean(decode)}


def print_table(base: dict, rows, requests: int) -> None:
    """rows: (label, figures) pairs."""
    print(f"\none at a time, library: {base['tok/s']:.1f} tok/s (its {base['passes']:.0f} passes "
          f"over the probe requests: {base['lowest']:.1f} to {base['highest']:.1f}); prefill "
          f"mean {base['prefill mean'] * 1e3:.0f} ms (p50 {base['prefill p50'] * 1e3:.0f}, "
          f"p95 {base['prefill p95'] * 1e3:.0f}); decode {base['decode per token'] * 1e3:.1f} "
          f"ms/token")
    print("| clients | tok/s | x one at a time | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | "
          "tokens/chunk | same answers | server peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, f in rows:
        rss = f"{f['peak rss'] / 2**20:.0f} MiB" if f["peak rss"] else "-"
        print(f"| {label} | {f['tok/s']:.1f} | {f['ratio']:.2f}x | "
              f"{f['ttft p50'] * 1e3:.0f} ms | {f['ttft p95'] * 1e3:.0f} ms | "
              f"{f['itl p50'] * 1e3:.0f} ms | {f['itl p95'] * 1e3:.0f} ms | "
              f"{f['tokens'] / max(f['chunks'], 1):.2f} | {f['same']}/{requests} | {rss} |")


def table_rows(served: dict, direct: dict):
    return ([(str(n), f) for n, f in served.items()] +
            [(f"{n}, no HTTP", f) for n, f in direct.items()])


def targets(base: dict, served: dict) -> List[Tuple[str, bool]]:
    """The issue's targets: (what was measured against what, whether it is met)."""
    if 8 not in served or 1 not in served:
        return []
    ratio = served[8]["ratio"]
    bound = 2 * served[1]["ttft p95"] + base["prefill mean"]
    ttft = served[8]["ttft p95"]
    return [(f"8 clients: {ratio:.2f}x the one-at-a-time tok/s (target >= 3x)", ratio >= 3),
            (f"8 clients: TTFT p95 {ttft * 1e3:.0f} ms; 2 x the single-client p95 "
             f"({served[1]['ttft p95'] * 1e3:.0f} ms) + one prefill (mean "
             f"{base['prefill mean'] * 1e3:.0f} ms) = {bound * 1e3:.0f} ms", ttft <= bound)]


def median_figures(runs: List[dict]) -> dict:
    """Each figure's median over the runs (a ratio: the median of the runs' ratios); answers
    that equal the library's: the fewest of any run."""
    return {key: (min if key == "same" else statistics.median)(run[key] for run in runs)
            for key in runs[0]}


# ---------------------------------------------------------------------- the program
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="S", choices=sorted(SHAPES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=48,
                        help="requests per client count (the same ones each time)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="the server's --max_batch_size (default: the most clients)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole comparison; medians at the end")
    parser.add_argument("--ramp", type=float, default=None,
                        help="seconds over which the clients start (default: the mean "
                             "one-at-a-time request time; 0: all at once)")
    parser.add_argument("--no-http", action="store_true",
                        help="also serve the clients through a Scheduler in this process "
                             "(the server's engine loop without HTTP; its thread steps a "
                             "model this process's main thread loaded, which costs ~20%% "
                             "a step: README, Throughput with concurrent clients)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="the server's --prefill_chunk (default: its default); 0: each "
                             "prompt prefilled alone as it joins")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, here and in the server")
    parser.add_argument("--root", type=Path, default=REPO / "bench_out",
                        help="where the checkpoint and tokenizer are kept")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny shape, 1 and 2 clients, 6 short requests")
    args = parser.parse_args(argv)
    args.prompt_lens, args.answer_lens = PROMPT_LENS, ANSWER_LENS
    if args.quick:
        args.shape, args.clients, args.requests = "tiny", [1, 2], 6
        args.prompt_lens, args.answer_lens = (8, 16), (4, 8)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt, tokenizer_path, llama, asks = start_run(args, args.prompt_lens, args.answer_lens)
    from llama.engine.core import Engine
    from llama.model import ModelArgs, count_parameters
    from llama.server.app import PREFILL_CHUNK
    from llama.server.scheduler import Scheduler
    from tests.server_fixtures import running_server

    max_seq_len = -(-(max(len(a.tokens) + a.max_tokens for a in asks)) // 64) * 64
    batch = args.max_batch_size or max(args.clients)
    params = count_parameters(ModelArgs(vocab_size=VOCAB, **SHAPES[args.shape]))
    print(f"shape {args.shape} ({params / 1e6:.0f} M parameters), torch {torch.__version__}, "
          f"{args.threads} threads; {len(asks)} requests: prompts "
          f"{'/'.join(map(str, args.prompt_lens))} tokens x answers "
          f"{'/'.join(map(str, args.answer_lens))} tokens, temperature 0; server "
          f"--max_batch_size {batch} --max_seq_len {max_seq_len}")
    chunk = PREFILL_CHUNK if args.prefill_chunk is None else args.prefill_chunk
    print(f"--prefill_chunk {chunk}")
    server_args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer_path),
                   "--max_batch_size", str(batch), "--max_seq_len", str(max_seq_len),
                   "--prefill_chunk", str(chunk)]
    runs = []  # (library's figures, server's figures, no-HTTP figures) per run
    probe = min(len(args.prompt_lens) * len(args.answer_lens), len(asks))  # one of each pair
    with running_server(*server_args, env={"OMP_NUM_THREADS": str(args.threads)}) as url:
        pid = url.process.pid
        send = functools.partial(stream_completion, int(url.rsplit(":", 1)[1]))
        direct_send = None
        if args.no_http:
            engine = Engine(llama.model, llama.tokenizer.eos_id,
                            llama.model.new_cache(batch, max_seq_len), release_finished=True,
                            prefill_chunk=chunk)
            clock = EngineClock(engine)
            scheduler = Scheduler(engine, llama.tokenizer)
            scheduler.start()
            direct_send = functools.partial(scheduled_completion, scheduler)
        warm = request_mix(llama.tokenizer, max(args.clients), args.seed + 1, (16,), (4,))
        for warm_send in filter(None, (send, direct_send)):
            asyncio.run(run_clients(warm_send, warm, max(args.clients), 0.0))
        for run in range(args.runs):
            print(f"\nrun {run + 1}/{args.runs}: load average {os.getloadavg()[0]:.2f}, "
                  f"server idle RSS {rss_bytes(pid) / 2**20:.0f} MiB", flush=True)
            # The library goes first, over every request (the expected answers); then, after
            # each client count, over the probe requests again: the machine is shared, and each
            # count's ratio is against the library's passes just before and after it.
            prefill, whole, expected = library_one_at_a_time(llama, asks)
            passes = [(prefill[:probe], whole[:probe])]
            ramp = statistics.mean(whole) if args.ramp is None else args.ramp
            served, direct = {}, {}
            for clients in args.clients:
                answers, wall, peak = asyncio.run(run_clients(send, asks, clients, ramp, pid))
                outcome = [(served, answers, wall, peak, None)]
                if direct_send:
                    clock.reset()
                    answers, wall, _ = asyncio.run(run_clients(direct_send, asks, clients, ramp))
                    outcome.append((direct, answers, wall, 0, dict(clock.figures)))
                again, whole_again, expected_again = library_one_at_a_time(llama, asks[:probe])
                if expected_again != expected[:probe]:
                    print("warning: the library's answers changed from one pass to the next")
                passes.append((again, whole_again))
                rate = library_figures(passes[-2:], expected)["tok/s"]
                for table, answers, wall, peak, extra in outcome:
                    table[clients] = {**served_figures(answers, wall, expected, peak, rate),
                                      **(extra or {})}
                print(f"  {clients} clients: {served[clients]['tok/s']:.1f} tok/s, library "
                      f"around it {rate:.1f} tok/s", flush=True)
            base = library_figures(passes, expected)
            print_table(base, table_rows(served, direct), len(asks))
            for clients, figures in direct.items():
                print(clock_line(f"{clients} clients, no HTTP", figures))
            print(f"(clients started over {ramp:.2f} s; load average after the run "
                  f"{os.getloadavg()[0]:.2f})")
            for line, met in targets(base, served):
                print(f"{line}: {'PASS' if met else 'FAIL'}")
            runs.append((base, served, direct))
        if direct_send:
            scheduler.stop()
    if args.runs > 1:
        base = median_figures([b for b, _, _ in runs])
        served = {n: median_figures([s[n] for _, s, _ in runs]) for n in runs[0][1]}
        direct = {n: median_figures([d[n] for _, _, d in runs]) for n in runs[0][2]}
        print(f"\nmedians of {args.runs} runs (a ratio: the median of the runs' ratios)")
        print_table(base, table_rows(served, direct), len(asks))
        for clients, figures in direct.items():
            print(clock_line(f"{clients} clients, no HTTP", figures))
        met_in = [sum(t[i][1] for t in (targets(b, s) for b, s, _ in runs))
                  for i in range(len(targets(base, served)))]
        for (line, met), count in zip(targets(base, served), met_in):
            print(f"{line}: {'PASS' if met else 'FAIL'} (met in {count} of {args.runs} runs)")
    return 0 if all(f["same"] == len(asks) for _, served, direct in runs
                    for f in list(served.values()) + list(direct.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
