"""Hostile and careless clients for serve_stress.py, run beside the well-behaved ones: huge
bodies, idle and half-sent connections, bodies that trickle, long stop strings; a /health
watcher that times every answer; and a server whose scheduler is killed.

Each attack is an asyncio task that runs until `stop` is set and records what the server did
in a Tally; serve_stress.py checks the tallies (every huge body refused with 413, every stalled
connection cut, every long-stop request answered, /health within 1 s throughout)."""

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

HOST = "127.0.0.1"
HEALTH_LIMIT_S = 1.0
STOP_CHARS = 256  # the server's cap (llama/server/openai_api.py MAX_STOP_CHARS)


@dataclass
class Tally:
    """What one kind of client saw: the server's answers (status -> count), how many
    connections the server cut, and any surprise."""
    statuses: Dict[str, int] = field(default_factory=dict)
    cut: int = 0
    problems: List[str] = field(default_factory=list)

    def saw(self, status) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1


async def _status_of(reader, timeout: float) -> Optional[int]:
    """The status of the response on `reader`, or None if the server closed without one."""
    line = await asyncio.wait_for(reader.readline(), timeout)
    return int(line.split()[1]) if line.startswith(b"HTTP/") else None


async def huge_bodies(port: int, stop: asyncio.Event, tally: Tally, size: int = 50 * 2 ** 20):
    """Announce a `size`-byte body and send it, then the same without a length (chunked),
    reading the answer while sending: 413 each time (the first before the body is sent)."""
    part = b"x" * 2 ** 20
    while not stop.is_set():
        for chunked in (False, True):
            reader, writer = await asyncio.open_connection(HOST, port)
            length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
            writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: "
                         f"application/json\r\n{length}\r\n\r\n".encode())
            answer = asyncio.ensure_future(reader.readline())
            sent = 0
            try:
                while sent < size and not answer.done():
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                    await writer.drain()
                    sent += len(part)
            except ConnectionError:
                pass  # refused and closed while we were still sending: the answer is read
            try:
                line = await asyncio.wait_for(answer, 10)
                status = int(line.split()[1]) if line.startswith(b"HTTP/") else None
            except (ConnectionError, asyncio.TimeoutError):
                status = None
            finally:
                writer.close()
            tally.saw(status if status is not None else "reset")
            # A reset: the server answered and closed while we were still sending, and our
            # side dropped its answer on the reset (no lingering close). Refused all the same,
            # unless the server read the whole body first.
            if status not in (413, None) or (status is None and sent >= size):
                tally.problems.append(f"a {size}-byte body got {status} after {sent} bytes, "
                                      f"not 413")
            await asyncio.sleep(0.2)


async def idle_connections(port: int, stop: asyncio.Event, tally: Tally, count: int,
                           deadline_s: float):
    """`count` connections at a time: half send nothing, half half a request head. Each must
    be cut by the server within `deadline_s`; a new set opens as they are."""
    while not stop.is_set():
        opened: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for i in range(count):
            reader, writer = await asyncio.open_connection(HOST, port)
            if i % 2:
                writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\n".encode())
            opened.append((reader, writer))
        began = time.monotonic()
        for reader, writer in opened:
            try:
                left = max(deadline_s - (time.monotonic() - began), 0.01)
                await asyncio.wait_for(reader.read(), left)
                tally.cut += 1
            except asyncio.TimeoutError:
                tally.problems.append(f"an idle connection was still open after {deadline_s} s")
            except ConnectionError:
                tally.cut += 1
            finally:
                writer.close()


async def trickled_bodies(port: int, stop: asyncio.Event, tally: Tally, gap_s: float):
    """A body announced as 1000 bytes, sent a byte every `gap_s` seconds (longer than the
    server's --timeout): 408."""
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: 1000\r\n\r\n{{".encode())
        try:
            status = await _status_of(reader, gap_s * 4)
            tally.saw(status)
            if status != 408:
                tally.problems.append(f"a trickled body got {status}, not 408")
        except asyncio.TimeoutError:
            tally.problems.append("a trickled body was never cut")
        finally:
            writer.close()


async def long_stops(port: int, stop: asyncio.Event, tally: Tally, prompt: str,
                     max_tokens: int):
    """Requests with four stop strings of the longest length the server takes (and which
    never match), streamed: each answered in full. And one with a 20,000-character stop
    string: 400."""
    from benchmarks.serve_clients import _body

    stops = [chr(0x4e00 + i) * STOP_CHARS for i in range(4)]
    while not stop.is_set():
        for stop_strings in (stops, ["z" * 20000]):
            body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "stop": stop_strings, "stream": True}).encode()
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\nConnection: "
                         f"close\r\n\r\n".encode() + body)
            try:
                status = await _status_of(reader, 120)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                text = b"".join([piece async for piece in _body(reader, headers)])
                tally.saw(status)
                want = 200 if len(stop_strings) == 4 else 400
                if status != want or (want == 200 and b"data: [DONE]" not in text):
                    tally.problems.append(f"stop strings of {len(stop_strings[0])} characters: "
                                          f"HTTP {status}, {text[-200:]!r}")
            finally:
                writer.close()


async def watch_health(port: int, stop: asyncio.Event, tally: Tally,
                       every_s: float = 0.1) -> List[float]:
    """GET /health on a fresh connection every `every_s` seconds until `stop`; returns each
    answer's latency. One over HEALTH_LIMIT_S, or none at all, is a problem."""
    latencies = []
    while not stop.is_set():
        began = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                         .encode())
            status = await _status_of(reader, 10)
            writer.close()
            tally.saw(status)
        except (ConnectionError, asyncio.TimeoutError) as error:
            tally.problems.append(f"/health failed: {error!r}")
            continue
        latencies.append(time.monotonic() - began)
        if latencies[-1] > HEALTH_LIMIT_S:
            tally.problems.append(f"/health took {latencies[-1]:.2f} s")
        await asyncio.sleep(every_s)
    return latencies


# The scheduler's loop fails (as a bug would) when it admits a request of 13 tokens at most.
FAILING_SCHEDULER = """
import sys
from llama.server import scheduler
from llama.server import app as server
apply = scheduler.Scheduler._apply
def failing(self, work):
    if any(item[2] == 13 for item in work.admit):
        raise RuntimeError("injected failure")
    apply(self, work)
scheduler.Scheduler._apply = failing
sys.exit(server.main(sys.argv[1:]))
"""


def killed_scheduler(server_args: List[str], prompt: str) -> Tuple[dict, List[str]]:
    """Start a server whose scheduler dies on a request of max_tokens 13 (with a free slot
    for it), with two streams running: both must end with an error event, the killing request
    get 500, /health say 503
    (or be gone), and the server exit 1 within 30 s. Returns (what happened, problems)."""
    import httpx

    from tests.server_fixtures import read_log, running_server

    problems, seen = [], {}
    with running_server(*server_args, code=FAILING_SCHEDULER) as url:
        body = {"prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
        # a long answer: the streams must still run when the killing request is admitted
        streams = [httpx.stream("POST", url + "/v1/completions", json=body, timeout=60)
                   for _ in range(2)]
        lines = []
        for stream in streams:
            response = stream.__enter__()
            lines.append(response.iter_lines())
            next(line for line in lines[-1] if line.startswith("data: "))
        killer = httpx.post(url + "/v1/completions", timeout=30,
                            json={"prompt": "x", "max_tokens": 13})
        seen["killing request"] = killer.status_code
        if killer.status_code != 500:
            problems.append(f"the killing request got {killer.status_code}")
        for i, events in enumerate(lines):
            last = [line for line in events if line.startswith("data: ")][-1]
            seen[f"stream {i} ended with"] = last[:90]
            if "scheduler failed" not in last:
                problems.append(f"stream {i} did not end with the scheduler's error: {last}")
        for stream in streams:
            stream.__exit__(None, None, None)
        try:
            seen["/health"] = httpx.get(url + "/health", timeout=5).status_code
        except httpx.TransportError:
            seen["/health"] = "gone"
        if seen["/health"] not in (503, "gone"):
            problems.append(f"/health said {seen['/health']} after the scheduler died")
        try:
            seen["exit code"] = url.process.wait(timeout=30)
        except Exception:
            seen["exit code"] = None
        if seen["exit code"] != 1:
            problems.append(f"the server's exit code: {seen['exit code']}")
        log = read_log(url.process)
        if "injected failure" not in log:
            problems.append("the log does not say why the scheduler failed")
    return seen, problems
