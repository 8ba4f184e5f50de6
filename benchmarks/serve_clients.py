"""What serve_bench.py and serve_stress.py share: the random model's files, a seeded mix of
requests, a streaming HTTP client (and the same requests through a Scheduler in this process),
the answers the library gives alone, and the server's resident memory."""

import asyncio
import json
import random
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from benchmarks.bench import checkpoint_dir
from benchmarks.shapes import VOCAB
from llama.checkpoints.fixtures import python_docs_text, train_tokenizer

REPO = Path(__file__).resolve().parent.parent

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


def start_run(args, prompt_lens=PROMPT_LENS, answer_lens=ANSWER_LENS):
    """What both benchmarks do first: SIGTERM ends the run (its `finally` stops the server it
    started; a shell's background job ignores Ctrl-C), torch's threads, the model's files, the
    library on them, and the seeded requests. Returns (ckpt, tokenizer_path, llama, asks)."""
    import signal

    from llama.generation import Llama

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    ckpt, tokenizer_path = model_files(args.shape, args.root)
    llama = Llama.build(str(ckpt), str(tokenizer_path), 512, 1, device="cpu", verbose=False)
    # the attention the server runs (llama/server/app.py), so its answers and speed compare alike
    llama.model.use_native_kernels()
    asks = request_mix(llama.tokenizer, args.requests, args.seed, prompt_lens, answer_lens)
    return ckpt, tokenizer_path, llama, asks


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


async def run_clients(send, asks: List[Ask], clients: int, ramp: float, pid=None):
    """`clients` clients take the requests in order, each sending its next one (`await
    send(ask)`, an Answer) when its previous one ended; client i starts i * ramp / clients
    seconds late. Returns (answers in the requests' order, wall seconds, peak RSS of process
    `pid`)."""
    queue = list(enumerate(asks))[::-1]
    answers: List[Optional[Answer]] = [None] * len(asks)

    async def client(i):
        await asyncio.sleep(i * ramp / clients)
        while queue:
            index, ask = queue.pop()
            answers[index] = await send(ask)

    peak = [0]
    start = time.perf_counter()
    watcher = asyncio.create_task(watch_rss(pid, peak)) if pid else None
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = max(a.times[-1] if a.times else a.sent for a in answers) - start
    if watcher:
        watcher.cancel()
    return answers, wall, peak[0]


async def scheduled_completion(scheduler, ask: Ask) -> Answer:
    """The request through a Scheduler in this process, as the server drives it, without
    HTTP: its events come to this event loop as they do to the server's."""
    from llama.server.scheduler import Request

    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    answer = Answer(sent=time.perf_counter())
    scheduler.submit(Request(prompt=ask.tokens, limit=ask.max_tokens, temperature=0.0,
                             on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e)))
    while not answer.done:
        event = await events.get()
        if event.text:
            answer.times.append(time.perf_counter())
            answer.text += event.text
        if event.done:
            answer.done, answer.finish_reason = True, event.finish_reason
            answer.completion_tokens = event.completion_tokens
    return answer


def rss_bytes(pid: int) -> int:
    """A process's resident memory now (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


async def watch_rss(pid: int, peak: List[int], every: float = 0.05) -> None:
    while True:
        peak[0] = max(peak[0], rss_bytes(pid))
        await asyncio.sleep(every)


def expected_answers(llama, asks: List[Ask]):
    """Each request's answer alone through the library (untimed)."""
    return [expected_answer(llama.tokenizer, ask, llama.generate([ask.tokens], ask.max_tokens,
                                                                  temperature=0)[0][0])
            for ask in asks]


def expected_answer(tokenizer, ask: Ask, tokens: List[int]):
    """(text, finish reason, token count) the server should stream for `tokens`: the text
    they add to the prompt's (with the leading space the library's text drops)."""
    finish = "length" if len(tokens) == ask.max_tokens else "stop"
    prompt = tokenizer.decode(ask.tokens)
    return tokenizer.decode(ask.tokens + tokens)[len(prompt):], finish, len(tokens)


def same_answer(answer: Answer, expected) -> bool:
    return (answer.done and answer.error is None and
            (answer.text, answer.finish_reason, answer.completion_tokens) == tuple(expected))
