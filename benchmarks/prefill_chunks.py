"""Prefill alone or in chunks riding with the decode rows, compared turn by turn.

    python -m benchmarks.prefill_chunks --shape S --chunks 0 64 256 --reps 3

serve_bench.py's request mix (48 requests, greedy) from N clients (default 8) to one
Scheduler per `--prefill_chunk` value, all in this process without HTTP (the server's engine
loop, as `serve_bench.py --no-http` runs it). The values take turns, request mix by request
mix, so a slow spell of a shared machine hits them alike. (The schedulers' threads step a
model this process's main thread loaded, which costs every value alike ~20% a step; see
llama/server/app.py, _built_and_run_on_a_thread.) Per value: aggregate tok/s, time to
first token and inter-token gaps (p50/p95), each a median over the reps, and whether every
answer was the same under each value.
"""

import argparse
import asyncio
import functools
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.serve_bench import percentile
from benchmarks.serve_clients import (
    ANSWER_LENS,
    PROMPT_LENS,
    REPO,
    request_mix,
    run_clients,
    scheduled_completion,
    start_run,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="S")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ramp", type=float, default=1.6,
                        help="seconds over which the clients start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--root", type=Path, default=REPO / "bench_out")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny shape, 6 short requests, chunks 0 and 4, 1 turn")
    args = parser.parse_args(argv)
    lens = (PROMPT_LENS, ANSWER_LENS)
    if args.quick:
        args.shape, args.requests, args.reps, args.chunks = "tiny", 6, 1, [0, 4]
        args.clients, lens = 2, ((8, 16), (4, 8))

    from llama.engine.core import Engine
    from llama.server.scheduler import Scheduler

    _, _, llama, asks = start_run(args, *lens)
    length = -(-(max(len(a.tokens) + a.max_tokens for a in asks)) // 64) * 64
    schedulers = {}
    for chunk in args.chunks:
        engine = Engine(llama.model, llama.tokenizer.eos_id,
                        llama.model.new_cache(args.clients, length), release_finished=True,
                        prefill_chunk=chunk)
        schedulers[chunk] = Scheduler(engine, llama.tokenizer)
        schedulers[chunk].start()
    warm = request_mix(llama.tokenizer, args.clients, args.seed + 1, (16,), (4,))
    figures = {chunk: [] for chunk in args.chunks}
    texts = {chunk: None for chunk in args.chunks}
    try:
        for scheduler in schedulers.values():
            asyncio.run(run_clients(functools.partial(scheduled_completion, scheduler), warm,
                                    args.clients, 0.0))
        for rep in range(args.reps):
            for chunk, scheduler in schedulers.items():
                answers, wall, _ = asyncio.run(run_clients(
                    functools.partial(scheduled_completion, scheduler), asks, args.clients,
                    args.ramp))
                tokens = sum(a.completion_tokens or 0 for a in answers)
                ttft = [a.ttft for a in answers if a.ttft is not None]
                gaps = [g for a in answers for g in a.gaps]
                row = {"tok/s": tokens / wall, "ttft p50": percentile(ttft, 50),
                       "ttft p95": percentile(ttft, 95), "itl p50": percentile(gaps, 50),
                       "itl p95": percentile(gaps, 95)}
                figures[chunk].append(row)
                texts[chunk] = [a.text for a in answers]
                print(f"rep {rep + 1}, --prefill_chunk {chunk}: {row['tok/s']:.1f} tok/s, TTFT "
                      f"p95 {row['ttft p95'] * 1e3:.0f} ms, ITL p95 "
                      f"{row['itl p95'] * 1e3:.0f} ms", flush=True)
    finally:
        for scheduler in schedulers.values():
            scheduler.stop()
    print(f"\nshape {args.shape}, {args.clients} clients, {len(asks)} requests, medians of "
          f"{args.reps} turns")
    print("| --prefill_chunk | tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |")
    print("|---|---|---|---|---|---|")
    for chunk, rows in figures.items():
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"| {chunk} | {med['tok/s']:.1f} | {med['ttft p50'] * 1e3:.0f} ms | "
              f"{med['ttft p95'] * 1e3:.0f} ms | {med['itl p50'] * 1e3:.0f} ms | "
              f"{med['itl p95'] * 1e3:.0f} ms |")
    same = len({tuple(t) for t in texts.values()}) == 1
    print(f"answers the same under every value: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
