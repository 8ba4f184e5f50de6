"""The server under clients that hang up: every other request must still get its full answer.

    python -m benchmarks.serve_stress --shape S      # 200 requests, 16 clients, 8 slots
    python -m benchmarks.serve_stress --quick        # the tiny shape, 30 requests

A seeded third of the requests hang up: half of them mid-stream (after 1 to 4 chunks with
text), half before reading any byte of the response (0 to --max-delay seconds after sending,
so some leave while queued and some after admission). More clients than slots, so requests
also wait in the queue. Every answer is first computed alone through the library (temperature
0); then, against `python -m llama.server`:
- every request that did not hang up ends with [DONE] and its answer equals the library's:
  text, finish reason and token count; a request that hung up mid-stream got a prefix of it;
- afterwards /health says status ok, running 0, waiting 0, failed 0, and finished + cancelled
  equals the requests sent (each hang-up is cancelled, or finished if the server got there
  first); the server's log holds no traceback;
- the server's RSS (VmRSS) after each round (--rounds, on the same server) is back to its idle
  level, measured after a warm-up round that filled every slot, give or take --rss-slack.

Beside them, unless --no-hostile, hostile clients (benchmarks/hostile.py) keep at it all round:
50 MB bodies with and without a length (each refused with 413), idle connections and
half-sent request heads (each cut within --timeout plus a second), bodies sent a byte at a time
(408), four stop strings of the longest length taken (answered in full) and one of 20,000
characters (400); /health is asked every 0.1 s on a new connection and must answer within 1 s
every time. Afterwards a second server's scheduler is killed with two streams running: they
end with an error event, /health says 503, and the server exits 1.
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from benchmarks.serve_clients import (
    REPO,
    Answer,
    Ask,
    expected_answers,
    rss_bytes,
    same_answer,
    start_run,
    stream_completion,
    watch_rss,
)

PROMPT_LENS = (16, 32, 64, 128)
ANSWER_LENS = (8, 16, 32)
MIB = 2 ** 20


def hang_up_plan(count: int, fraction: float, seed: int, max_delay: float
                 ) -> List[Optional[Tuple[int, float]]]:
    """Per request: None (it stays), or (chunks before hanging up, delay): (0, delay) hangs
    up `delay` seconds after sending, having read nothing."""
    rng = random.Random(seed)
    leaving = rng.sample(range(count), round(count * fraction))
    plan: List[Optional[Tuple[int, float]]] = [None] * count
    for i, index in enumerate(sorted(leaving)):
        plan[index] = (rng.randint(1, 4), 0.0) if i % 2 else (0, rng.uniform(0, max_delay))
    return plan


async def stress(port: int, asks: List[Ask], plan, clients: int, pid: Optional[int] = None):
    """`clients` clients take the requests in order, each sending its next one as soon as the
    previous one ended or was abandoned. Returns (answers, peak RSS of `pid`)."""
    queue = list(range(len(asks)))[::-1]
    answers: List[Optional[Answer]] = [None] * len(asks)

    async def client():
        while queue:
            index = queue.pop()
            hang_up, delay = plan[index] or (None, 0.0)
            answers[index] = await stream_completion(port, asks[index], hang_up, delay)

    peak = [0]
    watcher = asyncio.create_task(watch_rss(pid, peak)) if pid else None
    await asyncio.gather(*(client() for _ in range(clients)))
    if watcher:
        watcher.cancel()
    return answers, peak[0]


async def stress_beside_attacks(port: int, asks: List[Ask], plan, clients: int,
                                pid: Optional[int], attack_prompt: str, timeout_s: float):
    """stress() with the hostile clients running until it ends. Returns (answers, peak RSS,
    {attack: Tally}, /health latencies)."""
    from benchmarks import hostile

    stop = asyncio.Event()
    tallies = {name: hostile.Tally() for name in ("huge bodies", "idle connections",
                                                   "trickled bodies", "long stop strings",
                                                   "/health")}
    attacks = [
        hostile.huge_bodies(port, stop, tallies["huge bodies"]),
        hostile.idle_connections(port, stop, tallies["idle connections"], count=40,
                                 deadline_s=timeout_s + 1.5),
        hostile.trickled_bodies(port, stop, tallies["trickled bodies"], gap_s=timeout_s),
        hostile.long_stops(port, stop, tallies["long stop strings"], attack_prompt, 48)]
    tasks = [asyncio.create_task(attack) for attack in attacks]
    watcher = asyncio.create_task(hostile.watch_health(port, stop, tallies["/health"]))
    answers, peak = await stress(port, asks, plan, clients, pid)
    stop.set()
    await asyncio.gather(*tasks)
    return answers, peak, tallies, await watcher


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


def settled_health(url: str, timeout: float = 30.0) -> dict:
    """/health once nothing runs or waits (cancellations apply between steps)."""
    deadline = time.time() + timeout
    while True:
        now = health(url)
        if (now["running"] == 0 and now["waiting"] == 0) or time.time() > deadline:
            return now
        time.sleep(0.1)


def check(answers: List[Answer], plan, expected, before: dict, after: dict,
          others: int = 0) -> Tuple[dict, list]:
    """(what happened, the problems found: empty when all is well). `others`: requests of
    other clients that finished in the scheduler meanwhile."""
    problems = []
    kept = [i for i, p in enumerate(plan) if p is None]
    for i in kept:
        if not same_answer(answers[i], expected[i]):
            a = answers[i]
            problems.append(f"request {i}: got {a.text!r} ({a.finish_reason}, "
                            f"{a.completion_tokens} tokens, done {a.done}, error {a.error}), "
                            f"expected {expected[i]}")
    mid = [i for i, p in enumerate(plan) if p is not None and p[0] > 0]
    early = [i for i, p in enumerate(plan) if p is not None and p[0] == 0]
    for i in mid:
        if answers[i].error or not expected[i][0].startswith(answers[i].text):
            problems.append(f"request {i} (hung up mid-stream): {answers[i].text!r} is not a "
                            f"prefix of {expected[i][0]!r} (error {answers[i].error})")
    delta = {key: after[key] - before[key] for key in ("finished", "cancelled", "failed")}
    summary = {"requests": len(answers), "kept": len(kept),
               "hung up mid-stream": sum(answers[i].hung_up for i in mid),
               "finished before hanging up": sum(answers[i].done for i in mid),
               "hung up before reading": len(early), **delta,
               "finished anyway": delta["finished"] - len(kept) - others}
    if after["status"] != "ok" or after["running"] or after["waiting"]:
        problems.append(f"/health after the run: {after}")
    if delta["failed"]:
        problems.append(f"{delta['failed']} requests failed")
    if delta["finished"] + delta["cancelled"] != len(answers) + others:
        problems.append(f"finished {delta['finished']} + cancelled {delta['cancelled']} != "
                        f"{len(answers)} requests sent + {others} others")
    if delta["cancelled"] > len(mid) + len(early):
        problems.append(f"cancelled {delta['cancelled']} > {len(mid) + len(early)} hang-ups")
    return summary, problems


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="S")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--hang-up", type=float, default=1 / 3,
                        help="fraction of the requests whose client hangs up")
    parser.add_argument("--max-delay", type=float, default=0.5,
                        help="longest wait before hanging up without reading (seconds)")
    parser.add_argument("--rss-slack", type=float, default=48.0,
                        help="MiB the RSS after a round may exceed the idle level by: the "
                             "allocators' and oneDNN's kernel cache's growth (README)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run the requests this many times on the same server (memory "
                             "that grows round after round is a leak)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--root", type=Path, default=REPO / "bench_out")
    parser.add_argument("--no-hostile", dest="hostile", action="store_false",
                        help="only the clients that hang up: no hostile ones, no killed "
                             "scheduler")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="the server's --timeout for request heads and bodies (seconds)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny shape, 30 requests, 6 clients, 4 slots")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.requests, args.clients, args.max_batch_size = "tiny", 30, 6, 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt, tokenizer_path, llama, asks = start_run(args, PROMPT_LENS, ANSWER_LENS)
    import os

    from tests.server_fixtures import read_log, running_server

    plan = hang_up_plan(len(asks), args.hang_up, args.seed, args.max_delay)
    start = time.perf_counter()
    expected = expected_answers(llama, asks)
    print(f"shape {args.shape}: {len(asks)} answers computed alone through the library in "
          f"{time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    model_args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer_path),
                  "--max_seq_len", "256"]
    server_args = model_args + ["--max_batch_size", str(args.max_batch_size),
                                "--timeout", str(args.timeout)]
    with running_server(*server_args, env={"OMP_NUM_THREADS": str(args.threads)}) as url:
        port, pid = int(url.rsplit(":", 1)[1]), url.process.pid
        started = rss_bytes(pid)
        # warm-up: every slot busy with the longest requests, nobody hanging up
        longest = sorted(asks, key=lambda a: len(a.tokens) + a.max_tokens)[-args.clients:]
        asyncio.run(stress(port, longest, [None] * len(longest), args.clients))
        before = settled_health(url)
        time.sleep(1.0)
        idle = statistics.median(rss_bytes(pid) for _ in range(5))
        rounds = []  # (seconds, summary, problems, /health, peak and end RSS) per round
        attacked = []  # per round: ({attack: Tally}, /health latencies)
        for _ in range(args.rounds):
            start = time.perf_counter()
            if args.hostile:
                answers, peak, tallies, latencies = asyncio.run(stress_beside_attacks(
                    port, asks, plan, args.clients, pid, asks[0].prompt, args.timeout))
                attacked.append((tallies, latencies))
                others = tallies["long stop strings"].statuses.get("200", 0)
            else:
                answers, peak = asyncio.run(stress(port, asks, plan, args.clients, pid))
                others = 0
            seconds = time.perf_counter() - start
            after = settled_health(url)
            time.sleep(1.0)
            end = statistics.median(rss_bytes(pid) for _ in range(5))
            rounds.append((seconds, *check(answers, plan, expected, before, after, others),
                           after, peak, end))
            before = after
        alive = url.process.poll() is None
        log = read_log(url.process)
    killed = None
    if args.hostile:
        from benchmarks import hostile

        killed = hostile.killed_scheduler(model_args + ["--max_batch_size", "3"], "The")
    problems = [p for r in rounds for p in r[2]]
    for tallies, _ in attacked:
        problems += [f"{name}: {p}" for name, tally in tallies.items() for p in tally.problems]
    if killed is not None:
        problems += [f"killed scheduler: {p}" for p in killed[1]]
    if not alive:
        problems.append("the server exited")
    if "Traceback" in log:
        problems.append(f"the server's log holds {log.count('Traceback')} tracebacks:\n"
                        f"{log[-3000:]}")
    print(f"server RSS: {started / MIB:.0f} MiB at start, {idle / MIB:.0f} MiB idle after the "
          f"warm-up")
    for number, (seconds, summary, _, after, peak, end) in enumerate(rounds, 1):
        grown = (end - idle) / MIB
        print(f"round {number}: {len(asks)} requests from {args.clients} clients on "
              f"{args.max_batch_size} slots in {seconds:.1f} s; load average "
              f"{os.getloadavg()[0]:.2f}")
        print("  " + "; ".join(f"{key} {value}" for key, value in summary.items()))
        print(f"  /health after: {after}")
        print(f"  server RSS {peak / MIB:.0f} MiB at peak, {end / MIB:.0f} MiB after "
              f"({grown:+.1f} MiB against idle; allowed {args.rss_slack:.0f})")
        if grown > args.rss_slack:
            problems.append(f"round {number}: RSS after it is {grown:.1f} MiB above idle "
                            f"(allowed {args.rss_slack} MiB)")
    for number, (tallies, latencies) in enumerate(attacked, 1):
        print(f"round {number}, hostile clients beside: /health answered {len(latencies)} "
              f"times, slowest {max(latencies, default=0):.3f} s, median "
              f"{statistics.median(latencies) if latencies else 0:.3f} s")
        for name, tally in tallies.items():
            if name != "/health":
                print(f"  {name}: answers {tally.statuses}, connections cut {tally.cut}, "
                      f"problems {len(tally.problems)}")
    if killed is not None:
        print("killed scheduler: " + "; ".join(f"{k} {v}" for k, v in killed[0].items()))
    for problem in problems[:40]:
        print("PROBLEM:", problem)
    print("PASS" if not problems else f"FAIL ({len(problems)} problems)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
