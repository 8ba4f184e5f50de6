"""The server under concurrent streaming clients, against the library one request at a time.

    python benchmarks/serve_bench.py --shape S               # clients 1 4 8 16, 48 requests
    python benchmarks/serve_bench.py --quick                 # a smoke run on the tiny shape

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
import json
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import SHAPES, VOCAB, checkpoint_dir  # noqa: E402
from llama.fixtures import python_docs_text, train_tokenizer  # noqa: E402

PROMPT_LENS = (32, 64, 128, 256)
ANSWER_LENS = (16, 32, 64, 128)


# ---------------------------------------------------------------------- model and requests
def model_files(shape: str, root: Path):
    """(checkpoint directory, tokenizer path) of a random `shape` model, built once."""
    root.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dir(shape, root, torch.device("cpu"))
    tokenizer = root / f"tokenizer-{VOCAB}.model"
    if not tokenizer.exists():
        # Python's documentation alone has too few distinct pieces for 32000 tokens: the
        # standard library's sources (sorted, so the same text every time) make up the rest
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        sources = "\n".join(p.read_text(encoding="utf-8", errors="replace")
                            for p in sorted(stdlib.glob("*.py")))
        part = tokenizer.with_suffix(".part")
        train_tokenizer(part, VOCAB, python_docs_text() + "\n" + sources)
        part.rename(tokenizer)
    return ckpt, tokenizer


@dataclass
class Ask:
    """One request: a prompt (its text, and its tokens as the server encodes them) and the
    answer's length."""
    prompt: str
    tokens: List[int]
    max_tokens: int


def request_mix(tokenizer, count: int, seed: int, prompt_lens=PROMPT_LENS,
                answer_lens=ANSWER_LENS) -> List[Ask]:
    """`count` requests cycling through every (prompt length, answer length) pair in a seeded
    order; prompts are windows of Python's documentation at seeded places."""
    rng = random.Random(seed)
    text = tokenizer.encode(python_docs_text(), bos=False, eos=False)
    pairs = [(p, a) for p in prompt_lens for a in answer_lens]
    asks = []
    for i in range(count):
        if i % len(pairs) == 0:
            rng.shuffle(pairs)
        length, answer = pairs[i % len(pairs)]
        start = rng.randrange(len(text) - length)
        prompt = tokenizer.decode(text[start: start + length - 1])  # BOS makes it `length`
        asks.append(Ask(prompt, tokenizer.encode(prompt, bos=True, eos=False), answer))
    return asks


# ---------------------------------------------------------------------- a streaming client
@dataclass
class Answer:
    """What a client saw of one streamed completion."""
    sent: float  # perf_counter when the request was sent
    times: List[float] = field(default_factory=list)  # arrival of each chunk with text
    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: Optional[int] = None  # from the usage chunk
    done: bool = False  # "data: [DONE]" arrived
    hung_up: bool = False  # the client closed the connection on purpose
    error: Optional[str] = None

    @property
    def ttft(self) -> Optional[float]:
        return self.times[0] - self.sent if self.times else None

    @property
    def gaps(self) -> List[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


async def stream_completion(port: int, ask: Ask, hang_up: Optional[int] = None,
                            delay: float = 0.0, host: str = "127.0.0.1") -> Answer:
    """POST /v1/completions with `stream: true` at temperature 0, over a plain HTTP/1.1
    connection (so that where a client hangs up is exact). `hang_up`: close the connection
    after that many chunks with text; 0: `delay` seconds after sending, having read nothing
    of the response."""
    body = json.dumps({"prompt": ask.prompt, "max_tokens": ask.max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    reader, writer = await asyncio.open_connection(host, port)
    answer = Answer(sent=time.perf_counter())
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        if hang_up == 0:
            await asyncio.sleep(delay)
            answer.hung_up = True
            return answer
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            answer.error = f"HTTP {status}: {(await reader.read()).decode(errors='replace')}"
            return answer
        buffer = b""
        async for data in _body(reader, headers):
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                if event == b"data: [DONE]":
                    answer.done = True
                    return answer
                message = json.loads(event[len(b"data: "):])
                if "error" in message:
                    answer.error = message["error"]["message"]
                    return answer
                if message.get("usage"):
                    answer.completion_tokens = message["usage"]["completion_tokens"]
                for choice in message["choices"]:
                    if choice["text"]:
                        answer.times.append(time.perf_counter())
                        answer.text += choice["text"]
                    answer.finish_reason = choice["finish_reason"] or answer.finish_reason
                if hang_up and len(answer.times) >= hang_up:
                    answer.hung_up = True
                    return answer
        answer.error = "the stream ended without [DONE]"
        return answer
    finally:
        writer.close()


async def _body(reader, headers):
    """The response body's pieces as they arrive (chunked transfer encoding or not)."""
    if headers.get("transfer-encoding") != "chunked":
        while data := await reader.read(1 << 16):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def run_clients(port: int, asks: List[Ask], clients: int, ramp: float, pid=None):
    """`clients` clients take the requests in order, each sending its next one when its
    previous one ended; client i starts i * ramp / clients seconds late. Returns (answers in
    the requests' order, wall seconds, peak RSS of process `pid`)."""
    queue = list(enumerate(asks))[::-1]
    answers: List[Optional[Answer]] = [None] * len(asks)

    async def client(i):
        await asyncio.sleep(i * ramp / clients)
        while queue:
            index, ask = queue.pop()
            answers[index] = await stream_completion(port, ask)

    peak = [0]
    start = time.perf_counter()
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    watcher = asyncio.create_task(watch_rss(pid, peak)) if pid else None
    await asyncio.gather(*tasks)
    wall = max(a.times[-1] if a.times else a.sent for a in answers) - start
    if watcher:
        watcher.cancel()
    return answers, wall, peak[0]


def rss_bytes(pid: int) -> int:
    """A process's resident memory now (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


async def watch_rss(pid: int, peak: List[int], every: float = 0.05) -> None:
    while True:
        peak[0] = max(peak[0], rss_bytes(pid))
        await asyncio.sleep(every)


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


def expected_answers(llama, asks: List[Ask]):
    """Each request's answer alone through the library (untimed)."""
    return [expected_answer(llama.tokenizer, ask, llama.generate([ask.tokens], ask.max_tokens,
                                                                  temperature=0)[0][0])
            for ask in asks]


def expected_answer(tokenizer, ask: Ask, tokens: List[int]):
    """(text, finish reason, token count) the server should stream for `tokens`."""
    finish = "length" if len(tokens) == ask.max_tokens else "stop"
    return tokenizer.decode(tokens), finish, len(tokens)


def same_answer(answer: Answer, expected) -> bool:
    return (answer.done and answer.error is None and
            (answer.text, answer.finish_reason, answer.completion_tokens) == tuple(expected))


# ---------------------------------------------------------------------- figures
def percentile(values: List[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    values = sorted(values)
    at = (len(values) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (at - low)


def served_figures(answers: List[Answer], wall: float, expected, peak_rss: int) -> dict:
    tokens = sum(a.completion_tokens or 0 for a in answers)
    ttft = [a.ttft for a in answers if a.ttft is not None]
    gaps = [g for a in answers for g in a.gaps]
    return {"tok/s": tokens / wall, "tokens": tokens, "wall": wall,
            "ttft p50": percentile(ttft, 50), "ttft p95": percentile(ttft, 95),
            "itl p50": percentile(gaps, 50) if gaps else 0.0,
            "itl p95": percentile(gaps, 95) if gaps else 0.0,
            "chunks": sum(len(a.times) for a in answers),
            "same": sum(same_answer(a, e) for a, e in zip(answers, expected)),
            "peak rss": peak_rss}


def baseline_figures(prefill, whole, expected) -> dict:
    tokens = sum(count for _, _, count in expected)
    decode = [(w - p) / (n - 1) for p, w, (_, _, n) in zip(prefill, whole, expected) if n > 1]
    return {"tok/s": tokens / sum(whole), "tokens": tokens, "wall": sum(whole),
            "prefill mean": statistics.mean(prefill), "prefill p50": percentile(prefill, 50),
            "prefill p95": percentile(prefill, 95), "decode per token": statistics.mean(decode),
            "request mean": statistics.mean(whole)}


def print_table(base: dict, served: dict, requests: int) -> None:
    print(f"\none at a time, library: {base['tok/s']:.1f} tok/s ({base['tokens']} tokens in "
          f"{base['wall']:.1f} s); prefill mean {base['prefill mean'] * 1e3:.0f} ms (p50 "
          f"{base['prefill p50'] * 1e3:.0f}, p95 {base['prefill p95'] * 1e3:.0f}); decode "
          f"{base['decode per token'] * 1e3:.1f} ms/token")
    print("| clients | tok/s | x one at a time | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | "
          "tokens/chunk | same answers | server peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, f in served.items():
        print(f"| {n} | {f['tok/s']:.1f} | {f['tok/s'] / base['tok/s']:.2f}x | "
              f"{f['ttft p50'] * 1e3:.0f} ms | {f['ttft p95'] * 1e3:.0f} ms | "
              f"{f['itl p50'] * 1e3:.0f} ms | {f['itl p95'] * 1e3:.0f} ms | "
              f"{f['tokens'] / max(f['chunks'], 1):.2f} | {f['same']}/{requests} | "
              f"{f['peak rss'] / 2**20:.0f} MiB |")


def targets(base: dict, served: dict) -> List[str]:
    """The issue's targets, as lines saying PASS or FAIL (needs 1 and 8 clients)."""
    if 8 not in served or 1 not in served:
        return ["targets: need runs at 1 and 8 clients"]
    ratio = served[8]["tok/s"] / base["tok/s"]
    bound = 2 * served[1]["ttft p95"] + base["prefill mean"]
    ttft = served[8]["ttft p95"]
    return [f"8 clients: {ratio:.2f}x the one-at-a-time tok/s (target >= 3x): "
            f"{'PASS' if ratio >= 3 else 'FAIL'}",
            f"8 clients: TTFT p95 {ttft * 1e3:.0f} ms; 2 x the single-client p95 "
            f"({served[1]['ttft p95'] * 1e3:.0f} ms) + one prefill (mean "
            f"{base['prefill mean'] * 1e3:.0f} ms) = {bound * 1e3:.0f} ms: "
            f"{'PASS' if ttft <= bound else 'FAIL'}"]


def median_figures(runs: List[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


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
    import os

    from llama.generation import Llama
    from llama.model import ModelArgs, count_parameters
    from tests.server_fixtures import running_server

    torch.set_num_threads(args.threads)
    ckpt, tokenizer_path = model_files(args.shape, args.root)
    llama = Llama.build(str(ckpt), str(tokenizer_path), 512, 1, device="cpu", verbose=False)
    asks = request_mix(llama.tokenizer, args.requests, args.seed, args.prompt_lens,
                       args.answer_lens)
    max_seq_len = -(-(max(len(a.tokens) + a.max_tokens for a in asks)) // 64) * 64
    batch = args.max_batch_size or max(args.clients)
    params = count_parameters(ModelArgs(vocab_size=VOCAB, **SHAPES[args.shape]))
    print(f"shape {args.shape} ({params / 1e6:.0f} M parameters), torch {torch.__version__}, "
          f"{args.threads} threads; {len(asks)} requests: prompts "
          f"{'/'.join(map(str, args.prompt_lens))} tokens x answers "
          f"{'/'.join(map(str, args.answer_lens))} tokens, temperature 0; server "
          f"--max_batch_size {batch} --max_seq_len {max_seq_len}")
    server_args = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tokenizer_path),
                   "--max_batch_size", str(batch), "--max_seq_len", str(max_seq_len)]
    bases, served_runs = [], []
    with running_server(*server_args, env={"OMP_NUM_THREADS": str(args.threads)}) as url:
        port, pid = int(url.rsplit(":", 1)[1]), url.process.pid
        warm = request_mix(llama.tokenizer, max(args.clients), args.seed + 1, (16,), (4,))
        asyncio.run(run_clients(port, warm, max(args.clients), 0.0))
        for run in range(args.runs):
            print(f"\nrun {run + 1}/{args.runs}: load average {os.getloadavg()[0]:.2f}, "
                  f"server idle RSS {rss_bytes(pid) / 2**20:.0f} MiB", flush=True)
            prefill, whole, expected = library_one_at_a_time(llama, asks)
            base = baseline_figures(prefill, whole, expected)
            ramp = base["request mean"] if args.ramp is None else args.ramp
            served = {}
            for clients in args.clients:
                answers, wall, peak = asyncio.run(run_clients(port, asks, clients, ramp, pid))
                served[clients] = served_figures(answers, wall, expected, peak)
                print(f"  {clients} clients: {served[clients]['tok/s']:.1f} tok/s", flush=True)
            print_table(base, served, len(asks))
            print(f"(clients started over {ramp:.2f} s; load average after the run "
                  f"{os.getloadavg()[0]:.2f})")
            for line in targets(base, served):
                print(line)
            bases.append(base)
            served_runs.append(served)
    if args.runs > 1:
        base = median_figures(bases)
        served = {n: median_figures([run[n] for run in served_runs]) for n in args.clients}
        ratios = {n: statistics.median(run[n]["tok/s"] / b["tok/s"]
                                       for run, b in zip(served_runs, bases))
                  for n in args.clients}
        print(f"\nmedians of {args.runs} runs (a ratio: the median of the runs' ratios: "
              + ", ".join(f"{n} clients {r:.2f}x" for n, r in ratios.items()) + ")")
        print_table(base, served, len(asks))
        for line in targets(base, served):
            print(line)
    return 0 if all(run[n]["same"] == len(asks) for run in served_runs
                    for n in args.clients) else 1


if __name__ == "__main__":
    sys.exit(main())
