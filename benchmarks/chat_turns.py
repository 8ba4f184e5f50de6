"""Time to first token, turn by turn, of a chat that keeps its conversation in the cache.

    python -m benchmarks.chat_turns --shape S
    python -m benchmarks.chat_turns --shape M --turns 5 --turn-tokens 150 --no-server

A 5-turn chat of ~150-token user turns and ~150-token answers on a random model of the shape
(benchmarks/shapes.py's shapes; a 32000-piece tokenizer), greedy. Each turn is timed twice,
in alternation, so a slow spell of a shared machine hits both alike:

- library: a chat session (Llama.chat_session: the conversation stays in its cache, only the
  new turn is prefilled) against stream_chat of the whole dialog so far (prefilled anew);
- server (real HTTP, streamed): `python -m llama.server --prefix_cache MIB` against
  `--prefix_cache 0`, each request the whole dialog so far, as chat clients send it.

Time to first token is from the call (the request) to the first text piece. The answers are
generated in full by the cached side only (they make the dialog); the side without a cache
answers a single token per turn (its first). Prints per turn the prompt
tokens, both times and their ratio, the prompt tokens the cached side prefilled, and turn N
over turn 1 with the cache (the issue's target: at most 1.3 at turn 5).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.serve_clients import model_files
from llama.checkpoints.fixtures import python_docs_text

REPO = Path(__file__).resolve().parent.parent

SYSTEM = "You are a patient teacher of Python; answer with examples."


def user_turns(tokenizer, count: int, length: int):
    """`count` user messages of about `length` tokens: windows of Python's documentation."""
    text = tokenizer.encode(python_docs_text(), bos=False, eos=False)
    step = len(text) // (count + 1)
    return [tokenizer.decode(text[i * step: i * step + length]).replace("[", "(")
            for i in range(1, count + 1)]


def first_piece_seconds(pieces):
    """(wall seconds, this process's CPU seconds) until an iterator of text pieces yields its
    first; the rest is drained. CPU seconds (all threads) count the work alone, which a
    machine shared with other jobs stretches less than the wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    seconds = None
    for _ in pieces:
        if seconds is None:
            seconds = (time.perf_counter() - start, time.process_time() - cpu)
    return seconds if seconds is not None else (time.perf_counter() - start,
                                                time.process_time() - cpu)


def library_turns(llama, turns, answer_tokens):
    session = llama.chat_session(system=SYSTEM, reply_room=answer_tokens + 8)
    rows, cpu_rows = [], []
    for content in turns:
        dialog = session.messages + [{"role": "user", "content": content}]
        plain = llama.stream_chat(dialog, temperature=0, max_gen_len=1)
        without, without_cpu = first_piece_seconds(plain)
        turn = session.stream(content, temperature=0, max_gen_len=answer_tokens)
        cached, cached_cpu = first_piece_seconds(turn)
        if turn.dropped:
            raise SystemExit("the conversation outgrew max_seq_len: fewer or shorter turns")
        rows.append((len(turn.prompt_tokens), cached, without, turn.prefilled))
        cpu_rows.append((len(turn.prompt_tokens), cached_cpu, without_cpu, turn.prefilled))
        print(f"library turn {len(rows)}: {cached:.3f} s / {without:.3f} s", file=sys.stderr,
              flush=True)
    return rows, cpu_rows


# ---------------------------------------------------------------------- the server
def start_server(ckpt, tokenizer, port, max_seq_len, prefix_cache, threads):
    command = [sys.executable, "-m", "llama.server", "--ckpt_dir", str(ckpt),
               "--tokenizer_path", str(tokenizer), "--port", str(port), "--max_batch_size",
               "1", "--max_seq_len", str(max_seq_len), "--prefix_cache", str(prefix_cache),
               "--model_name", "llama"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server ({' '.join(command)}) exited: {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start in time")


def stop_server(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def streamed_chat(url, messages, max_tokens):
    """(seconds to the first text piece, the whole answer) of a streamed chat request."""
    import httpx

    body = {"model": "llama", "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "stream": True}
    start = time.perf_counter()
    first, text = None, ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as reply:
        if reply.status_code != 200:
            raise SystemExit(f"the server answered {reply.status_code}: {reply.read()!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if piece:
                first = first if first is not None else time.perf_counter() - start
                text += piece
    return (first if first is not None else time.perf_counter() - start), text


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="S")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--turn-tokens", type=int, default=150)
    parser.add_argument("--answer-tokens", type=int, default=150)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--prefix-cache", type=float, default=512,
                        help="the cached server's --prefix_cache (MiB)")
    parser.add_argument("--no-server", action="store_true", help="the library only")
    parser.add_argument("--no-library", action="store_true", help="the server only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--root", type=Path, default=REPO / "bench_out")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny shape, 3 short turns")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.turns, args.turn_tokens, args.answer_tokens = "tiny", 3, 20, 8
        args.max_seq_len, args.prefix_cache = 256, 4

    from llama.generation import Llama

    torch.set_num_threads(args.threads)
    ckpt, tokenizer_path = model_files(args.shape, args.root)
    llama = Llama.build(str(ckpt), str(tokenizer_path), args.max_seq_len, 1, device="cpu",
                        verbose=False)
    llama.model.use_native_kernels()  # as the server runs it
    turns = user_turns(llama.tokenizer, args.turns, args.turn_tokens)
    print(f"shape {args.shape}, {args.turns} turns of ~{args.turn_tokens} tokens, answers of "
          f"{args.answer_tokens}, {args.threads} threads")
    if not args.no_library:
        llama.chat_session().send("warm up", temperature=0, max_gen_len=2)
        rows, cpu_rows = library_turns(llama, turns, args.answer_tokens)
        report("library: chat session vs stream_chat of the whole dialog", rows)
        report("library, in CPU seconds of this process", cpu_rows)
    if not args.no_server:
        del llama
        rows = run_servers(ckpt, tokenizer_path, turns, args)
        report(f"server: --prefix_cache {args.prefix_cache:g} vs 0 (HTTP, streamed)", rows)
    return 0


def run_servers(ckpt, tokenizer_path, turns, args):
    """The same user turns to both servers, turn by turn; the cached server's answers make
    the dialog."""
    import socket

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    cached, url = start_server(ckpt, tokenizer_path, free_port(), args.max_seq_len,
                               args.prefix_cache, args.threads)
    plain, plain_url = start_server(ckpt, tokenizer_path, free_port(), args.max_seq_len, 0,
                                    args.threads)
    rows = []
    try:
        streamed_chat(url, [{"role": "user", "content": "warm up"}], 2)
        streamed_chat(plain_url, [{"role": "user", "content": "warm up"}], 2)
        messages = [{"role": "system", "content": SYSTEM}]
        for content in turns:
            messages = messages + [{"role": "user", "content": content}]
            without, _ = streamed_chat(plain_url, messages, 1)
            before = health(url)["prefix_cache"]
            seconds, answer = streamed_chat(url, messages, args.answer_tokens)
            after = health(url)["prefix_cache"]
            prompt = (after["hit_tokens"] + after["prefilled_tokens"]
                      - before["hit_tokens"] - before["prefilled_tokens"])
            rows.append((prompt, seconds, without,
                         after["prefilled_tokens"] - before["prefilled_tokens"]))
            messages = messages + [{"role": "assistant", "content": answer}]
            print(f"server turn {len(rows)}: {seconds:.3f} s / {without:.3f} s",
                  file=sys.stderr, flush=True)
    finally:
        stop_server(cached)
        stop_server(plain)
    return rows


def report(title, rows):
    print(f"\n{title}")
    print(f"{'turn':>4} {'prompt':>7} {'prefilled':>9} {'TTFT cached (s)':>16} "
          f"{'TTFT whole (s)':>15} {'whole/cached':>12} {'cached/turn 1':>13}")
    first = rows[0][1]
    for number, (prompt, cached, without, prefilled) in enumerate(rows, 1):
        print(f"{number:>4} {prompt:>7} {prefilled:>9} {cached:>16.3f} {without:>15.3f} "
              f"{without / cached:>12.2f} {cached / first:>13.2f}")
    print(f"turn {len(rows)} over turn 1, with the cache: {rows[-1][1] / first:.2f} "
          f"(without: {rows[-1][2] / rows[0][2]:.2f})")


if __name__ == "__main__":
    sys.exit(main())
